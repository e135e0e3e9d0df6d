"""dove-vlm: DOVE / Q-DOVE variable-length visual tokens as a vision tower for LLaVA-style VLMs.

The public names are re-exported lazily so that light commands (`dove-vlm make-shapes`) do not pay
for importing torch, transformers and diffusers. For the same reason `import dove_vlm` alone does not
register the VLM with transformers' auto classes: `import llava_adapter` (or `from dove_vlm import
DoveLlavaForCausalLM`) does, after which `AutoModelForCausalLM` / `AutoProcessor.from_pretrained(dir)` work.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointMismatchError": "tokenizer",
    "DoveConfig": "tokenizer",
    "DoveEncoding": "tokenizer",
    "DoveImageProcessor": "tokenizer",
    "DoveLlavaForCausalLM": "llava_adapter",
    "DoveLlavaProcessor": "llava_adapter",
    "DoveTokenizer": "tokenizer",
    "ImageLoadError": "tokenizer",
    "Reconstruction": "tokenizer",
    "available_presets": "tokenizer",
    "preset_config": "tokenizer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dove_vlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
