"""`plot_loss_curve`: the loss records of a training log as a PNG, nothing when there is nothing to draw."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tokenizer.evaluation.loss_curve import plot_loss_curve

TRAINER_LOG = [
    {"loss": 3.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.25, "step": 1},
    {"loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 2},
    {"loss": 1.5, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.75, "step": 3},
    {"train_runtime": 1.0, "train_loss": 2.2, "epoch": 1.0, "step": 3},
]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_a_trainer_log_becomes_a_png_that_depends_on_its_losses(tmp_path):
    first = plot_loss_curve(TRAINER_LOG, tmp_path / "a" / "loss.png", title="stage 1")
    assert first == tmp_path / "a" / "loss.png"
    rising = [{**r, "loss": 5.0 - r["loss"]} if "loss" in r else r for r in TRAINER_LOG]
    second = plot_loss_curve(rising, tmp_path / "b.png", title="stage 1")
    assert pixels(first).shape == pixels(second).shape
    assert not np.array_equal(pixels(first), pixels(second))
    # the run's summary (train_loss) is no point of the curve: leaving it out changes nothing
    without_summary = plot_loss_curve(TRAINER_LOG[:-1], tmp_path / "c.png", title="stage 1")
    assert np.array_equal(pixels(first), pixels(without_summary))


def test_several_losses_each_get_a_curve_and_keys_choose_them(tmp_path):
    log = [{"step": s, "loss": 1.0 / s, "recon_loss": 0.5 / s, "lr": 0.1} for s in range(1, 6)]
    both = pixels(plot_loss_curve(log, tmp_path / "both.png"))
    only = pixels(plot_loss_curve(log, tmp_path / "only.png", keys=["recon_loss"]))
    assert not np.array_equal(both, only)


def test_nothing_to_draw_writes_nothing(tmp_path):
    assert (
        plot_loss_curve([{"step": 1, "train_loss": 2.0}, {"loss": float("nan"), "step": 2}], tmp_path / "x.png") is None
    )
    assert not (tmp_path / "x.png").exists()
