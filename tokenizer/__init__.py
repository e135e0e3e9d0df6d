"""DOVE / Q-DOVE: images to a variable number of continuous visual tokens, and back."""

from .config import DoveConfig
from .image_processing import DoveImageProcessor, ImageLoadError, load_image
from .modeling import CheckpointMismatchError, DoveEncoding, DoveTokenizer, Reconstruction
from .presets import available_presets, preset_config

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
