"""The length learned from the answer: the length distribution the EOS head defines, the objective's gradient
against finite differences, one tower pass shared by the candidate lengths, `finetune --tower-trainable
eos_head --token-price` training the head alone in the tower (and the price moving the lengths), the
refusal of an EOS head without a length objective, and the tuned head surviving save / reload under
DeepSpeed ZeRO-2 and ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llava_workspace import build_workspace
from safetensors.torch import load_file
from test_finetune import free_port, launcher_env, run_launcher
from transformers import AutoTokenizer

from dove_vlm.cli import main as cli_main
from llava_adapter import DoveLlavaForCausalLM, DoveVisionTower, add_image_token
from llava_adapter.data import LlavaCollator, LlavaConversationDataset, pad_token_id
from llava_adapter.length_objective import (
    AnswerLengthObjective,
    candidate_lengths,
    expected_length,
    interpolation_weights,
    length_distribution,
)
from llava_adapter.train import FinetuneArguments, finetune, length_objective, load_model
from tokenizer import DoveTokenizer
from tokenizer.modeling.generator import initial_eos_bias

HEAD = ("generator.eos_head.weight", "generator.eos_head.bias")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp("answerlen"), n_images=4)
    # A head as a fresh tokenizer has it: every image at all N tokens, E[L] well above the minimum.
    tower = DoveTokenizer.from_pretrained(ws.tower_dir)
    torch.nn.init.zeros_(tower.generator.eos_head.weight)
    torch.nn.init.constant_(
        tower.generator.eos_head.bias, initial_eos_bias(tower.config.max_tokens, tower.config.eos_threshold)
    )
    ws.fresh_tower = tower.save_pretrained(ws.root / "tower_fresh")
    return ws


@pytest.fixture(scope="module")
def tokenizer(workspace):
    tok = AutoTokenizer.from_pretrained(workspace.llm_dir)
    add_image_token(tok)
    return tok


def batch_of(workspace, tokenizer, n=4, use_query=True):
    dataset = LlavaConversationDataset(
        workspace.train_json,
        tokenizer,
        DoveVisionTower(str(workspace.tower_dir), delay_load=True).image_processor,
        workspace.images,
        use_query=use_query,
    )
    return LlavaCollator(pad_token_id(tokenizer))([dataset[i] for i in range(n)])


# ---------------------------------------------------------------------------------------------- the distribution


def test_length_distribution_is_the_hazard_product_with_the_rest_at_n():
    torch.manual_seed(0)
    logits = torch.randn(3, 6) * 2
    min_tokens = 3
    probs = length_distribution(logits, min_tokens)
    s = torch.sigmoid(logits)
    for row in range(3):
        reach = 1.0
        for length in range(1, 7):
            if length < min_tokens:
                expected = 0.0
            elif length == 6:
                expected = reach
            else:
                expected = float(s[row, length - 1]) * reach
                reach *= 1 - float(s[row, length - 1])
            assert float(probs[row, length - 1]) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(expected_length(probs), (probs * torch.arange(1, 7)).sum(dim=1))
    # A certain stop at the first allowed position: every image at min_tokens.
    assert expected_length(length_distribution(torch.full((1, 6), 30.0), 2)).item() == pytest.approx(2.0)


def test_candidate_lengths_span_min_to_max_and_interpolate_exactly_at_each_candidate():
    assert candidate_lengths(1, 32, 4) == [1, 3, 10, 32]
    assert candidate_lengths(2, 5, 9) == [2, 3, 4, 5]
    assert len(candidate_lengths(1, 8, 7)) == 7
    weights = interpolation_weights([2, 4, 8], 8)
    assert torch.equal(weights[0], torch.zeros(3))  # below the shortest candidate
    torch.testing.assert_close(weights[1:].sum(dim=1), torch.ones(7))
    torch.testing.assert_close(weights[3], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(weights[5], torch.tensor([0.0, 0.5, 0.5]))  # length 6, halfway from 4 to 8
    with pytest.raises(ValueError, match="end at max_tokens"):
        interpolation_weights([1, 4], 8)


# ---------------------------------------------------------------------------------------------- one tower pass


def test_sharing_one_pass_cuts_every_budget_from_one_encoding(tiny_tokenizer):
    tower = DoveVisionTower(tiny_tokenizer, trainable="eos_head")
    images = torch.rand(2, 3, 64, 64)
    calls = []
    tower.tokenizer.generator.register_forward_hook(lambda *_: calls.append(1))
    with tower.sharing_one_pass():
        shared = {budget: tower(images, budget=budget) for budget in (1, 5, 32)}
        logits = tower.last_eos_logits
        with pytest.raises(ValueError, match="other images"):
            tower(torch.rand(2, 3, 64, 64), budget=1)
    assert len(calls) == 1 and logits.requires_grad
    for budget, features in shared.items():
        alone = tower(images, budget=budget)
        assert [f.shape[0] for f in features] == [budget, budget]
        for a, b in zip(features, alone):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(calls) == 4  # outside the block every call encodes again


# ---------------------------------------------------------------------------------------------- the gradient


@pytest.mark.parametrize("candidates", [3, 32])
def test_head_gradient_is_nonzero_and_matches_finite_differences(workspace, tokenizer, candidates):
    """32 candidates: every length, the exact E_L[loss(L)] + beta E[L]; 3: the interpolated estimate, whose
    gradient is the exact gradient of what it estimates."""
    torch.manual_seed(0)
    model = DoveLlavaForCausalLM.from_components(
        workspace.llm_dir, workspace.tower_dir, tokenizer=tokenizer, tower_trainable="eos_head"
    ).double()
    model.eval()
    batch = batch_of(workspace, tokenizer)
    batch["images"] = batch["images"].double()
    objective = AnswerLengthObjective(token_price=0.05, candidates=candidates)
    head = model.vision_tower.tokenizer.generator.eos_head
    result = objective(model, model, batch)
    assert result.llm_passes == candidates
    result.loss.backward()
    grad_w, grad_b = head.weight.grad.clone(), head.bias.grad.clone()
    assert grad_b.abs().item() > 1e-4 and grad_w.norm().item() > 1e-4
    others = [p for n, p in model.named_parameters() if p.requires_grad and "eos_head" not in n]
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in others)  # the LLM side trains too

    direction = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def value(weight_step: float, bias_step: float) -> float:
        with torch.no_grad():
            head.weight.add_(direction, alpha=weight_step)
            head.bias.add_(bias_step)
            out = objective(model, model, batch).objective
            head.weight.sub_(direction, alpha=weight_step)
            head.bias.sub_(bias_step)
        return out

    eps = 1e-4
    fd_bias = (value(0, eps) - value(0, -eps)) / (2 * eps)
    fd_weight = (value(eps, 0) - value(-eps, 0)) / (2 * eps)
    assert fd_bias == pytest.approx(grad_b.item(), rel=1e-4, abs=1e-8)
    assert fd_weight == pytest.approx(float((grad_w * direction).sum()), rel=1e-4, abs=1e-8)


# ---------------------------------------------------------------------------------------------- finetune


def stage2(workspace, output: Path, **overrides) -> FinetuneArguments:
    values = {
        "stage": 2, "data": str(workspace.train_json), "image_folder": str(workspace.images),
        "output_dir": str(output), "llm": str(workspace.llm_dir), "tower": str(workspace.fresh_tower),
        "tower_trainable": "eos_head", "lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
        "max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant", "group_by_visual_length": False,
    }  # fmt: skip
    values.update(overrides)
    return FinetuneArguments(**values)


def tower_lengths(model_dir: Path, workspace, tokenizer, use_query=True) -> tuple[torch.Tensor, float]:
    """The lengths inference picks on a fixed batch, and the mean E[L] of the head's distribution."""
    model = DoveLlavaForCausalLM.from_pretrained(model_dir)
    batch = batch_of(workspace, tokenizer, n=8, use_query=use_query)
    with torch.no_grad():
        model.vision_tower(batch["images"], queries=batch.get("queries"))
    tower = model.vision_tower
    probs = length_distribution(tower.last_eos_logits, tower.config.min_tokens)
    return tower.last_lengths.float(), float(expected_length(probs).mean())


def test_eos_head_run_trains_only_the_head_in_the_tower_and_the_price_moves_the_length(workspace, tokenizer, tmp_path):
    start = load_file(str(workspace.fresh_tower / "model.safetensors"))
    start_lengths, start_expected = tower_lengths_of_tower(workspace, tokenizer)
    assert torch.all(start_lengths == 32) and start_expected > 15  # dove-tiny: N = 32

    high, free = tmp_path / "high", tmp_path / "free"
    trained = finetune(stage2(workspace, high, token_price=10.0)).model
    finetune(stage2(workspace, free, token_price=0.0))
    for output in (high, free):
        tuned = load_file(str(output / "vision_tower" / "model.safetensors"))
        changed = {k for k in start if not torch.equal(start[k], tuned[k])}
        assert changed == set(HEAD), changed
        assert json.loads((output / "config.json").read_text())["token_price"] in (10.0, 0.0)

    # Saved and reloaded, the tuned head gives the EOS logits it had in memory at the end of training.
    batch = batch_of(workspace, tokenizer, n=8)
    reloaded = DoveLlavaForCausalLM.from_pretrained(high)
    assert reloaded.config.token_price == 10.0 and reloaded.vision_tower.trainable == "eos_head"
    for model in (trained, reloaded):
        model.eval()
        with torch.no_grad():
            model.vision_tower(batch["images"], queries=batch.get("queries"))
    torch.testing.assert_close(
        reloaded.vision_tower.last_eos_logits, trained.vision_tower.last_eos_logits, rtol=0, atol=0
    )

    high_lengths, high_expected = tower_lengths(high, workspace, tokenizer)
    free_lengths, free_expected = tower_lengths(free, workspace, tokenizer)
    assert high_lengths.mean() <= 1.5 and high_expected < 1.5, (high_lengths, high_expected)  # min_tokens = 1
    assert free_lengths.mean() >= start_lengths.mean() - 1, free_lengths  # a free token is kept
    assert free_expected > 4 * high_expected

    # Continuing the tuned model keeps tuning at its saved price unless told otherwise.
    again = FinetuneArguments(stage=2, data="d.json", output_dir="o", model=str(high))
    assert length_objective(load_model(again)[0], again).token_price == 10.0


def tower_lengths_of_tower(workspace, tokenizer) -> tuple[torch.Tensor, float]:
    tower = DoveVisionTower(str(workspace.fresh_tower))
    batch = batch_of(workspace, tokenizer, n=8)
    with torch.no_grad():
        tower(batch["images"], queries=batch.get("queries"))
    probs = length_distribution(tower.last_eos_logits, tower.config.min_tokens)
    return tower.last_lengths.float(), float(expected_length(probs).mean())


def test_full_finetune_without_queries_tunes_the_head_with_the_llm(workspace, tokenizer, tmp_path):
    out = tmp_path / "full"
    finetune(stage2(workspace, out, token_price=10.0, lora=False, use_query=False))
    assert (out / "llm").is_dir() and not json.loads((out / "config.json").read_text())["use_query"]
    before = load_file(str(workspace.llm_dir / "model.safetensors"))
    after = load_file(str(out / "llm" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lengths, expected = tower_lengths(out, workspace, tokenizer, use_query=False)
    assert lengths.mean() <= 1.5 and expected < 2.0, (lengths, expected)


def test_eos_head_without_a_length_objective_is_refused(workspace, tmp_path, capsys):
    common = ["finetune", "--stage", "2", "--llm", str(workspace.llm_dir), "--tower", str(workspace.tower_dir),
              "--data", str(workspace.train_json), "--image-folder", str(workspace.images),
              "--no-group-by-visual-length", "--max-steps", "1"]  # fmt: skip
    assert cli_main([*common, "--output", str(tmp_path / "o"), "--tower-trainable", "eos_head"]) == 2
    err = capsys.readouterr().err
    assert "hard cut" in err and "never reaches the EOS head" in err and "--token-price" in err
    assert not (tmp_path / "o" / "config.json").exists()
    assert cli_main([*common, "--output", str(tmp_path / "p"), "--token-price", "0.1"]) == 2
    assert "needs a trainable EOS head" in capsys.readouterr().err
    with pytest.raises(ValueError, match="stage 1"):
        FinetuneArguments(stage=1, data="d", output_dir="o", model="m", token_price=0.1)
    with pytest.raises(ValueError, match="--budget forces"):
        FinetuneArguments(stage=2, data="d", output_dir="o", model="m", tower_trainable="eos_head",
                          token_price=0.1, budget=4)  # fmt: skip


# ---------------------------------------------------------------------------------------------- DeepSpeed

ZERO_DRIVER = """
import json, sys, torch
from safetensors.torch import save_file
from llava_adapter.data import LlavaCollator, LlavaConversationDataset, pad_token_id
from llava_adapter.train import FinetuneArguments, finetune

config = json.loads(sys.argv[1])
for run in config["runs"]:
    result = finetune(FinetuneArguments(**run["args"]))
    # The EOS logits of the live engine (partitioned parameters under ZeRO-3), to compare with the saved model.
    dataset = LlavaConversationDataset(run["args"]["data"], result.tokenizer, result.model.vision_tower.image_processor,
                                       run["args"]["image_folder"], use_query=result.model.config.use_query)
    batch = LlavaCollator(pad_token_id(result.tokenizer))([dataset[i] for i in range(4)])
    engine = result.trainer.model_wrapped
    engine.eval()
    with torch.no_grad():
        engine(**batch)
    save_file({"eos_logits": result.model.vision_tower.last_eos_logits.float().contiguous()}, run["logits"])
"""


@pytest.mark.slow
def test_tuned_head_survives_save_and_reload_under_zero2_and_zero3(workspace, tokenizer, tmp_path):
    runs = []
    for name, extra in (("zero2", {"lora": True}), ("zero3", {"lora": False, "use_query": False})):
        args = vars(stage2(workspace, tmp_path / name, token_price=10.0, deepspeed=name, max_steps=4, **extra))
        runs.append({"args": args, "logits": str(tmp_path / f"{name}_logits.safetensors")})
    driver = tmp_path / "driver.py"
    driver.write_text(ZERO_DRIVER)
    run_launcher(
        ["torchrun", "--nproc_per_node", "1", "--master_port", str(free_port()), str(driver),
         json.dumps({"runs": runs})],
        launcher_env(),
    )  # fmt: skip
    start = load_file(str(workspace.fresh_tower / "model.safetensors"))
    for run in runs:
        output = Path(run["args"]["output_dir"])
        saved = load_file(str(output / "vision_tower" / "model.safetensors"))
        assert not torch.equal(saved[HEAD[0]], start[HEAD[0]]), f"{output}: the head was not saved trained"
        reloaded = DoveLlavaForCausalLM.from_pretrained(output)
        assert reloaded.config.token_price == 10.0 and reloaded.vision_tower.trainable == "eos_head"
        batch = batch_of(workspace, tokenizer, use_query=reloaded.config.use_query)
        with torch.no_grad():
            reloaded(**batch)
        engine_logits = load_file(run["logits"])["eos_logits"]
        # The engine ran under torchrun with its own thread count: sums may round differently in the last bits
        # (up to 1e-6 seen), as for the other ZeRO reload checks; a lost or untrained head differs by far more.
        torch.testing.assert_close(reloaded.vision_tower.last_eos_logits.float(), engine_logits, rtol=0, atol=1e-5)
        assert float(reloaded.vision_tower.last_lengths.float().mean()) < 32  # and the tuned head chooses
