"""Pretrained components as hubs store them (fp16 / bf16 safetensors) load with fp32 master weights and train."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import VQModel
from safetensors import safe_open
from tokenizer_training_helpers import MICRO_MODEL, MICRO_TRAIN, make_shapes_data
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from tokenizer import DoveTokenizer
from tokenizer.modeling.text import byte_level_text_tokenizer
from tokenizer.training.config import parse_training_setup
from tokenizer.training.loop import TokenizerTrainer

HALF_DTYPES = [torch.float16, torch.bfloat16]
SAFETENSORS_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16"}
# The micro architecture minus the component configs, which from_components reads from the saved components.
MICRO_OVERRIDES = {k: v for k, v in MICRO_MODEL["overrides"].items() if k not in ("vq", "generator")}


def _stored_dtypes(directory: Path) -> set[str]:
    dtypes = set()
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            dtypes |= {handle.get_slice(key).get_dtype() for key in handle.keys()}
    return dtypes


def save_half_components(root: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    """A micro VQModel saved as a hub pipeline holds it (`vqvae/` subfolder) and a micro Pythia-style LM with
    its tokenizer, both written in `dtype` as the hub checkpoints are."""
    from tokenizer.modeling.presets import preset_config

    torch.manual_seed(0)
    base = preset_config("dove-tiny")
    vq = VQModel(**{**base.vq, **MICRO_MODEL["overrides"]["vq"]}).to(dtype)
    vq.save_pretrained(root / "vq" / "vqvae")
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(**{**base.generator, **MICRO_MODEL["overrides"]["generator"]})).to(dtype)
    lm.save_pretrained(root / "lm")
    byte_level_text_tokenizer().save_pretrained(root / "lm")
    for directory in (root / "vq" / "vqvae", root / "lm"):  # the files really hold half precision
        assert _stored_dtypes(directory) == {SAFETENSORS_NAMES[dtype]}, directory
    return root / "vq", root / "lm"


def _dtypes_by_part(model: DoveTokenizer) -> dict[str, set[torch.dtype]]:
    parts = {"vq": model.vq, "generator": model.generator, "decoder": model.decoder}
    return {name: {p.dtype for p in part.parameters()} for name, part in parts.items()}


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_components_load_as_fp32_and_cast_on_request(tmp_path, dtype):
    vq_dir, lm_dir = save_half_components(tmp_path, dtype)
    model = DoveTokenizer.from_components(vq_dir, lm_dir, preset="dove-tiny", **MICRO_OVERRIDES)
    assert _dtypes_by_part(model) == {"vq": {torch.float32}, "generator": {torch.float32}, "decoder": {torch.float32}}
    assert model.dtype == torch.float32
    images = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(model.encode(images, queries=["the red circle?", None]).tokens).all()

    # Inference in bf16: generator and decoder cast, the VQ stays fp32 by design; `dtype` says so.
    inference = DoveTokenizer.from_components(
        vq_dir, lm_dir, preset="dove-tiny", dtype=torch.bfloat16, **MICRO_OVERRIDES
    ).eval()
    assert _dtypes_by_part(inference) == {
        "vq": {torch.float32}, "generator": {torch.bfloat16}, "decoder": {torch.bfloat16},
    }  # fmt: skip
    assert inference.dtype == torch.bfloat16
    with torch.no_grad():
        encoding = inference.encode(images)
        assert encoding.tokens.dtype == torch.bfloat16
        assert torch.isfinite(inference.decode(encoding.tokens, encoding.lengths)).all()

    # A DOVE checkpoint saved in half precision reloads into fp32 master weights, or in the dtype asked for.
    model.to(dtype).save_pretrained(tmp_path / "dove")
    assert _stored_dtypes(tmp_path / "dove") == {"F32", SAFETENSORS_NAMES[dtype]}  # the VQ stays fp32
    assert DoveTokenizer.from_pretrained(tmp_path / "dove").dtype == torch.float32
    reloaded = DoveTokenizer.from_pretrained(tmp_path / "dove", dtype=torch.bfloat16)
    assert reloaded.dtype == torch.bfloat16 and {p.dtype for p in reloaded.vq.parameters()} == {torch.float32}


def test_dtype_refuses_to_name_one_dtype_for_mixed_parts(tiny_tokenizer):
    tiny_tokenizer.generator.backbone.half()
    with pytest.raises(RuntimeError, match="several dtypes"):
        tiny_tokenizer.dtype


@pytest.mark.parametrize(
    ("dtype", "mixed_precision"), [(torch.float16, "no"), (torch.bfloat16, "bf16")], ids=["fp16-fp32", "bf16-autocast"]
)
def test_half_precision_components_train_with_finite_losses_and_fp32_weights(tmp_path, dtype, mixed_precision):
    vq_dir, lm_dir = save_half_components(tmp_path, dtype)
    shapes = make_shapes_data(tmp_path / "shapes", n=8)
    model = {"preset": "dove-tiny", "overrides": MICRO_OVERRIDES, "vq": str(vq_dir), "generator": str(lm_dir)}
    train = {**MICRO_TRAIN, "max_steps": 3, "checkpoint_every": 0, "codebook_init_images": 0}
    setup = parse_training_setup({"model": model, "train": {**train, "mixed_precision": mixed_precision}}, where="t")
    trainer = TokenizerTrainer(
        setup, shapes / "images", tmp_path / "run", annotations=shapes / "train" / "annotations.json", progress=False
    )
    before = {k: v.clone() for k, v in trainer.tokenizer.state_dict().items()}
    summary = trainer.train()
    assert summary.steps == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(math.isfinite(r["loss/total"]) for r in records)
    after = trainer.tokenizer.state_dict()
    assert {v.dtype for v in after.values() if v.is_floating_point()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    backbone = "generator.backbone.layers.0.attention.query_key_value.weight"
    assert not torch.equal(before[backbone], after[backbone])  # the pretrained backbone trained


def _hub_cache_entry(cache: Path, repo_id: str) -> Path:
    """An entry of the Hugging Face cache as `snapshot_download` leaves it: refs/main -> snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return storage / "snapshots" / commit


@pytest.mark.parametrize(
    ("repo_id", "layout"),
    [("amused/amused-256", "vqvae"), ("mao1207/vqvae-amused", ""), ("mao1207/vqvae-amused", "vqvae")],
)
def test_vq_hub_ids_load_from_either_layout(tmp_path, monkeypatch, repo_id, layout):
    """`--vq amused/amused-256` (the pipeline, VQ under vqvae/) and `--vq mao1207/vqvae-amused` (the VQ the
    official DOVE code points to) resolve through the hub cache, offline, whether the VQ sits in vqvae/ or at the
    top level of the repo, with the default `vq_subfolder`."""
    from huggingface_hub import constants

    vq_dir, lm_dir = save_half_components(tmp_path / "saved", torch.float16)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = _hub_cache_entry(tmp_path / "hub", repo_id)
    target = snapshot / layout if layout else snapshot
    target.parent.mkdir(parents=True, exist_ok=True)
    (vq_dir / "vqvae").rename(target)
    model = DoveTokenizer.from_components(repo_id, lm_dir, preset="dove-tiny", **MICRO_OVERRIDES)
    saved = VQModel.from_pretrained(snapshot / layout, torch_dtype=torch.float32)
    torch.testing.assert_close(model.vq.model.decoder.conv_out.weight, saved.decoder.conv_out.weight)
    with pytest.raises(FileNotFoundError, match="no config.json in vqvae/ nor at the top level"):
        (snapshot / layout / "config.json").unlink()
        DoveTokenizer.from_components(repo_id, lm_dir, preset="dove-tiny", **MICRO_OVERRIDES)


@pytest.mark.slow
def test_full_preset_trains_one_step_from_fp16_components_in_bf16_with_checkpointing(tmp_path):
    """The first real run in small: dove-pythia70m-amused256 at 256 px from components saved in fp16 as the hub
    stores them, its own training file, bf16 autocast, gradient checkpointing, LPIPS (random VGG16 weights: the
    real network's path), the discriminator on; one optimiser step of the training loop, batch 1."""
    from safetensors.torch import save_file
    from test_losses import random_vgg16_features

    from dove_vlm.shapes import make_shapes
    from tokenizer.modeling.presets import preset_config
    from tokenizer.training.config import ModelSpec, load_training_file
    from tokenizer.training.data import collate_examples
    from tokenizer.training.recipes import recipe_path

    preset = "dove-pythia70m-amused256"
    torch.manual_seed(0)
    config = preset_config(preset)
    VQModel(**config.vq).to(torch.float16).save_pretrained(tmp_path / "vq" / "vqvae")
    GPTNeoXForCausalLM(GPTNeoXConfig(**config.generator)).to(torch.float16).save_pretrained(tmp_path / "lm")
    byte_level_text_tokenizer().save_pretrained(tmp_path / "lm")
    save_file(random_vgg16_features(), str(tmp_path / "vgg16.safetensors"))
    make_shapes(tmp_path / "shapes", 2, 0, image_size=256, progress=False)

    overrides = {
        "mixed_precision": "bf16", "gradient_checkpointing": True, "adversarial_start_step": 0,
        "perceptual_weights": str(tmp_path / "vgg16.safetensors"),
        "batch_size": 1, "num_workers": 0, "tracker": "none",
    }  # fmt: skip
    setup = load_training_file(recipe_path(preset), overrides=overrides)
    setup.model = ModelSpec(preset=preset, vq=str(tmp_path / "vq"), generator=str(tmp_path / "lm"))
    shapes = tmp_path / "shapes"
    trainer = TokenizerTrainer(
        setup, shapes / "images", tmp_path / "run", annotations=shapes / "train" / "annotations.json", progress=False
    )
    tokenizer = trainer.tokenizer
    assert tokenizer.config.token_dim == 512 and tokenizer.generator.backbone.layers[0].gradient_checkpointing
    before = tokenizer.generator.backbone.layers[0].attention.query_key_value.weight.detach().clone()
    logs = trainer._micro_step(collate_examples([trainer.dataset[0]]))  # one optimiser step, as the loop runs it
    assert {"loss/total", "loss/discriminator"} <= logs.keys()
    assert all(math.isfinite(v) for k, v in logs.items() if k.startswith("loss/")), logs
    params = list(tokenizer.parameters())
    assert {p.dtype for p in params} == {torch.float32}
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(before, tokenizer.generator.backbone.layers[0].attention.query_key_value.weight)
