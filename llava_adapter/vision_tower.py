"""`DoveVisionTower`: a DOVE / Q-DOVE tokenizer behind the interface LLaVA's vision towers expose.

LLaVA code reads `hidden_size`, `num_patches`, `image_processor`, `dummy_feature`, `config`, `dtype`,
`device`, calls `load_model()` and `forward(images)`. The one difference a caller must know: `forward`
returns a *list* of `[L_i, hidden_size]` tensors, one per image, because every image keeps its own
number of tokens (chosen by the EOS head, or forced by a budget). `num_patches` is the maximum length.

Only the generator runs here (the decoder is for reconstruction, not for the LLM). The tokenizer is
frozen by default; `trainable="eos_head"` or `"generator"` unfreezes that part. Those parameters belong
to the tokenizer from construction on, so saving and reloading always carries them. Lengths are a hard
cut, so the LLM's loss reaches the generator through the kept tokens but never the EOS head: an
`eos_head` run needs a length objective of its own, built from `last_eos_logits` (the latest call's
EOS logits, [B, N], with their graph): see `llava_adapter.length_objective`, which asks for the answer
at several lengths through `sharing_one_pass`. In training mode, `training_lengths="uniform"` replaces the
head's choice by a random length per image (`finetune --train-lengths uniform`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tokenizer import DoveConfig, DoveImageProcessor, DoveTokenizer
from tokenizer.modeling.dove_tokenizer import BudgetInput, DoveEncoding, config_from_name
from tokenizer.modeling.length import mask_from_lengths

TRAINABLE_PARTS = ("none", "eos_head", "generator")
# How a training step picks each image's length when no budget forces it: the EOS head's choice (what
# inference sees), or a length drawn uniformly from [min_tokens, N] per image, so that the LLM learns to
# read every prefix and a fixed budget at inference is not a length it never met.
TRAINING_LENGTHS = ("auto", "uniform")


class DoveVisionTower(nn.Module):
    def __init__(
        self,
        tower_path_or_preset: str | os.PathLike | DoveTokenizer,
        delay_load: bool = False,
        trainable: str = "none",
        use_query: bool = True,
        threshold: float | None = None,
        budget: int | None = None,
        training_lengths: str = "auto",
    ) -> None:
        """`tower_path_or_preset`: a preset name (random weights, for tests), a checkpoint dir, a hub id,
        or a `DoveTokenizer` already in memory. `threshold` / `budget` are the defaults for `forward`;
        `training_lengths` (one of `TRAINING_LENGTHS`) how lengths are chosen in training mode."""
        super().__init__()
        if trainable not in TRAINABLE_PARTS:
            raise ValueError(f"trainable must be one of {TRAINABLE_PARTS}, got {trainable!r}")
        if training_lengths not in TRAINING_LENGTHS:
            raise ValueError(f"training_lengths must be one of {TRAINING_LENGTHS}, got {training_lengths!r}")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.trainable = trainable
        self.use_query = use_query
        self.threshold = threshold
        self.budget = budget
        self.training_lengths = training_lengths
        self.is_loaded = False
        self.last_lengths: torch.Tensor | None = None
        self.last_eos_logits: torch.Tensor | None = None
        self._sharing = False
        self._shared: tuple[torch.Tensor, DoveEncoding] | None = None
        if isinstance(tower_path_or_preset, DoveTokenizer):
            self.vision_tower_name = tower_path_or_preset.config.preset or "in-memory"
            self.cfg_only = tower_path_or_preset.config
            self._attach(tower_path_or_preset)
        else:
            self.vision_tower_name = str(tower_path_or_preset)
            self.cfg_only = config_from_name(self.vision_tower_name)
            if not delay_load:
                self.load_model()
        self.image_processor = (
            self.tokenizer.image_processor if self.is_loaded else DoveImageProcessor(self.cfg_only.image_size)
        )

    # ------------------------------------------------------------------ loading

    def load_model(self, device_map: str | torch.device | None = None) -> None:
        """Build (preset) or load (dir / hub id) the tokenizer; a second call does nothing."""
        if self.is_loaded:
            return
        name = self.vision_tower_name
        tokenizer = DoveTokenizer.from_name(name)
        if isinstance(device_map, (str, torch.device)) and str(device_map) != "auto":
            tokenizer = tokenizer.to(device_map)
        self._attach(tokenizer)
        self.image_processor = tokenizer.image_processor

    def set_trainable(self, part: str) -> None:
        """Choose the tower part that trains (e.g. stage 2 continuing a saved stage-1 model)."""
        if part not in TRAINABLE_PARTS:
            raise ValueError(f"trainable must be one of {TRAINABLE_PARTS}, got {part!r}")
        self.trainable = part
        if self.is_loaded:
            self._attach(self.tokenizer)
            self.train(self.training)

    def _attach(self, tokenizer: DoveTokenizer) -> None:
        self.tokenizer = tokenizer
        tokenizer.requires_grad_(False)
        if self.trainable == "eos_head":
            tokenizer.generator.eos_head.requires_grad_(True)
        elif self.trainable == "generator":
            tokenizer.generator.requires_grad_(True)
        tokenizer.train(False)
        self.is_loaded = True

    def train(self, mode: bool = True) -> DoveVisionTower:
        """Frozen parts stay in eval mode whatever the surrounding model does."""
        super().train(mode)
        if self.is_loaded:
            self.tokenizer.train(False)
            if self.trainable == "generator":
                self.tokenizer.generator.train(mode)
        return self

    # ------------------------------------------------------------------ LLaVA's tower members

    @property
    def config(self) -> DoveConfig:
        return self.tokenizer.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.config.token_dim

    @property
    def num_patches(self) -> int:
        """The most tokens an image can get."""
        return self.config.max_tokens

    @property
    def num_patches_per_side(self) -> int:
        """The side of the smallest square holding `num_patches` tokens (DOVE tokens have no grid)."""
        return math.isqrt(self.num_patches - 1) + 1

    @property
    def dtype(self) -> torch.dtype:
        return self.tokenizer.dtype

    @property
    def device(self) -> torch.device:
        return self.tokenizer.device

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def has_trainable_parameters(self) -> bool:
        return self.trainable != "none"

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        queries: Sequence[str | None] | None = None,
        budget: BudgetInput = None,
        threshold: float | None = None,
    ) -> list[torch.Tensor]:
        """Pixels [B,3,S,S] in [0,1] (or a list of [3,S,S] / [1,3,S,S]) -> B tensors of [L_i, hidden_size].

        This is `DoveTokenizer.encode` plus what a tower adds: the tower's defaults (`use_query`,
        `budget`, `threshold`), its frozen parts kept out of autograd and autocast, and `last_lengths` /
        `last_eos_logits` kept from the latest call. Images must come preprocessed (`image_processor`), as
        LLaVA's towers expect: a tensor of another size is refused rather than silently resized.
        """
        if not self.is_loaded:
            raise RuntimeError(f"vision tower {self.vision_tower_name!r} is not loaded; call load_model() first")
        self._check_preprocessed(images)
        queries = list(queries) if (self.use_query and queries is not None) else None
        budget = self.budget if budget is None else budget
        if budget is None and self.training and self.training_lengths == "uniform":
            # One length per image, uniform in [min_tokens, N], from torch's global generator (which the
            # Trainer seeds, so a run repeats); the image processor says how many images came.
            images = self.tokenizer.pixels(images)
            budget = torch.randint(self.config.min_tokens, self.num_patches + 1, (images.shape[0],))
        threshold = self.threshold if threshold is None else threshold
        if self._sharing:
            encoding = self._shared_encoding(images, queries, budget, threshold)
        else:
            encoding = self._encode(images, queries, budget, threshold)
        self.last_lengths = encoding.lengths.detach().cpu()
        self.last_eos_logits = encoding.eos_logits
        return encoding.features()

    def _encode(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        queries: list[str | None] | None,
        budget: BudgetInput,
        threshold: float | None,
    ) -> DoveEncoding:
        # A frozen tower computes in its own dtype even inside a training step's autocast, so the lengths
        # it picks while training are the lengths inference (and the visual-length cache) sees.
        frozen = not self.has_trainable_parameters
        device_type = self.device.type
        with (
            torch.set_grad_enabled(torch.is_grad_enabled() and not frozen),
            torch.autocast(device_type=device_type, enabled=not frozen and torch.is_autocast_enabled(device_type)),
        ):
            return self.tokenizer.encode(images, queries=queries, budget=budget, threshold=threshold)

    @contextlib.contextmanager
    def sharing_one_pass(self) -> Iterator[None]:
        """Within this block every call cuts its tokens from ONE generator pass over the first call's images.

        The generator is causal, so every length is a prefix of the same N tokens: asking the LLM about the
        same images at several lengths (a length objective's candidate lengths) needs the tower once. The
        first call encodes all N positions; every call, the first included, keeps the prefix its own `budget`
        (or the EOS threshold) chooses, and `last_eos_logits` stays that one pass's (one graph to the head).
        A call with other images inside the block is refused rather than answered with the wrong tokens.
        """
        if self._sharing:
            raise RuntimeError("sharing_one_pass blocks do not nest")
        self._sharing, self._shared = True, None
        try:
            yield
        finally:
            self._sharing, self._shared = False, None

    def _shared_encoding(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        queries: list[str | None] | None,
        budget: BudgetInput,
        threshold: float | None,
    ) -> DoveEncoding:
        pixels = self.tokenizer.pixels(images)
        if self._shared is None:
            self._shared = (pixels, self._encode(pixels, queries, self.num_patches, None))
        elif self._shared[0].shape != pixels.shape or not torch.equal(self._shared[0], pixels):
            raise ValueError(
                "sharing_one_pass: a call with other images than the block's first call "
                f"({tuple(pixels.shape)} vs {tuple(self._shared[0].shape)}); every call in the block must encode "
                "the same images"
            )
        full = self._shared[1]
        lengths = self.tokenizer.choose_lengths(full.eos_probs, threshold, budget)
        return DoveEncoding(
            tokens=full.tokens,
            lengths=lengths,
            attention_mask=mask_from_lengths(lengths, self.num_patches),
            eos_probs=full.eos_probs,
            eos_logits=full.eos_logits,
        )

    def _check_preprocessed(self, images: torch.Tensor | Sequence[torch.Tensor]) -> None:
        if isinstance(images, torch.Tensor):
            images = [images]
        if not isinstance(images, Sequence) or not images or not all(isinstance(i, torch.Tensor) for i in images):
            raise TypeError("images must be a tensor [B,3,S,S] or a non-empty list of image tensors")
        size = self.config.image_size
        for image in images:
            if image.ndim not in (3, 4) or tuple(image.shape[-3:]) != (3, size, size):
                raise ValueError(
                    f"images must have shape [B, 3, {size}, {size}] (use tower.image_processor); "
                    f"got {tuple(image.shape)}"
                )
