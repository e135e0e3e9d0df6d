"""DOVE inside LLaVA's own codebase (haotian-liu/LLaVA, the `llava` package PyPI ships as `llava-torch`).

One call, before LLaVA builds or loads a model, and `--vision_tower dove:<checkpoint>` does the rest:

    from llava_adapter.integrations import enable_dove_in_llava
    enable_dove_in_llava()
    # LLaVA's own code from here on: initialize_vision_modules, load_pretrained_model, generate ...
    output_ids = model.generate(input_ids, images=images, queries=["What colour is the cup?"], ...)

This is a run-time patch of LLaVA's classes and functions, tested with llava-torch 1.2.2.post1
(`LLAVA_VERSION_TESTED`); nothing of LLaVA's code is copied. It has to be a patch because LLaVA has no
extension point for any of the three things DOVE needs:
- `multimodal_encoder.builder.build_vision_tower` knows CLIP only (a path, or a name starting with
  openai/laion) and refuses the rest; it is wrapped so DOVE names build a `LlavaDoveVisionTower` and every
  other name still goes to LLaVA's builder. A DOVE name is `dove:` followed by a DOVE checkpoint dir, hub id
  or preset; a bare preset name or a local dir whose config.json is a DOVE config works without the prefix.
- `LlavaMetaForCausalLM.encode_images` applies `mm_projector` to one tensor, but every DOVE image has its
  own number of tokens, so the tower returns a list of `[L_i, D]` tensors; with a DOVE tower it projects
  per image and hands LLaVA that list, which its `prepare_inputs_labels_for_multimodal` splices, pads and
  masks (labels) at each image's own length. That function is wrapped only to turn LLaVA's other image
  layouts (a list of single images, `[B, 1, 3, S, S]`) into the one batch DOVE takes; several images per
  sample (anyres tiles) have no meaning for grid-free DOVE tokens and are refused with a clear error.
- LLaVA's `forward`/`generate` have no slot for the question, so Q-DOVE would silently run without it.
  Each LLaVA causal-LM class's `forward` and `generate` take a `queries=` keyword: one question per image
  (per sample: LLaVA's batch holds one image per sample), None for none, cleaned as our own VLM cleans them
  (`<image>` placeholders and answer-format instructions removed). It is handed to the tower for that call
  only. A tower built with `use_query=False` ignores it. The same wrapper lets LLaVA's `forward` take the
  KV cache under transformers 5's name (`cache`), without which LLaVA's own `generate()` fails there.
Towers other than DOVE, and calls without `queries`, take LLaVA's own code paths unchanged. The call is
idempotent; LLaVA causal-LM classes defined after it (a fork's own) get `queries=` by calling it again.
`llava` is imported only here, inside the call, so `llava_adapter` imports without it.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tokenizer import DoveConfig, available_presets

from ..conversation import tower_query
from ..vision_tower import DoveVisionTower

LLAVA_VERSION_TESTED = "1.2.2.post1"
DOVE_PREFIX = "dove:"
_QUERIES = "_dove_queries"  # the per-call slot on a LLaVA model instance
_PATCHED = "_dove_patched"
_GENERATION_ONLY = ("cache_position", "logits_to_keep")


def is_dove_vision_tower(name: Any) -> bool:
    """Whether a `--vision_tower` value names DOVE: the `dove:` prefix, a preset, or a dir with a DOVE config."""
    if not isinstance(name, str):
        return False
    return name.startswith(DOVE_PREFIX) or name in available_presets() or _is_dove_checkpoint_dir(name)


class LlavaDoveVisionTower(DoveVisionTower):
    """`DoveVisionTower` with the constructor LLaVA's builder calls: `(vision_tower, args=..., delay_load=...)`.

    `vision_tower` is the `--vision_tower` value (the `dove:` prefix is optional). As with LLaVA's CLIP tower,
    `delay_load=True` reads only the config (the weights come with `load_model()`, as LLaVA's
    `load_pretrained_model` does) unless `args.unfreeze_mm_vision_tower` asks for a trainable tower now.
    `options` (`trainable`, `use_query`, `threshold`, `budget`) go to `DoveVisionTower`; after building,
    they can also be set as the tower's attributes.
    """

    def __init__(self, vision_tower: str, args: Any = None, delay_load: bool = False, **options: Any) -> None:
        source = vision_tower[len(DOVE_PREFIX) :] if vision_tower.startswith(DOVE_PREFIX) else vision_tower
        if not source.strip():
            raise ValueError(
                f"--vision_tower {vision_tower!r} names no DOVE checkpoint; expected {DOVE_PREFIX}<dir, hub id or preset>"
            )
        delay_load = delay_load and not getattr(args, "unfreeze_mm_vision_tower", False)
        super().__init__(source.strip(), delay_load=delay_load, **options)
        self.llava_vision_tower = vision_tower


def enable_dove_in_llava() -> None:
    """Make the installed LLaVA build DOVE from `--vision_tower dove:...` and pass `queries=` to it.

    Raises ImportError naming the install command when `llava` is missing.
    """
    try:
        import llava.model  # noqa: F401  (defines LLaVA's causal-LM classes)
        from llava.model import llava_arch
        from llava.model.multimodal_encoder import builder
    except ImportError as err:
        raise ImportError(
            f"enable_dove_in_llava needs LLaVA's `llava` package: pip install --no-deps llava-torch=={LLAVA_VERSION_TESTED} "
            f"(without its dependencies: its pins would replace this environment's torch and transformers); {err}"
        ) from err

    # llava_arch imported the builder function by name, so both references are replaced.
    wrapped_builder = _wrap_once(builder.build_vision_tower, _building_dove)
    builder.build_vision_tower = wrapped_builder
    llava_arch.build_vision_tower = wrapped_builder

    meta = llava_arch.LlavaMetaForCausalLM
    meta.encode_images = _wrap_once(meta.encode_images, _encoding_per_image)
    meta.prepare_inputs_labels_for_multimodal = _wrap_once(
        meta.prepare_inputs_labels_for_multimodal, _one_batch_of_images
    )
    for cls in _subclasses(meta):
        for name in ("forward", "generate"):
            if name in cls.__dict__:
                setattr(cls, name, _wrap_once(cls.__dict__[name], _taking_queries))


# ---------------------------------------------------------------------------------------------- the wrappers


def _wrap_once(function: Callable, make_wrapper: Callable[[Callable], Callable]) -> Callable:
    if getattr(function, _PATCHED, False):
        return function
    wrapper = make_wrapper(function)
    setattr(wrapper, _PATCHED, True)
    return wrapper


def _building_dove(original: Callable) -> Callable:
    @functools.wraps(original)
    def build_vision_tower(vision_tower_cfg: Any, **kwargs: Any) -> Any:
        name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
        if is_dove_vision_tower(name):
            return LlavaDoveVisionTower(name, args=vision_tower_cfg, **kwargs)
        return original(vision_tower_cfg, **kwargs)

    return build_vision_tower


def _encoding_per_image(original: Callable) -> Callable:
    @functools.wraps(original)
    def encode_images(self: Any, images: torch.Tensor) -> Any:
        tower = self.get_model().get_vision_tower()
        if not isinstance(tower, DoveVisionTower):
            return original(self, images)
        features = tower(images, queries=self.__dict__.get(_QUERIES))
        projector = self.get_model().mm_projector
        weight = next(projector.parameters(), None)
        if weight is not None:
            features = [feature.to(weight.dtype) for feature in features]
        # The projector works token by token, so one call over all images' tokens equals one call per image.
        projected = projector(torch.cat(features, dim=0))
        return list(projected.split([feature.shape[0] for feature in features], dim=0))

    return encode_images


def _one_batch_of_images(original: Callable) -> Callable:
    @functools.wraps(original)
    def prepare_inputs_labels_for_multimodal(
        self: Any,
        input_ids: Any,
        position_ids: Any,
        attention_mask: Any,
        past_key_values: Any,
        labels: Any,
        images: Any,
        image_sizes: Any = None,
    ) -> Any:
        if images is not None and isinstance(self.get_vision_tower(), DoveVisionTower):
            images = _single_images_batch(images)
        return original(self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes)

    return prepare_inputs_labels_for_multimodal


def _taking_queries(original: Callable) -> Callable:
    accepted = inspect.signature(original).parameters

    @functools.wraps(original)
    def method(self: Any, *args: Any, queries: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        if "cache" in kwargs and "cache" not in accepted:
            # transformers 5's generate passes the KV cache as `cache`; LLaVA's forward predates it and takes
            # `past_key_values`. `cache_position` / `logits_to_keep` it has no slot for either; LLaMA's
            # forward derives the same values itself.
            kwargs["past_key_values"] = kwargs.pop("cache")
        for name in _GENERATION_ONLY:
            if name in kwargs and name not in accepted:
                kwargs.pop(name)
        if queries is None:  # also the calls generate makes to forward: the outer call's queries stay in place
            return original(self, *args, **kwargs)
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"queries must be a list with one question (or None) per image, got {type(queries).__name__}")
        previous = self.__dict__.get(_QUERIES)
        self.__dict__[_QUERIES] = [None if query is None else tower_query(query) or None for query in queries]
        try:
            return original(self, *args, **kwargs)
        finally:
            self.__dict__[_QUERIES] = previous

    method.__signature__ = _with_queries(inspect.signature(original))
    return method


# ---------------------------------------------------------------------------------------------- internals


def _with_queries(signature: inspect.Signature) -> inspect.Signature:
    """The wrapped method's signature plus `queries`, so code that inspects `forward` (Trainer) sees it."""
    parameters = list(signature.parameters.values())
    queries = inspect.Parameter("queries", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    return signature.replace(parameters=[*parameters[:at], queries, *parameters[at:]])


def _single_images_batch(images: Any) -> torch.Tensor:
    """LLaVA's image layouts -> one [B, 3, S, S] batch (one image per sample), or an error naming the sample."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return images
    if isinstance(images, torch.Tensor) and images.ndim == 5:
        images = list(images)
    if not isinstance(images, (list, tuple)) or not all(isinstance(image, torch.Tensor) for image in images):
        raise TypeError(f"images must be a tensor or a list of tensors, got {type(images).__name__}")
    batch = []
    for index, image in enumerate(images):
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim != 3:
            raise ValueError(
                f"images[{index}] holds {tuple(image.shape)}: a DOVE vision tower takes one image per sample "
                "([3, S, S]); several images or anyres tiles per sample have no meaning for grid-free DOVE tokens "
                "(use image_aspect_ratio 'pad' or the processor's default)"
            )
        batch.append(image)
    return torch.stack(batch, dim=0)


def _is_dove_checkpoint_dir(name: str) -> bool:
    path = Path(name).expanduser() / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or "vq" not in data or "generator" not in data:
        return False
    try:
        DoveConfig.load(path)
    except (ValueError, TypeError):
        return False
    return True


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found
