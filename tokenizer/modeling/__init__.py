"""The model: a VQ encoder, a causal token generator with an EOS head, a prefix decoder, and their config.

`DoveTokenizer` (dove_tokenizer.py) ties the parts together; everything a checkpoint needs to load
lives in this subpackage, so inference never imports the training code.
"""

from ..hub import CheckpointMismatchError
from .config import DoveConfig
from .dove_tokenizer import DoveEncoding, DoveTokenizer, Reconstruction
from .image_processing import DoveImageProcessor, ImageLoadError, load_image
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
