"""What a tokenizer training run needs beyond the architecture: a `TrainConfig`, and where the model comes from.

A training file is YAML with two sections::

    model: dove-tiny                  # a preset name, or a mapping (see `ModelSpec`)
    train:                            # `TrainConfig` fields; anything left out keeps its default
      max_steps: 2000
      lr_generator: 3.0e-4

Unknown keys are errors that name the key and the file: a typo such as `lr_genrator` would otherwise
train silently with the default.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..modeling.config import DoveConfig
from ..modeling.presets import available_presets, preset_config
from .losses import REGION_LOSSES

MIXED_PRECISION = ("no", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb", "none")


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. Steps count optimiser steps (each `gradient_accumulation_steps` batches)."""

    # schedule and batch
    max_steps: int = 10_000
    batch_size: int = 16  # per process
    gradient_accumulation_steps: int = 1
    warmup_steps: int = 500
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of each group's learning rate
    seed: int = 0
    mixed_precision: str = "no"
    # Recompute activations in the backward pass (VQ encoder/decoder, generator, token decoder): same
    # results, less memory, about one more forward per step. What lets a 256 px batch fit a GPU.
    gradient_checkpointing: bool = False
    num_workers: int = 2
    # optimiser: one AdamW, one parameter group per part, each with its own learning rate
    lr_vq: float = 1e-5
    lr_generator: float = 3e-4
    lr_decoder: float = 3e-4
    lr_discriminator: float = 1e-4
    freeze_vq: bool = False
    freeze_vq_encoder: bool = False  # keep the VQ encoder and codebook fixed, train its decoder
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0  # 0 turns clipping off
    # reconstruction
    mse_weight: float = 1.0
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None  # VGG16: `torchvision`, a path or a hub id; needed when perceptual_weight > 0
    latent_weight: float = 0.0  # MSE of decoded latents against the VQ's own latents, over their variance
    codebook_weight: float = 1.0  # the VQ's codebook + commitment loss; used only while the VQ trains
    # > 0: the first steps train only the VQ autoencoder (pixels -> latents -> pixels), as a pretrained VQGAN
    # would arrive; `freeze_vq` / `freeze_vq_encoder` apply from then on. For VQs trained from scratch.
    vq_warmup_steps: int = 0
    # > 0: the first steps of the token path (after any VQ warm-up) decode every image from all N tokens, with
    # no length loss. Trained on random prefixes from the start, a small generator settles on the mean image:
    # the short prefixes teach it to spend its first token on overall brightness, and it stays there.
    full_length_steps: int = 0
    codebook_init_images: int = 0  # > 0: reset the VQ codebook to encoder outputs of this many images (from scratch)
    # Q-DOVE: "paper" = L_rel + region_lambda * L_irr, each region's own per-pixel mean, lengths judged by the
    # relevant region's mean; "weighted_mean" = one mean under weights 1 / region_lambda, judged times the area.
    region_loss: str = "paper"
    region_lambda: float = 1e-10  # Q-DOVE: weight of the pixels outside the query's boxes (the paper's value)
    query_drop_prob: float = 0.5
    # adversarial
    adversarial_weight: float = 0.1
    adversarial_start_step: int = 5000
    adaptive_adversarial_weight: bool = True
    discriminator_channels: int = 64
    discriminator_layers: int = 3
    # length control
    length_history: int = 100
    length_weight_start: float = 1e-4
    length_weight_max: float = 0.1
    length_ramp_steps: int = 2000
    uniform_length_fraction: float = 0.5
    # bookkeeping
    log_every: int = 10
    grid_every: int = 500
    grid_images: int = 4
    grid_budgets: list[int] = field(default_factory=lambda: [1, 4, 16])
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    tracker: str = "tensorboard"
    tracker_project: str = "dove-tokenizer"
    torch_threads: int = 0  # 0 leaves torch's default

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every", "length_history")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "warmup_steps", "num_workers", "weight_decay", "max_grad_norm", "mse_weight", "perceptual_weight",
            "latent_weight", "codebook_weight", "vq_warmup_steps", "full_length_steps", "adversarial_weight", "adversarial_start_step",
            "length_weight_start", "length_weight_max", "length_ramp_steps", "grid_every", "grid_images",
            "checkpoint_every", "keep_checkpoints", "torch_threads", "codebook_init_images",
            "lr_vq", "lr_generator", "lr_decoder", "lr_discriminator",
        )  # fmt: skip
        for name in non_negative:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"train.{name} must be a number >= 0, got {value!r}")
        for name in ("min_lr_ratio", "region_lambda", "query_drop_prob", "uniform_length_fraction"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"train.{name} must lie in [0, 1], got {value!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.region_loss not in REGION_LOSSES:
            raise ValueError(f"train.region_loss must be one of {REGION_LOSSES}, got {self.region_loss!r}")
        if self.tracker not in TRACKERS:
            raise ValueError(f"train.tracker must be one of {TRACKERS}, got {self.tracker!r}")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError(
                "train.perceptual_weight > 0 needs train.perceptual_weights: `torchvision` (its ImageNet VGG16) or "
                "the path or hub id of VGG16 weights (or set perceptual_weight: 0)"
            )
        if not all(isinstance(b, int) and b >= 1 for b in self.grid_budgets):
            raise ValueError(f"train.grid_budgets must be positive integers, got {self.grid_budgets!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "train") -> TrainConfig:
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class ModelSpec:
    """Where the tokenizer to train comes from.

    - `preset` alone: a randomly initialised architecture (`overrides` replace any `DoveConfig` field).
    - `vq` and/or `generator` (local dirs or hub ids): the paper's initialisation, a pretrained VQGAN and a
      pretrained GPT-NeoX (`DoveTokenizer.from_components`), the preset supplying the rest.
    - `init_from`: the weights of an earlier `save_pretrained` checkpoint (fine-tuning).
    """

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    vq: str | None = None
    vq_subfolder: str | None = "vqvae"
    generator: str | None = None
    text_tokenizer: str | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.preset is None and self.init_from is None:
            raise ValueError("model: give a preset name or init_from (a checkpoint)")
        if self.preset is not None and self.preset not in available_presets():
            raise ValueError(
                f"model.preset {self.preset!r} is unknown; known presets: {', '.join(available_presets())}"
            )
        if self.init_from is not None and (self.vq or self.generator):
            raise ValueError("model: init_from already holds every weight; do not combine it with vq/generator")

    @classmethod
    def parse(cls, value: Any, where: str = "model") -> ModelSpec:
        if isinstance(value, str):
            return cls(preset=value)
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a preset name or a mapping, got {type(value).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        spec = cls(**value)
        if spec.preset is not None and spec.overrides:
            DoveConfig.from_dict({**preset_config(spec.preset).to_dict(), **spec.overrides})  # fail early, with names
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> DoveConfig:
        """The `DoveConfig` of a preset-built model (after overrides); a deep merge keeps unnamed vq/generator keys."""
        if self.preset is None:
            raise ValueError("model.architecture needs a preset")
        base = preset_config(self.preset).to_dict()
        for key, value in self.overrides.items():
            if key in ("vq", "generator") and isinstance(value, dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        base["preset"] = self.preset if not self.overrides else None
        return DoveConfig.from_dict(base)


@dataclass
class TrainingSetup:
    model: ModelSpec
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": self.train.to_dict()}


def load_training_file(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> TrainingSetup:
    """Read a training YAML (`model:` + `train:`); `overrides` replace `train` fields (e.g. from the CLI)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    return parse_training_setup(data, where=str(path), overrides=overrides)


def parse_training_setup(data: Any, where: str, overrides: dict[str, Any] | None = None) -> TrainingSetup:
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping with 'model' and 'train' sections")
    unknown = sorted(set(data) - {"model", "train", "description"})
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {unknown}; expected 'model' and 'train'")
    if "model" not in data:
        raise ValueError(f"{where}: missing the 'model' section (a preset name or a mapping)")
    train = dict(data.get("train") or {})
    train.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainingSetup(
        model=ModelSpec.parse(data["model"], where=f"{where}: model"),
        train=TrainConfig.from_dict(train, where=f"{where}: train"),
    )
