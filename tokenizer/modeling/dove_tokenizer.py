"""`DoveTokenizer`: images (and optional text queries) in, a variable number of continuous tokens out, and back.

    VQ encoder -> latent grid H_v --proj--> [H_v ; H_q ; t_1..t_N] -> GPT-NeoX (causal, one pass)
        -> z_1..z_N and EOS logits -> length L -> z_1..z_L -> bidirectional decoder -> latent grid -> VQ decoder

The tokenizer knows nothing of LLMs; `llava_adapter` wraps it as a vision tower.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, GPTNeoXModel, PreTrainedTokenizerBase

from ..hub import (
    atomic_directory,
    load_safetensors,
    load_state_dict_exactly,
    resolve_pretrained_dir,
)
from .config import CONFIG_NAME, DoveConfig
from .decoder import TokenDecoder
from .generator import TokenGenerator
from .image_processing import DoveImageProcessor, ImageInput
from .length import lengths_from_eos, mask_from_lengths, resolve_budget
from .presets import available_presets, preset_config
from .text import byte_level_text_tokenizer, load_text_tokenizer, prepare_query_tokenizer
from .vq import VQBackbone

WEIGHTS_NAME = "model.safetensors"
TEXT_TOKENIZER_DIR = "text_tokenizer"

QueryInput = str | Sequence[str | None] | None
BudgetInput = int | Sequence[int] | torch.Tensor | None


@dataclass
class DoveEncoding:
    """A batch of variable-length token sequences, padded to N.

    `tokens` is zero after each image's end and `attention_mask` marks the kept positions; `eos_probs`
    covers all N positions whatever the chosen lengths. `eos_logits` are the head's raw outputs [B, N],
    with their autograd graph when encoding ran with gradients, so that a length objective can reach the head.
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    attention_mask: torch.Tensor
    eos_probs: torch.Tensor
    eos_logits: torch.Tensor | None = None

    def features(self) -> list[torch.Tensor]:
        """One [L_i, D] tensor per image: what an LLM sees (no padding)."""
        return [self.tokens[i, : int(n)] for i, n in enumerate(self.lengths)]

    def to(self, device: torch.device | str) -> DoveEncoding:
        return DoveEncoding(
            tokens=self.tokens.to(device),
            lengths=self.lengths.to(device),
            attention_mask=self.attention_mask.to(device),
            eos_probs=self.eos_probs.to(device),
            eos_logits=None if self.eos_logits is None else self.eos_logits.to(device),
        )


@dataclass
class Reconstruction:
    """Reconstructions of one batch at each requested budget and at the automatic length."""

    inputs: torch.Tensor
    by_budget: dict[int, torch.Tensor] = field(default_factory=dict)
    auto: torch.Tensor | None = None
    auto_lengths: torch.Tensor | None = None


class DoveTokenizer(nn.Module):
    def __init__(
        self,
        config: DoveConfig,
        text_tokenizer: PreTrainedTokenizerBase | None = None,
        vq_model: Any | None = None,
        generator_backbone: GPTNeoXModel | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.vq = VQBackbone(config.vq, model=vq_model, quantize=config.quantize_latents)
        self.generator = TokenGenerator(config, backbone=generator_backbone)
        self.decoder = TokenDecoder(config)
        self.image_processor = DoveImageProcessor(config.image_size)
        self.text_tokenizer = prepare_query_tokenizer(text_tokenizer or byte_level_text_tokenizer())
        vocab = self.generator.backbone.config.vocab_size
        if len(self.text_tokenizer) > vocab:
            raise ValueError(
                f"the text tokenizer has {len(self.text_tokenizer)} ids but the generator embeds only {vocab}"
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_preset(cls, name: str, text_tokenizer: PreTrainedTokenizerBase | None = None) -> DoveTokenizer:
        """A randomly initialised tokenizer of a named architecture (see `tokenizer.presets`)."""
        return cls(preset_config(name), text_tokenizer=text_tokenizer)

    @classmethod
    def from_name(cls, name_or_path: str | os.PathLike) -> DoveTokenizer:
        """The one reading of a tokenizer named on a command line or in a config: a preset name builds a
        randomly initialised model (tests, training from scratch); anything else is a checkpoint dir or hub
        id (`from_pretrained`), and a name that is neither says so with the known presets."""
        name = str(name_or_path)
        presets = available_presets()
        if name in presets:
            return cls.from_preset(name)
        try:
            return cls.from_pretrained(name)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}\n(not a preset either; known presets: {', '.join(presets)})") from err

    @classmethod
    def from_components(
        cls,
        vq: str | os.PathLike | nn.Module,
        generator: str | os.PathLike | GPTNeoXModel,
        text_tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
        preset: str = "dove-pythia70m-amused256",
        vq_subfolder: str | None = "vqvae",
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> DoveTokenizer:
        """Initialise as the paper does: a pretrained VQGAN and a pretrained Pythia, new heads and decoder.

        `vq` is a `VQModel`, a local dir or a hub id (`amused/amused-256`, read from `vq_subfolder`);
        `generator` a GPT-NeoX model, dir or hub id (`EleutherAI/pythia-70m`). The text tokenizer defaults
        to the generator's own. `preset` supplies the remaining fields; `overrides` replace any of them.

        Hub checkpoints are often stored in fp16 or bf16 and the libraries would load them as stored: an
        fp16 backbone under fp32 heads fails ("mixed dtype") and AdamW on half-precision weights turns them
        to inf/NaN. So every component is loaded (or, when passed as a module, cast in place) to fp32
        master weights, which training needs whatever `mixed_precision` autocasts to. `dtype` (e.g.
        `torch.bfloat16`, for inference) then casts the generator and decoder; the VQ stays fp32 (see `vq`).
        """
        from diffusers import VQModel

        if isinstance(vq, nn.Module):
            vq_model = vq
        else:
            vq_dir = _component_dir(vq, vq_subfolder, revision, marker=CONFIG_NAME)
            vq_model = VQModel.from_pretrained(vq_dir, torch_dtype=torch.float32)
        if isinstance(generator, nn.Module):
            backbone = generator.float()
            generator_dir = None
        else:
            generator_dir = resolve_pretrained_dir(generator, revision=revision)
            backbone = GPTNeoXModel.from_pretrained(generator_dir, dtype=torch.float32)
        if text_tokenizer is None and generator_dir is not None:
            text_tokenizer = AutoTokenizer.from_pretrained(generator_dir)
        elif isinstance(text_tokenizer, (str, os.PathLike)):
            text_tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained_dir(text_tokenizer, revision=revision))
        data = preset_config(preset).to_dict()
        data.update(overrides)
        data["vq"] = {k: _plain(v) for k, v in dict(vq_model.config).items() if not k.startswith("_")}
        generator_config = backbone.config.to_dict()
        data["generator"] = {k: v for k, v in generator_config.items() if k in _GENERATOR_FIELDS}
        data["preset"] = None
        config = DoveConfig.from_dict(data)
        model = cls(config, text_tokenizer=text_tokenizer, vq_model=vq_model, generator_backbone=backbone)
        return model if dtype is None else model.to(dtype)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | os.PathLike,
        revision: str | None = None,
        preset: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> DoveTokenizer:
        """Load a checkpoint written by `save_pretrained` (a local dir or a hub id).

        With `preset`, the architecture comes from that preset and the checkpoint must match it; a
        mismatch names the offending keys. Weights load into fp32 parameters whatever dtype they were
        saved in (training needs fp32 master weights); `dtype` casts the generator and decoder afterwards,
        e.g. `torch.bfloat16` for inference (the VQ stays fp32).
        """
        directory = resolve_pretrained_dir(path_or_id, revision=revision)
        config = preset_config(preset) if preset else DoveConfig.load(directory)
        text_dir = directory / TEXT_TOKENIZER_DIR
        text_tokenizer = load_text_tokenizer(text_dir) if text_dir.is_dir() else None
        model = cls(config, text_tokenizer=text_tokenizer)
        model.load_weights(directory / WEIGHTS_NAME)
        return model if dtype is None else model.to(dtype)

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load a safetensors state dict, refusing (with the key names) any missing, extra or misshapen tensor."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path}")
        load_state_dict_exactly(
            self, load_safetensors(path), f"checkpoint {path} for this architecture (preset {self.config.preset!r})"
        )

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json, model.safetensors and the query tokenizer, atomically.

        `state_dict` replaces the live parameters when given: a VLM saved under DeepSpeed ZeRO-3 passes the
        gathered weights, since its live ones are shards."""
        directory = Path(directory)
        source = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
        with atomic_directory(directory) as staging:
            self.config.save(staging)
            save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
            self.text_tokenizer.save_pretrained(staging / TEXT_TOKENIZER_DIR)
        return directory

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.generator.token_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the generator and decoder hold their weights in (the VQ is always fp32, see `vq`).

        A model whose parts disagree has no one dtype and would fail in its forward ("mixed dtype"), so
        that is an error naming the parts rather than the dtype of whichever layer happens to be asked.
        """
        found: dict[torch.dtype, str] = {}
        for name, param in self.named_parameters():
            if not name.startswith("vq.") and param.is_floating_point():
                found.setdefault(param.dtype, name)
        if len(found) != 1:
            shown = ", ".join(f"{name}: {dtype}" for dtype, name in found.items())
            raise RuntimeError(f"the tokenizer's generator and decoder hold parameters of several dtypes ({shown})")
        return next(iter(found))

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    @property
    def token_dim(self) -> int:
        return self.config.token_dim

    def num_parameters_by_part(self) -> dict[str, int]:
        parts = {"vq": self.vq, "generator": self.generator, "decoder": self.decoder}
        counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
        counts["total"] = sum(counts.values())
        return counts

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in training: the VQ encoder and decoder, the generator's layers and the
        token decoder's layers are recomputed in the backward pass instead of keeping their activations.

        At 256 px the VQ's full-resolution feature maps dominate a training step's memory; checkpointing
        keeps only each block's input. Results (losses, gradients) are unchanged; a step costs about one
        more forward pass.
        """
        self.vq.set_gradient_checkpointing(enabled)
        backbone = self.generator.backbone
        # Newer transformers call the switch `activation_checkpointing_*` and deprecate the old names.
        if enabled:
            kwargs = {"use_reentrant": False}
            if hasattr(backbone, "activation_checkpointing_enable"):
                backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(backbone, "activation_checkpointing_disable"):
            backbone.activation_checkpointing_disable()
        else:
            backbone.gradient_checkpointing_disable()
        self.decoder.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ inputs

    def pixels(self, images: ImageInput | Sequence[ImageInput]) -> torch.Tensor:
        """Preprocess any accepted image input to [B,3,S,S] in [0,1] on the model's device."""
        return self.image_processor.to_tensor(images).to(self.device)

    def tokenize_queries(self, queries: QueryInput, batch_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Left-padded query ids and mask, or None when no image has a (non-empty) query."""
        if queries is None:
            return None
        if isinstance(queries, str):
            queries = [queries] * batch_size
        queries = list(queries)
        if len(queries) != batch_size:
            raise ValueError(f"queries has {len(queries)} entries but the batch has {batch_size} images")
        for index, query in enumerate(queries):
            if query is not None and not isinstance(query, str):
                raise TypeError(f"queries[{index}] must be a string or None, got {type(query).__name__}")
        texts = [(q or "").strip() for q in queries]
        if not any(texts):
            return None
        encoded = self.text_tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.config.max_query_tokens,
            add_special_tokens=False,
            return_tensors="pt",
        )
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ the model

    def forward(
        self, pixels: torch.Tensor, query_ids: torch.Tensor | None = None, query_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training entry: pixels -> (all N tokens [B,N,D], EOS logits [B,N], target latent grid [B,C,g,g])."""
        latents = self.vq.encode(pixels)
        tokens, eos_logits = self.generator(latents, query_ids, query_mask)
        return tokens, eos_logits, latents

    def decode_latents(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(tokens, attention_mask)

    def encode(
        self,
        images: ImageInput | Sequence[ImageInput],
        queries: QueryInput = None,
        budget: BudgetInput = None,
        threshold: float | None = None,
    ) -> DoveEncoding:
        """Tokenize a batch. Lengths come from the EOS head (`threshold`, default the config's) unless
        `budget` forces them (an int for all images, or one per image).

        This is the one way from images to tokens: the VLM's vision tower calls it too. It keeps the
        autograd graph when gradients are on (the tower's trainable parts train through it)."""
        pixels = self.pixels(images)
        batch = pixels.shape[0]
        forced = resolve_budget(budget, batch, self.max_tokens)
        query = self.tokenize_queries(queries, batch)
        tokens, eos_logits, _ = self(pixels, *(query or (None, None)))
        eos_probs = torch.sigmoid(eos_logits.float())
        lengths = forced.to(pixels.device) if forced is not None else self.choose_lengths(eos_probs, threshold)
        attention_mask = mask_from_lengths(lengths, self.max_tokens)
        tokens = tokens * attention_mask.unsqueeze(-1).to(tokens.dtype)
        return DoveEncoding(
            tokens=tokens, lengths=lengths, attention_mask=attention_mask, eos_probs=eos_probs, eos_logits=eos_logits
        )

    def choose_lengths(
        self, eos_probs: torch.Tensor, threshold: float | None = None, budget: BudgetInput = None
    ) -> torch.Tensor:
        """Each image's length from its EOS probabilities [B, N] (`threshold`, default the config's), unless
        `budget` forces it: the rule `encode` applies, for callers that already hold all N tokens."""
        forced = resolve_budget(budget, eos_probs.shape[0], self.max_tokens)
        if forced is not None:
            return forced.to(eos_probs.device)
        return lengths_from_eos(
            eos_probs, self.config.eos_threshold if threshold is None else threshold, self.config.min_tokens
        )

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """Tokens [B,L,D] (L <= N) and a length per image -> images [B,3,S,S] in [0,1]."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.token_dim:
            raise ValueError(f"tokens must have shape [B, L, {self.token_dim}], got {tuple(tokens.shape)}")
        batch, width, _ = tokens.shape
        if width > self.max_tokens:
            raise ValueError(f"tokens has {width} positions but the model decodes at most {self.max_tokens}")
        if isinstance(lengths, torch.Tensor) and lengths.ndim == 1:
            lengths = lengths.tolist()
        forced = resolve_budget(lengths, batch, width, name="lengths")
        mask = mask_from_lengths(forced.to(tokens.device), width)
        latents = self.decode_latents(tokens.to(self.device), mask.to(self.device))
        return self.vq.decode(latents).clamp(0, 1)

    def reconstruct(
        self,
        images: ImageInput | Sequence[ImageInput],
        budgets: Sequence[int] = (),
        queries: QueryInput = None,
        threshold: float | None = None,
    ) -> Reconstruction:
        """Reconstructions at each budget and at the automatic length, from one encoder pass: every
        budget is a prefix of the same token sequence."""
        pixels = self.pixels(images)
        batch = pixels.shape[0]
        full = self.encode(pixels, queries=queries, budget=self.max_tokens)
        auto_lengths = lengths_from_eos(
            full.eos_probs, self.config.eos_threshold if threshold is None else threshold, self.config.min_tokens
        )
        result = Reconstruction(inputs=pixels)
        for budget in budgets:
            resolve_budget(budget, batch, self.max_tokens)
            result.by_budget[int(budget)] = self.decode(full.tokens, [int(budget)] * batch)
        result.auto = self.decode(full.tokens, auto_lengths)
        result.auto_lengths = auto_lengths
        return result


def config_from_name(name_or_path: str | os.PathLike) -> DoveConfig:
    """The architecture a name stands for (as `DoveTokenizer.from_name` reads it) without loading weights."""
    name = str(name_or_path)
    if name in available_presets():
        return preset_config(name)
    return DoveConfig.load(resolve_pretrained_dir(name))


_GENERATOR_FIELDS = {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "rotary_pct",
    "rotary_emb_base",
    "rope_parameters",
    "layer_norm_eps",
    "use_parallel_residual",
    "attention_bias",
    "hidden_dropout",
    "attention_dropout",
    "initializer_range",
}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _component_dir(path_or_id: str | os.PathLike, subfolder: str | None, revision: str | None, marker: str) -> Path:
    """A component may sit in a subfolder of a local dir or hub repo (pipelines such as `amused/amused-256` keep
    the VQ in `vqvae/`) or at its root (a repo holding the VQ alone, or a local copy of one)."""
    local = Path(path_or_id).expanduser()
    if local.is_dir() and (local / marker).is_file():
        return local
    directory = resolve_pretrained_dir(path_or_id, revision=revision, subfolder=subfolder or "")
    if subfolder and not (directory / marker).is_file():  # a hub repo without the subfolder: its root, then
        root = resolve_pretrained_dir(path_or_id, revision=revision)
        if not (root / marker).is_file():
            raise FileNotFoundError(f"{path_or_id}: no {marker} in {subfolder}/ nor at the top level ({root})")
        return root
    return directory
