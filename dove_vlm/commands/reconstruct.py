"""`dove-vlm reconstruct`: one grid of inputs, reconstructions per budget and at the automatic length."""

from __future__ import annotations

import argparse

from ._args import int_list, output_file


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reconstruct", help="reconstruct images at several token budgets")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="checkpoint dir, hub id or preset name")
    parser.add_argument("--budgets", type=int_list, default=[8, 16, 32], help="comma-separated token budgets")
    parser.add_argument("--query", default=None, help="Q-DOVE text query applied to every image")
    parser.add_argument("--threshold", type=float, default=None, help="EOS threshold (default: the model's)")
    parser.add_argument("--out", type=output_file, required=True, help="output PNG")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from tokenizer import DoveTokenizer
    from tokenizer.evaluation.visualize import save_reconstruction_grid

    model = DoveTokenizer.from_name(args.checkpoint).to(args.device).eval()
    for budget in args.budgets:
        if not 1 <= budget <= model.max_tokens:
            raise ValueError(f"--budgets: {budget} is outside [1, {model.max_tokens}] for this model")
    with torch.inference_mode():
        result = model.reconstruct(args.images, budgets=args.budgets, queries=args.query, threshold=args.threshold)
    path = save_reconstruction_grid(result, args.out)
    lengths = ", ".join(f"{image}: {int(n)}" for image, n in zip(args.images, result.auto_lengths))
    print(f"wrote {path} (automatic lengths: {lengths})")
    return 0
