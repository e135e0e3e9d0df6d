"""Gradient checkpointing: the same loss and gradients, and every part really recomputed in the backward pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenizer import DoveTokenizer
from tokenizer.training.config import TrainConfig
from tokenizer.training.loop import TrainingModel
from tokenizer.training.losses import ReconstructionLoss


def _step(model: TrainingModel, pixels: torch.Tensor, query: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One training forward and backward (reconstruction + latent loss through every part); returns the loss."""
    lengths = torch.tensor([5, model.tokenizer.max_tokens])
    out = model(pixels, *query, lambda predicted: lengths)
    loss = ReconstructionLoss(mse_weight=1.0)(out["recon"], pixels).total
    loss = loss + F.mse_loss(out["latents"], out["target_latents"].detach()) + out["eos_logits"].sigmoid().mean()
    loss.backward()
    return loss.detach()


def _inner_modules(tokenizer: DoveTokenizer) -> dict[str, torch.nn.Module]:
    """A module inside one checkpointed block of each part (hooks on the block itself may sit outside it).

    Counted with pre-hooks: the recompute stops as soon as the last saved tensor it needs is back, which may be
    inside the module, before a forward hook would run."""
    vq = tokenizer.vq.model
    return {
        "vq_encoder": vq.encoder.down_blocks[1].resnets[0],
        "vq_decoder": vq.decoder.up_blocks[1].resnets[0],
        "generator": tokenizer.generator.backbone.layers[0].mlp,
        "token_decoder": tokenizer.decoder.transformer.layers[0].linear1,
    }


def test_checkpointing_keeps_loss_and_gradients_and_recomputes_every_part():
    torch.manual_seed(0)
    tokenizer = DoveTokenizer.from_preset("dove-tiny").train()
    model = TrainingModel(tokenizer)
    pixels = torch.rand(2, 3, 64, 64)
    query = tokenizer.tokenize_queries(["where is the red circle?", "how many squares?"], 2)
    calls = {name: 0 for name in _inner_modules(tokenizer)}
    for name, module in _inner_modules(tokenizer).items():
        module.register_forward_pre_hook(lambda *args, name=name: calls.__setitem__(name, calls[name] + 1))

    results = {}
    for enabled in (False, True):
        tokenizer.set_gradient_checkpointing(enabled)
        tokenizer.zero_grad(set_to_none=True)
        calls.update(dict.fromkeys(calls, 0))
        saved_bytes = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = _step(model, pixels, query)
        grads = {n: p.grad.clone() for n, p in tokenizer.named_parameters() if p.grad is not None}
        results[enabled] = (loss, grads, dict(calls), sum(saved_bytes))

    (loss_off, grads_off, calls_off, saved_off), (loss_on, grads_on, calls_on, saved_on) = results[False], results[True]
    assert calls_off == dict.fromkeys(calls, 1)
    assert calls_on == dict.fromkeys(calls, 2), "each part runs once more in the backward pass"
    assert saved_on < 0.5 * saved_off, (saved_on, saved_off)
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=0)
    assert grads_on.keys() == grads_off.keys() and len(grads_off) > 100
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@torch.no_grad()
def test_checkpointing_changes_nothing_outside_training():
    torch.manual_seed(0)
    tokenizer = DoveTokenizer.from_preset("dove-tiny").eval()
    images = torch.rand(1, 3, 64, 64)
    before = tokenizer.encode(images).tokens
    tokenizer.set_gradient_checkpointing(True)
    torch.testing.assert_close(tokenizer.encode(images).tokens, before, rtol=0, atol=0)


def test_the_option_reaches_the_model(tmp_path):
    from tokenizer_training_helpers import MICRO_MODEL, make_shapes_data, write_config

    from tokenizer.training.config import load_training_file
    from tokenizer.training.loop import TokenizerTrainer

    assert TrainConfig().gradient_checkpointing is False
    shapes = make_shapes_data(tmp_path / "shapes", n=4)
    setup = load_training_file(write_config(tmp_path / "run.yaml", MICRO_MODEL, gradient_checkpointing=True))
    tokenizer = TokenizerTrainer(setup, shapes / "images", tmp_path / "run", progress=False).tokenizer
    assert tokenizer.vq.model.encoder.gradient_checkpointing and tokenizer.vq.model.decoder.gradient_checkpointing
    assert tokenizer.generator.backbone.layers[0].gradient_checkpointing
    assert tokenizer.decoder.gradient_checkpointing


@pytest.mark.parametrize("flag", ["--gradient-checkpointing", "--no-gradient-checkpointing"])
def test_cli_flag_overrides_the_config(flag):
    import argparse

    from dove_vlm.commands import train_tokenizer

    parser = argparse.ArgumentParser()
    train_tokenizer.register(parser.add_subparsers())
    args = parser.parse_args(["train-tokenizer", "--recipe", "dove-tiny", "--data", "d", "--output", "o", flag])
    assert args.gradient_checkpointing is (flag == "--gradient-checkpointing")
