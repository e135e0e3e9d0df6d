"""`dove-vlm make-tiny-llm`: a small, randomly initialised LLaMA-style LLM and a tokenizer trained on the data.

The offline stand-in for a hub LLM (`Qwen/Qwen2.5-0.5B-Instruct`, `lmsys/vicuna-7b-v1.5`): the demo and
anyone without weights at hand get a directory `finetune --llm DIR` loads exactly as it loads a hub
model. The tokenizer is a byte-level BPE trained on the conversations' own text, with `<image>`, role
markers and a chat template, so stage 2 uses the chat-template path real instruction models take.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._args import output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-tiny-llm",
        help="build a random tiny LLM and train its tokenizer on LLaVA conversations (offline stand-in)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data", required=True, nargs="+", help="LLaVA conversation JSON file(s) to learn the vocabulary from"
    )
    parser.add_argument("--output", type=output_dir, required=True, help="directory for the model and its tokenizer")
    parser.add_argument("--arch", choices=("llama", "gpt_neox", "gpt2"), default="llama")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary size (default 512)")
    parser.add_argument("--max-positions", type=int, default=512, help="longest sequence, visual tokens included")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.set_defaults(handler=run)


def conversation_texts(paths: list[str]) -> list[str]:
    """Every turn of every conversation in the files, placeholders included (they become special tokens)."""
    texts: list[str] = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--data: {path} does not exist")
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--data: {path} is not valid JSON: {err}") from err
        if not isinstance(records, list):
            raise TypeError(f"--data: {path} must hold a JSON list of LLaVA records")
        for index, record in enumerate(records):
            turns = record.get("conversations") if isinstance(record, dict) else None
            if not isinstance(turns, list):
                raise TypeError(f"--data: {path} record {index} has no 'conversations' list")
            texts += [str(turn.get("value", "")) for turn in turns if isinstance(turn, dict)]
    if not texts:
        raise ValueError(f"--data: no conversation text in {', '.join(paths)}")
    return texts


def run(args: argparse.Namespace) -> int:
    for name in ("hidden", "layers", "heads", "vocab_size", "max_positions"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.hidden % args.heads:
        raise ValueError(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    texts = conversation_texts(args.data)

    import torch

    from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(texts, vocab_size=args.vocab_size)
    torch.manual_seed(args.seed)
    model = build_tiny_llm(
        tokenizer, arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
        max_positions=args.max_positions,
    )  # fmt: skip
    from tokenizer.hub import atomic_directory

    output = Path(args.output)
    with atomic_directory(output) as staging:  # replaces only these files; a kill leaves the old ones
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"tiny {args.arch} LLM: {parameters / 1e6:.2f} M parameters, hidden {args.hidden}, {args.layers} layers, "
        f"vocabulary {len(tokenizer)} (from {len(texts)} turns); saved to {output}"
    )
    return 0
