"""The method works: a short CPU run of the real training loop on shapes scenes.

- the reconstruction loss falls clearly;
- on held-out scenes the automatic length rises with the object count (the mean length with each extra
  object, and Spearman >= 0.35);
- held-out scenes reconstruct better, on average, from all their tokens than from one;
- with a Q-DOVE question about a single object the mean automatic length is below that with no question,
  under the paper's loss (the default) and under `region_loss: weighted_mean` alike.

Backgrounds are plain here, so a scene's complexity is its object count (a textured background adds
detail that no object count measures). One training run serves all four checks.

The model is the tests' micro architecture with an 8x8 latent grid, continuous latents and a 64-wide
generator: with a 4x4 grid the VQ itself reconstructs barely better than the mean image, so no number
of tokens can do better, and a 32-wide one-layer generator does not separate simple scenes from busy
ones within the step budget. There is no pretrained VQ at this size, so the run starts with a VQ
warm-up (the autoencoder alone), then keeps the VQ encoder fixed as DOVE does with aMUSEd's.

Three choices make the question's effect measurable rather than saturated. Tokens are 4-wide (the demo's
are 16), so that a few tokens cannot carry a whole scene and spending them on the asked object can pay.
Objects are drawn at twice the default size: at 32 px the default objects are 6-10 px, under three 4-px
latent cells, and the VQ's own error inside their boxes is then about as large as a one-token
reconstruction's, so no conditioning can improve a box. Every training sample draws its length uniformly
(`uniform_length_fraction` 1.0) so that every prefix length learns to decode, not only the short ones the
EOS head picks early on. The box error at forced lengths, with and without the question, is printed
beside the lengths (docs/benchmarks.md records both losses).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from scipy.stats import spearmanr
from tokenizer_training_helpers import make_shapes_data

from dove_vlm.demo import DEMO_TOKENIZER_MODEL
from tokenizer import DoveTokenizer
from tokenizer.training.config import parse_training_setup
from tokenizer.training.data import build_dataset
from tokenizer.training.loop import train_tokenizer

# The demo's tokenizer with narrower tokens (see the module docstring).
METHOD_MODEL = copy.deepcopy(DEMO_TOKENIZER_MODEL)
METHOD_MODEL["overrides"]["token_dim"] = 4
# Objects at twice the default size, so the VQ resolves them (see the module docstring).
METHOD_OBJECT_SCALE = 2.0

METHOD_TRAIN = {
    "max_steps": 1400,
    "vq_warmup_steps": 400,
    "batch_size": 16,
    "warmup_steps": 20,
    "min_lr_ratio": 0.3,
    "lr_vq": 3e-3,
    "lr_generator": 3e-3,
    "lr_decoder": 3e-3,
    "freeze_vq_encoder": True,
    "latent_weight": 1.0,
    "adversarial_weight": 0.0,
    "length_weight_start": 0.01,
    "length_weight_max": 1.0,
    "length_ramp_steps": 300,
    "uniform_length_fraction": 1.0,
    "log_every": 5,
    "grid_every": 0,
    "checkpoint_every": 0,
    "num_workers": 0,
    "tracker": "none",
    "torch_threads": 2,
}
# The Q-DOVE loss to train with: the default (the paper's), or DOVE_METHOD_REGION_LOSS=weighted_mean for the
# alternative at its lambda of 0.1 (docs/benchmarks.md compares the two).
REGION_LOSS = os.environ.get("DOVE_METHOD_REGION_LOSS", "paper")
if REGION_LOSS == "weighted_mean":
    METHOD_TRAIN.update(region_loss="weighted_mean", region_lambda=0.1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("method")
    data = make_shapes_data(root / "shapes", n=500, seed=0, textured_fraction=0.0, object_scale=METHOD_OBJECT_SCALE)
    setup = parse_training_setup({"model": METHOD_MODEL, "train": METHOD_TRAIN}, where="method test")
    torch.manual_seed(0)
    summary = train_tokenizer(
        setup, data / "images", root / "run", annotations=data / "train" / "annotations.json", progress=False
    )
    model = DoveTokenizer.from_pretrained(summary.final_dir).eval()
    return data, summary, model


@pytest.mark.slow
def test_reconstruction_loss_falls_clearly(trained):
    _, summary, _ = trained
    losses = [r["loss/reconstruction"] for r in summary.history if "loss/reconstruction" in r]
    first, last = sum(losses[:2]) / 2, sum(losses[-10:]) / 10
    print(f"reconstruction loss: first logged {first:.4f}, last 10 logged {last:.4f}")
    assert last < 0.6 * first, (first, last)


def _held_out(data: Path) -> list[dict]:
    return [s for s in json.loads((data / "scenes.json").read_text()) if s["split"] == "test"]


@pytest.mark.slow
def test_automatic_length_rises_with_object_count(trained):
    data, _, model = trained
    scenes = _held_out(data)
    with torch.no_grad():
        lengths = model.encode([str(data / "images" / f"{s['image_id']}.png") for s in scenes]).lengths
    counts = [s["n_objects"] for s in scenes]
    rho = spearmanr(counts, lengths.tolist()).correlation
    by_count = {
        c: sum(float(length) for n, length in zip(counts, lengths) if n == c) / counts.count(c)
        for c in sorted(set(counts))
    }
    print(f"held-out Spearman(object count, automatic length) = {rho}; mean length by count {by_count}")
    # The same seeds gave rho 0.62 on one 2-core machine and 0.42 (means 1.9 / 2.8 / 3.1 / 5.2 tokens for 1-4
    # objects) on another: float rounding differs between CPUs and a short run amplifies it. What holds on
    # both: every extra object costs tokens on average, and the correlation is clearly positive.
    means = [by_count[c] for c in sorted(by_count)]
    assert all(a < b for a, b in itertools.pairwise(means)), (rho, by_count)
    assert rho >= 0.35, (rho, by_count)


@pytest.mark.slow
def test_single_object_question_needs_fewer_tokens(trained):
    data, _, model = trained
    records = json.loads((data / "test" / "annotations.json").read_text())
    single = [r for r in records if len(r["bounding_box"]) == 1]
    images = [str(data / "images" / f"{r['image_id']}.png") for r in single]
    with torch.no_grad():
        with_query = model.encode(images, queries=[r["question"] for r in single]).lengths.float().mean()
        without = model.encode(images).lengths.float().mean()
    print(
        f"{len(single)} single-object questions: mean length {float(with_query):.2f} with, {float(without):.2f} without"
    )
    print("box MSE at a forced length, with / without the question:", _box_errors(model, data, single))
    assert with_query < without, (float(with_query), float(without))


def _box_errors(model: DoveTokenizer, data: Path, records: list[dict]) -> dict[int, tuple[float, float]]:
    """Mean squared error inside the question's box at 1, 2, 4 and N tokens, with and without the question:
    what focusing the tokens on the box gains (docs/benchmarks.md)."""
    asked = {(f"{r['image_id']}.png", r["question"]) for r in records}
    dataset = build_dataset(data / "images", data / "test" / "annotations.json", image_size=model.config.image_size)
    items = [item for item in dataset if (Path(item["source"]).name, item["query"]) in asked]
    pixels = torch.stack([item["pixels"] for item in items])
    boxes = torch.stack([item["relevance"] for item in items])
    errors = {}
    with torch.no_grad():
        for budget in sorted({1, 2, 4, model.max_tokens}):
            pair = []
            for queries in ([item["query"] for item in items], None):
                encoding = model.encode(pixels, queries=queries, budget=budget)
                squared = (model.decode(encoding.tokens, encoding.lengths) - pixels).pow(2).mean(dim=1, keepdim=True)
                pair.append(round(float(((squared * boxes).sum() / boxes.sum()).item()), 4))
            errors[budget] = tuple(pair)
    return errors


@pytest.mark.slow
def test_more_tokens_reconstruct_held_out_scenes_better(trained):
    """DOVE's premise: a longer token sequence reconstructs better. The held-out whole-image MSE at the full length
    is below that at one token, and most scenes are better at the full length. The margin is small because at
    this size the VQ caps the quality (docs/benchmarks.md): 0.0274 at one token and 0.0260 at eight on one
    machine, 0.02736 and 0.02691 (62% of scenes better) on another, from the same seeds."""
    data, _, model = trained
    pixels = torch.stack(
        [model.image_processor.preprocess(str(data / "images" / f"{s['image_id']}.png"))["pixel_values"][0]
         for s in _held_out(data)]
    )  # fmt: skip
    errors = {}
    with torch.no_grad():
        for budget in (1, 2, 4, model.max_tokens):
            encoding = model.encode(pixels, budget=budget)
            recon = model.decode(encoding.tokens, encoding.lengths)
            errors[budget] = (recon - pixels).pow(2).flatten(1).mean(1)
    means = {budget: round(float(e.mean()), 5) for budget, e in errors.items()}
    better = float((errors[model.max_tokens] < errors[1]).float().mean())
    print(f"held-out whole-image MSE by forced length {means}; share of scenes better at full length {better:.2f}")
    assert means[model.max_tokens] < 0.99 * means[1], means
    assert better > 0.55, (better, means)
