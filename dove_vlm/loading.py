"""One way to name a tokenizer on the command line: a preset name, a local checkpoint dir or a hub id."""

from __future__ import annotations

from tokenizer import DoveTokenizer, available_presets


def load_tokenizer(name_or_path: str) -> DoveTokenizer:
    """A preset name builds a randomly initialised model; anything else loads a checkpoint."""
    if name_or_path in available_presets():
        return DoveTokenizer.from_preset(name_or_path)
    return DoveTokenizer.from_pretrained(name_or_path)
