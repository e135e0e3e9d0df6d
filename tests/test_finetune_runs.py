"""`finetune --output` reused: a fresh run refuses an earlier run's checkpoints, `overwrite` discards only what
that run wrote, a resume skips a damaged newest checkpoint for the one before it, and grouping by visual
length puts the visual-length sampler into the Trainer's dataloader, and `bf16` autocasts the training steps."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from llava_workspace import OutputDtypes, build_workspace
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from llava_adapter import DoveLlavaForCausalLM
from llava_adapter.train import CHECKPOINT_RECORD, FinetuneArguments, finetune, latest_checkpoint
from tokenizer.training.checkpointing import CorruptCheckpointError, ExistingRunError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp("runs"), n_images=4)
    subset = ws.root / "train8.json"
    subset.write_text(json.dumps(ws.records()[:8]))
    ws.subset = subset
    return ws


def stage1(workspace, output: Path, **overrides) -> FinetuneArguments:
    values = {
        "stage": 1, "data": str(workspace.subset), "image_folder": str(workspace.images), "output_dir": str(output),
        "llm": str(workspace.llm_dir), "tower": str(workspace.tower_dir), "per_device_train_batch_size": 2,
        "max_steps": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
        "group_by_visual_length": False, "save_steps": 2, "save_total_limit": 2,
    }  # fmt: skip
    values.update(overrides)
    return FinetuneArguments(**values)


def projector(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "mm_projector.safetensors"))


def test_fresh_finetune_refuses_an_earlier_run_and_overwrite_discards_only_that_run(workspace, tmp_path):
    out = tmp_path / "run"
    finetune(stage1(workspace, out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "checkpoint-4" / CHECKPOINT_RECORD).is_file()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExistingRunError, match="checkpoint-2.*use --resume to continue it, or --overwrite"):
        finetune(stage1(workspace, out, max_steps=2, seed=7))
    with pytest.raises(ValueError, match="pass one of them"):
        finetune(stage1(workspace, out, resume=True, overwrite=True))
    with pytest.raises(ValueError, match="is the model --overwrite would delete"):
        finetune(stage1(workspace, out, llm=None, tower=None, model=str(out), overwrite=True))
    finetune(stage1(workspace, out, max_steps=2, seed=7, save_steps=None, overwrite=True))
    assert not list(out.glob("checkpoint-*"))
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "finetune_log.json").read_text())["arguments"]["seed"] == 7


def test_finetune_resume_skips_a_damaged_newest_checkpoint(workspace, tmp_path, caplog):
    out = tmp_path / "run"
    finetune(stage1(workspace, out))
    reference = projector(out)
    newest, previous = out / "checkpoint-4", out / "checkpoint-2"
    (out / "checkpoint-final").mkdir()  # not a step: neither transformers nor the resume takes it
    assert latest_checkpoint(out) == get_last_checkpoint(str(out)) == str(newest)
    (out / "checkpoint-final").rmdir()  # left there, the resumed run's checkpoint rotation deleted checkpoint-2
    victim = newest / "optimizer.pt"
    with open(victim, "r+b") as handle:
        handle.truncate(victim.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger="llava_adapter.train"):
        finetune(stage1(workspace, out, resume=True))
    assert f"skipping checkpoint {newest}" in caplog.text and "optimizer.pt" in caplog.text
    final = projector(out)
    assert all(torch.allclose(final[k], reference[k], rtol=0, atol=1e-6) for k in reference)  # the same run

    # A checkpoint without its record (killed right after the Trainer wrote it) is checked by opening its files.
    for path in (newest, previous):
        (path / CHECKPOINT_RECORD).unlink()
        (path / "scheduler.pt").write_bytes(b"not a zip archive")
    with pytest.raises(
        CorruptCheckpointError, match=r"no usable checkpoint.*checkpoint-4.*scheduler\.pt.*checkpoint-2"
    ):
        finetune(stage1(workspace, out, resume=True))


def _samplers(loader) -> list:
    """Every sampler inside the (accelerate-wrapped) dataloader: its sampler, its batch sampler, and what
    those wrap, so the test does not depend on which wrapper holds the index sampler."""
    found, stack = [], [loader]
    while stack:
        item = stack.pop()
        for name in ("sampler", "batch_sampler"):
            inner = getattr(item, name, None)
            if inner is not None and not any(inner is f for f in found):
                found.append(inner)
                stack.append(inner)
    return found


def test_finetune_grouped_by_visual_length_trains_with_the_visual_length_sampler(workspace, tmp_path):
    from llava_adapter.sampler import VisualLengthGroupedSampler

    grouped = finetune(stage1(workspace, tmp_path / "grouped", max_steps=1, save_steps=None,
                              group_by_visual_length=True, visual_length_cache=str(tmp_path / "cache")))  # fmt: skip
    samplers = _samplers(grouped.trainer.get_train_dataloader())
    matches = [x for x in samplers if isinstance(x, VisualLengthGroupedSampler)]
    assert len(matches) == 1, [type(x).__name__ for x in samplers]
    sampler = matches[0]
    assert sampler.lengths == grouped.trainer.sample_lengths and len(sampler.lengths) == 8
    plain = finetune(stage1(workspace, tmp_path / "plain", max_steps=1, save_steps=None))
    assert not any(isinstance(x, VisualLengthGroupedSampler) for x in _samplers(plain.trainer.get_train_dataloader()))


class _TowerLengths(TrainerCallback):
    """The lengths the tower gave the LLM at every training step."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(model.vision_tower.last_lengths.tolist())


def test_uniform_train_lengths_reach_the_training_steps_and_stay_out_of_the_saved_model(workspace, tmp_path):
    uniform, auto = _TowerLengths(), _TowerLengths()
    result = finetune(stage1(workspace, tmp_path / "uniform", stage=2, max_steps=6, save_steps=None,
                             train_lengths="uniform"), callbacks=[uniform])  # fmt: skip
    finetune(stage1(workspace, tmp_path / "auto", stage=2, max_steps=6, save_steps=None), callbacks=[auto])
    n = result.model.vision_tower.num_patches
    drawn = {length for step in uniform.seen for length in step}
    assert len(uniform.seen) == 6 and drawn <= set(range(1, n + 1)) and len(drawn) >= 4
    assert uniform.seen != auto.seen
    reloaded = DoveLlavaForCausalLM.from_pretrained(tmp_path / "uniform")
    assert reloaded.vision_tower.training_lengths == "auto"  # a training choice, not part of the model


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_bf16_finetune_steps_run_the_llm_and_generator_in_bf16_and_the_vq_in_fp32(workspace, tmp_path, bf16):
    """`--bf16` on the CPU is the Trainer's autocast around the training forward (accelerate's CPU autocast):
    the LLM, the projector and a trainable generator compute in bf16 while the VQ switches autocast off."""
    hooks = OutputDtypes()
    finetune(stage1(workspace, tmp_path / "run", stage=2, lora=True, lora_r=4, lora_alpha=8, tower_trainable="generator",
                    max_steps=1, save_steps=None, bf16=bf16), callbacks=[hooks])  # fmt: skip
    half = "torch.bfloat16" if bf16 else "torch.float32"
    assert hooks.seen == {"llm": {(half, bf16)}, "projector": {(half, bf16)}, "generator": {(half, bf16)},
                          "vq": {("torch.float32", False)}}  # fmt: skip
    assert hooks.calls["llm"] == hooks.calls["projector"] == 1  # one step, no gradient checkpointing: no recompute


KILLED_RUN = """
import json, os, signal, sys
from transformers import TrainerCallback
from llava_adapter.train import FinetuneArguments, finetune

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

finetune(FinetuneArguments(**json.loads(sys.argv[1])), callbacks=[KillAt()])
"""


@pytest.mark.slow
def test_finetune_killed_mid_epoch_resumes_to_the_uninterrupted_runs_weights(workspace, tmp_path):
    """SIGKILL after step 5 of 8 (4 per epoch), the newest checkpoint at step 3: the resume starts mid-epoch, so
    the sampler's order, the skipped batches, LoRA dropout's random state, the optimizer and the cosine schedule
    all have to come back for the weights to match."""
    overrides = {"stage": 2, "lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "max_steps": -1,
                 "num_train_epochs": 2, "save_steps": 3, "save_total_limit": 1, "lr_scheduler_type": "cosine",
                 "warmup_ratio": 0.25, "group_by_visual_length": True,
                 "visual_length_cache": str(tmp_path / "cache")}  # fmt: skip
    reference = finetune(stage1(workspace, tmp_path / "reference", **overrides))
    assert len(reference.losses) == 8

    interrupted = tmp_path / "interrupted"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(asdict(stage1(workspace, interrupted, **overrides))), "5"],
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
             "OMP_NUM_THREADS": str(torch.get_num_threads())},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert [p.name for p in interrupted.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (interrupted / "config.json").exists()

    resumed = finetune(stage1(workspace, interrupted, resume=True, **overrides))
    # Two uninterrupted CPU runs already differ in the sixth digit now and then (multi-threaded kernels sum in
    # varying order), so losses match to 1e-5 and each tensor to 1e-5 of its largest magnitude.
    assert resumed.losses[-5:] == pytest.approx(reference.losses[-5:], rel=1e-5)
    expected = DoveLlavaForCausalLM.from_pretrained(tmp_path / "reference").state_dict()
    got = DoveLlavaForCausalLM.from_pretrained(interrupted).state_dict()
    assert expected.keys() == got.keys()
    lora_b = [k for k in expected if "lora_B" in k]
    assert lora_b and all(expected[k].abs().max() > 1e-3 for k in lora_b)  # trained away from peft's zeros
    for key in expected:
        scale = float(expected[key].abs().max())
        assert float((got[key] - expected[key]).abs().max()) <= 1e-5 * scale, key


def test_finetune_shows_progress_when_asked_and_writes_its_loss_curve(workspace, tmp_path, capsys):
    from PIL import Image

    from llava_adapter.train import LOSS_CURVE_FILE, build_training_arguments

    out = tmp_path / "run"
    result = finetune(stage1(workspace, out, max_steps=2, save_steps=None, group_by_visual_length=True,
                             visual_length_cache=str(tmp_path / "cache"), progress=True))  # fmt: skip
    err = capsys.readouterr().err
    assert "visual lengths" in err  # the tower's pass over the data
    assert "2/2" in err  # the Trainer's bar over the steps
    with Image.open(out / LOSS_CURVE_FILE) as image:
        assert image.format == "PNG" and image.width > 100
    assert len(result.losses) == 2
    # Not asked: a bar only on a terminal (pytest's captured stderr is not one), as the command's default.
    assert build_training_arguments(stage1(workspace, tmp_path / "x")).disable_tqdm is True
    assert build_training_arguments(stage1(workspace, tmp_path / "x", progress=True)).disable_tqdm is False
