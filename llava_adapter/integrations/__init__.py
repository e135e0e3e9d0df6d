"""DOVE inside other codebases. Each integration imports its host package only when it is enabled."""

from .llava import DOVE_PREFIX, LLAVA_VERSION_TESTED, LlavaDoveVisionTower, enable_dove_in_llava, is_dove_vision_tower

__all__ = [
    "DOVE_PREFIX",
    "LLAVA_VERSION_TESTED",
    "LlavaDoveVisionTower",
    "enable_dove_in_llava",
    "is_dove_vision_tower",
]
