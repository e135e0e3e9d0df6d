"""`dove-vlm merge-lora`: fold a saved model's LoRA adapter into its LLM and save a standalone copy."""

from __future__ import annotations

import argparse

from ._args import output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge-lora", help="merge a LoRA adapter into the LLM weights")
    parser.add_argument("--model", required=True, help="saved DOVE VLM directory (or hub id) holding an adapter")
    parser.add_argument("--output", type=output_dir, required=True, help="directory for the merged model")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llava_adapter.lora import merge_lora_checkpoint

    path = merge_lora_checkpoint(args.model, args.output)
    print(f"merged the adapter of {args.model} into {path}")
    return 0
