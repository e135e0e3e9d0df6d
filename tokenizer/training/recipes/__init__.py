"""Training recipes: YAML files (`model:` + `train:`) that say how to train an architecture preset.

A recipe and the preset it trains may share a name (`dove-tiny`); the recipe names its preset in `model:`.
"""

from __future__ import annotations

from pathlib import Path

from ...modeling.presets import packaged_yaml_names, packaged_yaml_path

_RECIPE_PACKAGE = "tokenizer.training.recipes"


def available_recipes() -> list[str]:
    return packaged_yaml_names(_RECIPE_PACKAGE)


def recipe_path(name: str) -> Path:
    """The YAML file of a named training recipe; an unknown name lists the known ones."""
    return packaged_yaml_path(_RECIPE_PACKAGE, name, "training recipe")
