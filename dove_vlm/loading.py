"""One way to name a tokenizer on the command line: a preset name, a local checkpoint dir or a hub id."""

from __future__ import annotations

from tokenizer import DoveTokenizer, available_presets


def load_tokenizer(name_or_path: str) -> DoveTokenizer:
    """A preset name builds a randomly initialised model; anything else loads a checkpoint."""
    presets = available_presets()
    if name_or_path in presets:
        return DoveTokenizer.from_preset(name_or_path)
    try:
        return DoveTokenizer.from_pretrained(name_or_path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}\n(not a preset either; known presets: {', '.join(presets)})") from err
