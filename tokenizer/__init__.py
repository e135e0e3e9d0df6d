"""DOVE / Q-DOVE: images to a variable number of continuous visual tokens, and back.

Layout: `modeling/` is the model and all that loading it needs, `training/` trains it, `evaluation/`
measures it; `hub.py` is the atomic, verified file I/O that all three and the VLM share.
"""

from .modeling import (
    CheckpointMismatchError,
    DoveConfig,
    DoveEncoding,
    DoveImageProcessor,
    DoveTokenizer,
    ImageLoadError,
    Reconstruction,
    available_presets,
    load_image,
    preset_config,
)

__all__ = [
    "CheckpointMismatchError",
    "DoveConfig",
    "DoveEncoding",
    "DoveImageProcessor",
    "DoveTokenizer",
    "ImageLoadError",
    "Reconstruction",
    "available_presets",
    "load_image",
    "preset_config",
]
