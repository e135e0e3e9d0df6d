"""Every `dove-vlm` command line in README.md and docs/*.md parses with the CLI's own argparse parser.

Lines are read from fenced code blocks (continuations joined, comments dropped, `&&` / `;` / `|` chains split);
a command is what follows `dove-vlm` (any path to the script) or `-m` / `--module dove_vlm.cli`. Nothing runs:
a renamed or removed option in the CLI shows up here as the doc line that still uses it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dove_vlm.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_SEPARATORS = {"&&", "||", ";", "|"}


def _logical_lines(block: str) -> list[tuple[int, str]]:
    """A code block's shell lines as (index of the first raw line, text), backslash continuations joined."""
    lines, current, start = [], "", 0
    for index, raw in enumerate(block.splitlines()):
        if not current:
            start = index
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1] + " "
            continue
        lines.append((start, current + raw))
        current = ""
    if current:
        lines.append((start, current))
    return lines


def _cli_arguments(words: list[str]) -> list[str] | None:
    """The arguments given to the dove-vlm CLI in one simple command, or None if it does not call it."""
    for index, word in enumerate(words):
        if Path(word).name == "dove-vlm":
            return words[index + 1 :]
        if word == "dove_vlm.cli" and index > 0 and words[index - 1] in ("-m", "--module"):
            return words[index + 1 :]
    return None


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) for every CLI call in the docs' code blocks; `where` is FILE:LINE."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in _FENCE.finditer(text):
            first_line = text.count("\n", 0, block.start(1)) + 1
            for index, line in _logical_lines(block.group(1)):
                where = f"{doc.relative_to(ROOT)}:{first_line + index}"
                try:
                    words = shlex.split(line, comments=True)
                except ValueError:  # not shell (a Python or YAML block)
                    continue
                command: list[str] = []
                for word in [*words, ";"]:
                    if word not in _SEPARATORS:
                        command.append(word)
                        continue
                    arguments = _cli_arguments(command)
                    if arguments is not None:
                        found.append((where, arguments))
                    command = []
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_cli_commands():
    """The extraction itself works: the README's and the guides' command blocks are found."""
    files = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "docs/finetuning.md", "docs/lmms_eval.md"} <= files, files
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.parametrize(("where", "arguments"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses(where, arguments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # output-path checks look at the docs' relative paths here, not in the checkout
    try:
        parsed = build_parser().parse_args(arguments)
    except SystemExit:
        pytest.fail(f"{where}: `dove-vlm {shlex.join(arguments)}` does not parse: {capsys.readouterr().err.strip()}")
    assert callable(parsed.handler), where
