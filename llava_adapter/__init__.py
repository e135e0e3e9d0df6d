"""DOVE as a LLaVA vision tower: the tower, projectors, the VLM over any causal LM, conversations, inference.

Importing this package registers the VLM with transformers' auto classes (`AutoConfig`, `AutoModelForCausalLM`,
`AutoImageProcessor`, `AutoProcessor`), so saved directories open through them.
"""

from .constants import IGNORE_INDEX, IMAGE_TOKEN
from .conversation import (
    ConversationError,
    add_image_token,
    build_generation_prompt,
    conversation_query,
    tokenize_conversation,
    tokenize_generation_prompt,
)
from .inference import Answer, answer_questions, load_pretrained_model, score_continuations
from .modeling import DoveLlavaConfig, DoveLlavaForCausalLM, TruncationWarning, register_auto_classes
from .processing import DoveLlavaImageProcessor, DoveLlavaProcessor
from .projectors import build_projector, load_projector_weights
from .vision_tower import DoveVisionTower

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "Answer",
    "ConversationError",
    "DoveLlavaConfig",
    "DoveLlavaForCausalLM",
    "DoveLlavaImageProcessor",
    "DoveLlavaProcessor",
    "DoveVisionTower",
    "TruncationWarning",
    "add_image_token",
    "answer_questions",
    "build_generation_prompt",
    "build_projector",
    "conversation_query",
    "load_pretrained_model",
    "load_projector_weights",
    "register_auto_classes",
    "score_continuations",
    "tokenize_conversation",
    "tokenize_generation_prompt",
]
