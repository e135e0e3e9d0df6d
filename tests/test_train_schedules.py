"""The tokenizer loop's schedules: each starts where its part starts, and counts optimizer steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_training_helpers import make_shapes_data, write_config

from tokenizer.training.config import load_training_file
from tokenizer.training.loop import TokenizerTrainer, warmup_cosine


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_data(tmp_path_factory.mktemp("shapes"), n=16)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_discriminator_lr_warms_up_and_decays_from_its_start_step(tmp_path, shapes):
    config = write_config(
        tmp_path / "run.yaml", max_steps=20, warmup_steps=2, adversarial_start_step=8, min_lr_ratio=0.1,
        checkpoint_every=0,
    )  # fmt: skip
    trainer = TokenizerTrainer(load_training_file(config), shapes / "images", tmp_path / "run", progress=False)
    disc = trainer.disc_schedule.lr_lambdas[0]
    gen = trainer.gen_schedule.lr_lambdas[0]
    assert [disc(s) for s in (8, 9, 10)] == pytest.approx([0.5, 1.0, 1.0])  # warm-up from its first step
    assert disc(20) == pytest.approx(0.1)  # the cosine ends with the run
    assert disc(14) == pytest.approx(warmup_cosine(6, 2, 12, 0.1))
    assert all(disc(s) == 0.0 for s in range(8))  # nothing to schedule before it starts
    assert [gen(s) for s in (0, 1, 20)] == pytest.approx([0.5, 1.0, 0.1])  # the generator's runs from step 0


def test_length_history_counts_optimizer_steps(tmp_path, shapes):
    config = write_config(
        tmp_path / "run.yaml", max_steps=3, gradient_accumulation_steps=2, adversarial_start_step=100,
        checkpoint_every=0,
    )  # fmt: skip
    trainer = TokenizerTrainer(load_training_file(config), shapes / "images", tmp_path / "run", progress=False)
    trainer.train()
    assert len(trainer.objective.length_control.recorded) == 3  # one entry per optimizer step, not per micro-batch


def test_length_weight_ramp_starts_after_the_warmup_phases(tmp_path, shapes):
    config = write_config(
        tmp_path / "run.yaml", max_steps=6, vq_warmup_steps=2, full_length_steps=1, length_weight_start=0.01,
        length_weight_max=1.0, length_ramp_steps=2, adversarial_start_step=100, checkpoint_every=0, log_every=1,
    )  # fmt: skip
    trainer = TokenizerTrainer(load_training_file(config), shapes / "images", tmp_path / "run", progress=False)
    assert trainer.objective.length_control.weight_at(3) == pytest.approx(0.01)  # step 3: the first with length control
    trainer.train()
    weights = [record.get("length/weight") for record in history(tmp_path / "run")]
    assert weights[:3] == [None, None, None]  # VQ warm-up and full-length steps: no length control
    assert weights[3:] == pytest.approx([0.01, 0.505, 1.0])
