"""The DeepSpeed ZeRO configs `finetune --deepspeed` accepts by name (`zero2`, `zero3`, `zero3_offload`).

They ship inside the package, so a name works wherever dove-vlm is installed; any other value is a path
to a JSON file of the user's own.
"""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def packaged_configs() -> list[str]:
    """The names of the configs shipped with the package."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def resolve_deepspeed_config(name_or_path: str | os.PathLike) -> Path:
    """A packaged config's name (`zero2`, with or without `.json`) or a path -> the JSON file's path."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{str(name_or_path).removesuffix('.json')}.json"
    if os.sep not in str(name_or_path) and packaged.is_file():
        return packaged
    raise FileNotFoundError(
        f"DeepSpeed config not found: {name_or_path} is neither a file nor a packaged config "
        f"({', '.join(packaged_configs())})"
    )
