"""`dove-vlm make-shapes`: write a procedural shapes-VQA dataset (images, Q-DOVE, LLaVA and parquet splits)."""

from __future__ import annotations

import argparse
import time

from ..shapes import QUESTION_TYPES, ShapesArgumentError, make_shapes
from ._args import output_dir


def _type_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-shapes",
        help="generate a shapes-VQA dataset",
        description="Generate scenes of coloured shapes with questions, boxes and complexity scores.",
    )
    parser.add_argument(
        "--out", type=output_dir, required=True, help="output directory (replaced; must be empty or an earlier output)"
    )
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True, help="random seed (same seed, same bytes)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--max-objects", type=int, default=5, help="objects per scene: 1 to this (default 5)")
    parser.add_argument("--questions-per-image", type=int, default=3, help="questions per image (default 3)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of images held out (default 0.2)")
    parser.add_argument(
        "--textured-fraction", type=float, default=0.3, help="share of scenes on a textured background (default 0.3)"
    )
    parser.add_argument(
        "--question-types",
        type=_type_list,
        default=None,
        help=f"comma-separated subset of {','.join(QUESTION_TYPES)} (default: all)",
    )
    parser.add_argument(
        "--object-scale",
        type=float,
        default=1.0,
        help="multiplies every object size (small/medium/large: 0.15/0.22/0.30 of the side); default 1",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        summary = make_shapes(
            args.out,
            n=args.n,
            seed=args.seed,
            image_size=args.image_size,
            max_objects=args.max_objects,
            questions_per_image=args.questions_per_image,
            test_fraction=args.test_fraction,
            textured_fraction=args.textured_fraction,
            question_types=args.question_types,
            object_scale=args.object_scale,
            progress=not args.no_progress,
        )
    except ShapesArgumentError as err:
        flag = "--out" if err.argument == "out_dir" else "--" + err.argument.replace("_", "-")
        raise ValueError(f"{flag} {err.reason}") from None
    seconds = time.perf_counter() - start
    types = ", ".join(f"{name} {count}" for name, count in summary.question_type_counts.items())
    print(
        f"wrote {summary.n_images} images ({summary.n_train_images} train, {summary.n_test_images} test) and "
        f"{summary.n_questions['train']} + {summary.n_questions['test']} questions ({types}) "
        f"to {summary.out_dir} in {seconds:.1f} s"
    )
    return 0
