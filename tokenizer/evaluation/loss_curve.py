"""A training run's loss curve as a PNG, from the log records it already keeps.

One function for both training loops: the fine-tuning run passes the HF Trainer's `state.log_history`
(records like `{"loss": 2.31, "step": 10, "epoch": 0.5, ...}`); the tokenizer loop can pass its own logged
records the same way. Light to import (matplotlib loads inside the call).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

LOSS_CURVE_FILE = "loss_curve.png"  # the name both training loops give their curve


def plot_loss_curve(
    history: Iterable[Mapping[str, Any]],
    path: str | os.PathLike,
    keys: Sequence[str] | None = None,
    step_key: str = "step",
    title: str | None = None,
) -> Path | None:
    """Draw each loss in `history` against `step_key` and save the figure to `path`; returns the path, or None
    when no record holds a finite loss (nothing is written then).

    `keys` names the curves; by default every numeric key whose name contains "loss" (the Trainer's `loss`,
    a tokenizer loop's `loss`, `recon_loss`, ...). Records without `step_key` are skipped; so are a run's
    summary records (the Trainer's final `train_loss` carries a step but is not a point of the curve, so
    `train_loss` is left out unless asked for).
    """
    records = [r for r in history if isinstance(r.get(step_key), (int, float))]
    if keys is None:
        found: dict[str, None] = {}
        for record in records:
            for key, value in record.items():
                if "loss" in key and key != "train_loss" and _finite(value):
                    found[key] = None
        keys = list(found)
    curves = {}
    for key in keys:
        points = [(float(r[step_key]), float(r[key])) for r in records if _finite(r.get(key))]
        if points:
            curves[key] = points
    if not curves:
        return None

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 3.6))
    for key, points in curves.items():
        steps, values = zip(*points)
        axis.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
    axis.set_xlabel(step_key)
    axis.set_ylabel("loss")
    if title:
        axis.set_title(title)
    axis.grid(alpha=0.3)
    if len(curves) > 1:
        axis.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
