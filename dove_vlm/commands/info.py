"""`dove-vlm info`: a checkpoint's config and parameter counts."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="print a tokenizer's config and parameter counts")
    parser.add_argument("checkpoint", help="checkpoint dir, hub id or preset name")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tokenizer import DoveTokenizer

    model = DoveTokenizer.from_name(args.checkpoint)
    config = model.config
    print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
    print(
        f"latent grid: {config.grid_size}x{config.grid_size}x{config.latent_channels}; max tokens {config.max_tokens}"
    )
    for part, count in model.num_parameters_by_part().items():
        print(f"{part:>10}: {count:,} parameters")
    return 0
