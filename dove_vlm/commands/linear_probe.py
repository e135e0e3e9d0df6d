"""`dove-vlm linear-probe`: logistic regression on frozen tokens, e.g. shapes scenes' object counts."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from ._args import output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "linear-probe",
        help="fit a linear classifier on frozen tokens (mean-pooled or at a fixed budget) and report accuracy",
        description="Labels come from a JSON list of records with `image_id`, the label field and optionally "
        "`split` (train/test), such as make-shapes' scenes.json (label n_objects). Without a split field the "
        "records are split at random (--test-fraction, --seed).",
    )
    parser.add_argument("--checkpoint", required=True, help="tokenizer dir or hub id")
    parser.add_argument("--images", required=True, help="folder holding the images the records name")
    parser.add_argument("--labels", required=True, help="JSON list of records (e.g. make-shapes' scenes.json)")
    parser.add_argument("--label-key", default="n_objects", help="record field to predict (default n_objects)")
    parser.add_argument("--features", choices=["mean", "budget"], default="mean",
                        help="mean of the tokens over the automatic length, or the first --budget tokens concatenated")  # fmt: skip
    parser.add_argument("--budget", type=int, default=None, help="token budget for --features budget")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=output_file, help="write the result as JSON here")
    parser.set_defaults(handler=run)


def load_records(path: Path, label_key: str) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of records")
    for index, record in enumerate(records):
        for key in ("image_id", label_key):
            if not isinstance(record, dict) or key not in record:
                raise ValueError(f"{path}: record {index} has no field {key!r}")
    return records


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from tokenizer import DoveTokenizer
    from tokenizer.evaluation.probe import fit_linear_probe, token_features
    from tokenizer.training.data import list_images

    records = load_records(Path(args.labels), args.label_key)
    by_stem = {p.stem: p for p in list_images(args.images)}
    by_name = {p.name: p for p in by_stem.values()}
    paths = []
    for index, record in enumerate(records):
        image_id = str(record["image_id"])
        path = by_name.get(image_id) or by_stem.get(image_id)
        if path is None:
            raise ValueError(f"{args.labels}: record {index}: no image {image_id!r} in {args.images}")
        paths.append(path)
    if all("split" in r for r in records):
        splits = [r["split"] for r in records]
    else:
        rng = random.Random(args.seed)
        splits = ["test" if rng.random() < args.test_fraction else "train" for _ in records]
    model = DoveTokenizer.from_pretrained(args.checkpoint).to(args.device).eval()
    features = []
    for start in tqdm(range(0, len(paths), args.batch_size), desc="linear-probe", unit="batch", disable=None):
        pixels = model.pixels([str(p) for p in paths[start : start + args.batch_size]])
        features.append(token_features(model, pixels, args.features, args.budget).cpu())
    x = torch.cat(features)
    labels = [r[args.label_key] for r in records]
    train = [i for i, s in enumerate(splits) if s != "test"]
    test = [i for i, s in enumerate(splits) if s == "test"]
    result = fit_linear_probe(x[train], [labels[i] for i in train], x[test], [labels[i] for i in test])
    summary = {
        "features": args.features if args.features == "mean" else f"budget {args.budget}",
        "label": args.label_key,
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "majority_baseline": result.majority_accuracy,
        "classes": [str(c) for c in result.classes],
        "n_train": result.n_train,
        "n_test": result.n_test,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0
