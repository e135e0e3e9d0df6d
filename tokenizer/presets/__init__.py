"""Named architectures. Each preset is a YAML file beside this module holding `DoveConfig` fields.

The full-size presets follow the paper (aMUSEd-256 VQ: 256 px -> 16x16x64, 8192 codes; a Pythia
generator; 256 tokens). `dove-tiny` exists so that tests and the CPU demo run in seconds.
"""

from __future__ import annotations

from importlib import resources

import yaml

from ..config import DoveConfig

_PRESET_PACKAGE = "tokenizer.presets"


def available_presets() -> list[str]:
    files = resources.files(_PRESET_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def preset_config(name: str) -> DoveConfig:
    """The `DoveConfig` of a named preset; an unknown name lists the known ones."""
    known = available_presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    text = resources.files(_PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    data["preset"] = name
    return DoveConfig.from_dict(data)
