"""Named architectures. Each preset is a YAML file beside this module holding `DoveConfig` fields.

The full-size presets follow the paper (aMUSEd-256 VQ: 256 px -> 16x16x64, 8192 codes; a Pythia
generator; 256 tokens). `dove-tiny` exists so that tests and the CPU demo run in seconds. Training
recipes (`tokenizer.training.recipes`) are a different thing: how to train one of these.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from ..config import DoveConfig

_PRESET_PACKAGE = "tokenizer.modeling.presets"


def packaged_yaml_names(package: str) -> list[str]:
    """The names of the `NAME.yaml` files shipped inside `package` (presets, recipes)."""
    files = resources.files(package).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def packaged_yaml_path(package: str, name: str, kind: str) -> Path:
    """The path of `package`'s `NAME.yaml`; an unknown name lists the known ones under `kind`."""
    known = packaged_yaml_names(package)
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(known)}")
    return Path(str(resources.files(package).joinpath(f"{name}.yaml")))


def available_presets() -> list[str]:
    return packaged_yaml_names(_PRESET_PACKAGE)


def preset_config(name: str) -> DoveConfig:
    """The `DoveConfig` of a named preset; an unknown name lists the known ones."""
    data = yaml.safe_load(packaged_yaml_path(_PRESET_PACKAGE, name, "preset").read_text())
    data["preset"] = name
    return DoveConfig.from_dict(data)
