"""dove-vlm: DOVE / Q-DOVE variable-length visual tokens as a vision tower for LLaVA-style VLMs."""

from tokenizer import (
    CheckpointMismatchError,
    DoveConfig,
    DoveEncoding,
    DoveImageProcessor,
    DoveTokenizer,
    ImageLoadError,
    Reconstruction,
    available_presets,
    preset_config,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "DoveConfig",
    "DoveEncoding",
    "DoveImageProcessor",
    "DoveTokenizer",
    "ImageLoadError",
    "Reconstruction",
    "available_presets",
    "preset_config",
]
