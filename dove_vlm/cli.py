"""The `dove-vlm` command. Each sub-command lives in `dove_vlm/commands/<name>.py` and exposes
`register(subparsers)`; modules are discovered, so adding a command touches no shared file.
Command modules import torch and friends inside their handlers, so `--help` and light commands start fast."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

from . import commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dove-vlm", description="DOVE / Q-DOVE variable-length visual tokens for LLaVA-style VLMs"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (FileNotFoundError, ValueError, TypeError) as err:
        print(f"dove-vlm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
