"""Half-precision checkpoints, as the hub ships LLMs and VLMs: training loads float32 master weights whatever
the checkpoint's dtype, inference loads the dtype asked for, and `dtype` says which one the LLM computes in."""

from __future__ import annotations

import json
import math

import pytest
import torch
from llava_workspace import build_workspace
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from dove_vlm.cli import main as cli_main
from llava_adapter import DoveLlavaForCausalLM, add_image_token
from llava_adapter.inference import inference_dtype, load_pretrained_model
from llava_adapter.lmms_model import DoveLlava
from llava_adapter.train import LOG_FILE

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype")
    ws = build_workspace(root, n_images=4)
    ws.half_llms = {}
    for name, dtype in HALF.items():  # the float32 tiny LLM re-saved the way the hub ships checkpoints
        directory = root / f"llm_{name}"
        AutoModelForCausalLM.from_pretrained(ws.llm_dir, dtype=torch.float32).to(dtype).save_pretrained(directory)
        AutoTokenizer.from_pretrained(ws.llm_dir).save_pretrained(directory)
        ws.half_llms[name] = directory
    return ws


def saved_dtypes(path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as handle:
        return {handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118 - safe_open is no dict


def finetune_cli(workspace, tmp_path, output, *start: str) -> list[float]:
    """A few optimizer steps of full stage 2 through the real command; returns the logged losses."""
    code = cli_main(
        [
            "finetune", "--stage", "2", "--no-lora", *start, "--data", str(workspace.train_json),
            "--image-folder", str(workspace.images), "--output", str(output), "--max-steps", "3",
            "--batch-size", "2", "--lr", "1e-3", "--warmup-ratio", "0", "--no-group-by-visual-length",
        ]
    )  # fmt: skip
    assert code == 0
    return json.loads((output / LOG_FILE).read_text())["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("half", list(HALF))
def test_half_precision_llm_and_vlm_train_with_float32_master_weights(workspace, tmp_path, half):
    llm_dir = workspace.half_llms[half]
    assert saved_dtypes(llm_dir / "model.safetensors") == {HALF[half]}

    # `finetune --llm` on the half-precision LLM: finite losses, the trained LLM saved as float32
    from_llm = tmp_path / "from_llm"
    losses = finetune_cli(workspace, tmp_path, from_llm, "--llm", str(llm_dir), "--tower", str(workspace.tower_dir))
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert saved_dtypes(from_llm / "llm" / "model.safetensors") == {torch.float32}

    # a whole VLM saved in half precision (LLM and projector), as a published checkpoint would be
    vlm_half = tmp_path / "vlm_half"
    DoveLlavaForCausalLM.from_pretrained(from_llm, dtype=HALF[half]).save_pretrained(vlm_half)
    assert saved_dtypes(vlm_half / "llm" / "model.safetensors") == {HALF[half]}
    assert saved_dtypes(vlm_half / "mm_projector.safetensors") == {HALF[half]}
    AutoTokenizer.from_pretrained(from_llm).save_pretrained(vlm_half)
    reloaded = DoveLlavaForCausalLM.from_pretrained(vlm_half)
    assert {p.dtype for p in reloaded.parameters()} == {torch.float32}
    assert reloaded.dtype == torch.float32

    from_model = tmp_path / "from_model"
    losses = finetune_cli(workspace, tmp_path, from_model, "--model", str(vlm_half))
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert saved_dtypes(from_model / "llm" / "model.safetensors") == {torch.float32}
    assert saved_dtypes(from_model / "mm_projector.safetensors") == {torch.float32}


@pytest.mark.slow
def test_inference_loads_the_dtype_asked_for_and_dtype_reports_the_llms(workspace, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(workspace.llm_dir)
    add_image_token(tokenizer)
    saved = tmp_path / "vlm"
    DoveLlavaForCausalLM.from_components(
        workspace.half_llms["bf16"], workspace.tower_dir, tokenizer=tokenizer
    ).save_pretrained(saved, tokenizer=tokenizer)

    model = DoveLlavaForCausalLM.from_pretrained(saved, dtype=torch.bfloat16)
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.mm_projector.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vision_tower.parameters()} == {torch.float32}
    assert model.dtype == torch.bfloat16 and model.vision_tower.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype="):
        DoveLlavaForCausalLM.from_pretrained(saved, torch_dtype=torch.bfloat16)

    _, model, _, _ = load_pretrained_model(saved, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    _, model, _, _ = load_pretrained_model(saved)  # auto on the CPU
    assert model.dtype == torch.float32
    assert inference_dtype("auto", "cpu") == torch.float32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        assert inference_dtype("auto", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="auto"):
        inference_dtype("float8", "cpu")

    lmms_model = DoveLlava(pretrained=str(saved), device="cpu", dtype="bf16")
    assert lmms_model.model.dtype == torch.bfloat16
    assert DoveLlava(pretrained=str(saved), device="cpu").model.dtype == torch.float32

    image = min(workspace.images.iterdir())
    question = ["--image", str(image), "--question", "What colour is the circle?", "--max-new-tokens", "2"]
    assert cli_main(["chat", "--model", str(saved), "--dtype", "bfloat16", *question]) == 0
    assert "visual tokens:" in capsys.readouterr().out


def test_a_vlm_built_from_its_config_has_a_float32_llm_whatever_dtype_the_config_records(tiny_tokenizer):
    from llava_adapter.modeling import DoveLlavaConfig
    from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer

    text_tokenizer = train_tiny_tokenizer(["a tiny corpus of words"] * 4, vocab_size=300)
    # what the config of an LLM saved in bf16 records, and a VLM saved from it copies into `llm_config`
    llm_config = {**build_tiny_llm(text_tokenizer).config.to_dict(), "dtype": "bfloat16"}
    config = DoveLlavaConfig(
        llm_config=llm_config, tower_config=tiny_tokenizer.config.to_dict(), image_token_id=4, mm_hidden_size=8
    )
    model = DoveLlavaForCausalLM(config)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
