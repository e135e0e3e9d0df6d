"""Argument parsers shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path


def int_list(text: str) -> list[int]:
    """'8,16,32' -> [8, 16, 32], with an argparse error naming the bad item."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not an integer (expected a list like 8,16,32)") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, like 8,16,32")
    return values


def output_dir(text: str) -> str:
    """An output folder: an existing file there (or above it) is an argparse error naming the option,
    instead of a NotADirectoryError traceback once the run has started."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a directory")
    _check_parents(path)
    return text


def output_file(text: str) -> str:
    """An output file: an existing folder of that name is an argparse error naming the option (not IsADirectoryError)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name (e.g. {path / 'out.png'})")
    _check_parents(path)
    return text


def _check_parents(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {path} cannot be created under it")
            return


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """`--dtype` as every command that loads a VLM for answering takes it."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="the LLM's dtype (default auto: bfloat16 on a GPU, float32 on the CPU); the tower stays float32",
    )
