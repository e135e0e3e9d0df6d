"""Argument parsers shared by several commands."""

from __future__ import annotations

import argparse


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
