"""`DoveLlavaForCausalLM`: DOVE visual tokens, a projector and any Hugging Face causal LM, LLaVA-style.

    text with <image> ──embed──┐
                               ├─ splice: each <image> becomes that image's L_i projected tokens ─> causal LM
    image ─ DoveVisionTower ─ mm_projector ┘

Unlike CLIP towers, every image brings its own number of tokens, so the batch is rebuilt sample by
sample after the splice: padding is stripped, visual tokens inserted, the result truncated to the
model's maximum length (with a warning) and re-padded, on the right for training and on the left for
generation. Position ids count only real tokens, so a sample's logits do not depend on its batch mates.

Images and placeholders pair up in reading order: the k-th image belongs to the k-th `<image>` token of
the batch, counting row by row, left to right. A text-only sample simply has no placeholder and brings
no image. Collators that stack one image per sample (with a dummy for text-only samples) pass
`image_sample_mask` ([B] bool) to say which rows are real.

Saved layout (`save_pretrained`):
    config.json                 DoveLlavaConfig (LLM and tower architectures, projector, query/length options)
    vision_tower/               the DOVE tokenizer checkpoint (config, weights, query tokenizer)
    mm_projector.safetensors    projector weights under `mm_projector.*` keys (LLaVA's layout)
    llm/                        the LLM (base weights when a LoRA adapter is present)
    adapter_config.json, adapter_model.safetensors   the peft LoRA adapter of the LLM, if any
    tokenizer files             the LLM tokenizer, when one is passed to `save_pretrained`, and with it
    processor_config.json       the `DoveLlavaProcessor` (image size, conversation template), for `AutoProcessor`

After `import llava_adapter` (which registers the classes), `AutoModelForCausalLM.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` open such a directory; without it transformers does not know the model
type `dove_llava` and says so.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from typing_extensions import Unpack

from tokenizer import DoveConfig, DoveTokenizer
from tokenizer.hub import atomic_directory, corrupt_weights_error, resolve_pretrained_dir

from .constants import IGNORE_INDEX, IMAGE_TOKEN
from .processing import DoveLlavaImageProcessor, DoveLlavaProcessor
from .projectors import build_projector, load_projector_weights, projector_state_dict
from .vision_tower import DoveVisionTower

TOWER_DIR = "vision_tower"
LLM_DIR = "llm"
PROJECTOR_FILE = "mm_projector.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
_TOWER_PREFIX = "vision_tower.tokenizer."
_PROJECTOR_PREFIX = "mm_projector."
_LLM_PREFIX = "llm."


class TruncationWarning(UserWarning):
    """A sample was longer than the LLM's maximum length once its visual tokens were inserted."""


class DoveLlavaConfig(PretrainedConfig):
    """What rebuilds a `DoveLlavaForCausalLM` offline: both architectures, the projector and the tower options.

    `hidden_size` mirrors the LLM's so that tools reading `model.config.hidden_size` (DeepSpeed "auto"
    bucket sizes) work; `llm_source` / `tower_source` record where the weights first came from.
    """

    model_type = "dove_llava"

    llm_config: dict | None = None
    llm_source: str | None = None
    tower_config: dict | None = None
    tower_source: str | None = None
    tower_trainable: str = "none"
    use_query: bool = True
    eos_threshold: float | None = None
    token_budget: int | None = None
    token_price: float | None = None  # the length objective's price the EOS head was tuned at (None: not tuned)
    projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int | None = None
    hidden_size: int | None = None
    image_token_id: int | None = None
    model_max_length: int | None = None
    conversation_template: str = "auto"
    tie_word_embeddings: bool = False


class VisionKwargs(TypedDict, total=False):
    """The vision path's per-image options, taken alike by `forward`, `generate` and `prepare_multimodal_inputs`.

    `image_sample_mask` ([B] bool): images come one per sample and only these rows are real. `queries`:
    one question per image for Q-DOVE (ignored when the tower's `use_query` is off). `budget`: force each
    image's length (an int, or one per image). `threshold`: the EOS threshold for automatic lengths.
    `sample_ids`: names for samples in error messages and warnings.
    """

    image_sample_mask: torch.Tensor | None
    queries: Sequence[str | None] | None
    budget: int | Sequence[int] | torch.Tensor | None
    threshold: float | None
    sample_ids: Sequence[Any] | None


def _pop_vision_kwargs(kwargs: dict[str, Any]) -> VisionKwargs:
    """Take the vision options out of `kwargs`, leaving what the LLM itself accepts."""
    return VisionKwargs(**{name: kwargs.pop(name) for name in VisionKwargs.__annotations__ if name in kwargs})


@dataclass
class DoveLlavaOutput(CausalLMOutputWithPast):
    """The LLM's output plus the batch it actually saw: expanded `labels` and `attention_mask` line up with
    `logits`, and `visual_lengths` holds one token count per image."""

    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    visual_lengths: list[int] | None = None


@dataclass
class MultimodalBatch:
    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    visual_lengths: list[int]


class DoveLlavaForCausalLM(PreTrainedModel):
    config_class = DoveLlavaConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(
        self,
        config: DoveLlavaConfig,
        llm: PreTrainedModel | None = None,
        vision_tower: DoveVisionTower | None = None,
    ) -> None:
        """Components passed in are used as they are; missing ones are built (randomly) from `config`."""
        super().__init__(config)
        if vision_tower is None:
            if not config.tower_config:
                raise ValueError("DoveLlavaConfig.tower_config is empty: pass a vision tower or a tower config")
            vision_tower = DoveVisionTower(
                DoveTokenizer(DoveConfig.from_dict(config.tower_config)),
                trainable=config.tower_trainable,
                use_query=config.use_query,
                threshold=config.eos_threshold,
                budget=config.token_budget,
            )
        if llm is None:
            if not config.llm_config:
                raise ValueError("DoveLlavaConfig.llm_config is empty: pass an LLM or an LLM config")
            # float32 whatever dtype the LLM was last saved in (`llm_config` records it): fresh weights are
            # master weights; half precision is for autocast or an explicit inference load.
            llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.llm_config), dtype=torch.float32)
        if config.image_token_id is None:
            raise ValueError("DoveLlavaConfig.image_token_id must be set (the id of the <image> placeholder)")
        self.vision_tower = vision_tower
        self.mm_projector = build_projector(config.projector_type, vision_tower.hidden_size, _llm_hidden_size(llm))
        self.llm = llm
        self.last_visual_lengths: list[int] = []
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to do: the LLM, the tower and the projector arrive initialised (or loaded)."""

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_components(
        cls,
        llm: str | os.PathLike | PreTrainedModel,
        tower: str | os.PathLike | DoveVisionTower | DoveTokenizer,
        projector_type: str = "mlp2x_gelu",
        image_token_id: int | None = None,
        tokenizer: Any | None = None,
        tower_trainable: str = "none",
        use_query: bool = True,
        threshold: float | None = None,
        budget: int | None = None,
        model_max_length: int | None = None,
        conversation_template: str = "auto",
        pretrained_projector: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> DoveLlavaForCausalLM:
        """A new VLM from an LLM (model, dir or hub id) and a tower (tower, tokenizer, dir, hub id or preset).

        The projector is new unless `pretrained_projector` names a file of `mm_projector.*` tensors. The
        `<image>` id comes from `image_token_id` or from `tokenizer` (which must already know `<image>`;
        see `conversation.add_image_token`). The id need not be inside the LLM's vocabulary: placeholder
        positions are never looked up in the embedding table. An LLM named by dir or hub id loads in `dtype`,
        by default float32 whatever dtype its checkpoint holds (hub checkpoints are mostly fp16/bf16): the
        master weights training needs.
        """
        llm_source = None
        if not isinstance(llm, PreTrainedModel):
            llm_source = str(llm)
            llm = AutoModelForCausalLM.from_pretrained(resolve_pretrained_dir(llm), dtype=dtype or torch.float32)
        tower_source = None
        if not isinstance(tower, DoveVisionTower):
            tower_source = None if isinstance(tower, DoveTokenizer) else str(tower)
            tower = DoveVisionTower(
                tower, trainable=tower_trainable, use_query=use_query, threshold=threshold, budget=budget
            )
        if image_token_id is None:
            if tokenizer is None:
                raise ValueError("from_components needs image_token_id or a tokenizer that knows <image>")
            image_token_id = _image_token_id(tokenizer)
        config = DoveLlavaConfig(
            llm_config=llm.config.to_dict(),
            llm_source=llm_source,
            tower_config=tower.config.to_dict(),
            tower_source=tower_source,
            tower_trainable=tower.trainable,
            use_query=tower.use_query,
            eos_threshold=tower.threshold,
            token_budget=tower.budget,
            projector_type=projector_type,
            mm_hidden_size=tower.hidden_size,
            hidden_size=_llm_hidden_size(llm),
            image_token_id=int(image_token_id),
            model_max_length=model_max_length,
            conversation_template=conversation_template,
        )
        model = cls(config, llm=llm, vision_tower=tower)
        if pretrained_projector is not None:
            load_projector_weights(model.mm_projector, pretrained_projector)
        model.mm_projector.to(device=model.llm.device, dtype=model.get_input_embeddings().weight.dtype)
        return model

    # ------------------------------------------------------------------ embeddings (for peft / Trainer)

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        """The LLM's dtype: what the spliced embeddings, the projector and the logits are computed in.

        Not the first parameter's, as `PreTrainedModel.dtype` would say: that is the tower's, which keeps its
        own dtype (`vision_tower.dtype`; its VQ stays float32) when the LLM is loaded in half precision.
        """
        return self.get_input_embeddings().weight.dtype

    @property
    def max_length(self) -> int:
        """Tokens the LLM may see, visual tokens included."""
        if self.config.model_max_length:
            return int(self.config.model_max_length)
        llm_config = self._base_llm().config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(llm_config, name, None)
            if value:
                return int(value)
        raise ValueError("cannot tell the LLM's maximum length; set DoveLlavaConfig.model_max_length")

    def _base_llm(self) -> PreTrainedModel:
        """The LLM itself, under a peft wrapper if there is one."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    # ------------------------------------------------------------------ the splice

    def encode_images(
        self,
        images: torch.Tensor | Sequence[torch.Tensor],
        queries: Sequence[str | None] | None = None,
        budget: int | Sequence[int] | torch.Tensor | None = None,
        threshold: float | None = None,
    ) -> list[torch.Tensor]:
        """Images -> one projected [L_i, llm_hidden] tensor per image (queries ignored when the tower's
        `use_query` is off)."""
        features = self.vision_tower(images, queries=queries, budget=budget, threshold=threshold)
        lengths = [f.shape[0] for f in features]
        dtype = self.get_input_embeddings().weight.dtype
        projected = self.mm_projector(torch.cat(features, dim=0).to(dtype))
        return list(projected.split(lengths, dim=0))

    def prepare_multimodal_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | Sequence[torch.Tensor] | None = None,
        padding_side: str = "right",
        **vision: Unpack[VisionKwargs],
    ) -> MultimodalBatch:
        """Token ids with `<image>` placeholders -> the embeddings, mask, positions and labels the LLM sees.

        Visual positions are IGNORE_INDEX in the labels; so is the placeholder itself.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        batch_size = input_ids.shape[0]
        names = _sample_names(vision.get("sample_ids"), batch_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
        image_token_id = self.config.image_token_id
        real = attention_mask.bool()
        placeholder = input_ids == image_token_id
        is_image = placeholder & real
        counts = is_image.sum(dim=1).tolist()
        images, queries, budget = _select_images(
            images, vision.get("image_sample_mask"), vision.get("queries"), vision.get("budget"), batch_size
        )
        _check_image_count(counts, 0 if images is None else len(images), names)

        visual: list[torch.Tensor] = []
        if images is not None and len(images) > 0:
            visual = self.encode_images(images, queries=queries, budget=budget, threshold=vision.get("threshold"))
        visual_lengths = [int(v.shape[0]) for v in visual]
        self.last_visual_lengths = visual_lengths

        embed = self.get_input_embeddings()
        # Placeholder ids are never looked up, so `<image>` may lie outside the LLM's vocabulary (or be negative).
        text_embeds = embed(input_ids.masked_fill(placeholder, 0))
        max_length = self.max_length
        rows: list[torch.Tensor] = []
        row_labels: list[torch.Tensor] = []
        cursor = 0
        for row in range(batch_size):
            keep = real[row]
            ids = input_ids[row][keep]
            embeds = text_embeds[row][keep]
            targets = labels[row][keep] if labels is not None else None
            pieces, label_pieces, start = [], [], 0
            for position in (ids == image_token_id).nonzero().flatten().tolist():
                pieces += [embeds[start:position], visual[cursor]]
                if targets is not None:
                    filler = targets.new_full((visual[cursor].shape[0],), IGNORE_INDEX)
                    label_pieces += [targets[start:position], filler]
                cursor += 1
                start = position + 1
            pieces.append(embeds[start:])
            merged = torch.cat(pieces, dim=0)
            merged_labels = torch.cat(label_pieces + [targets[start:]]) if targets is not None else None
            if merged.shape[0] > max_length:
                warnings.warn(
                    f"{names[row]}: {merged.shape[0]} tokens once its visual tokens are inserted, more than the "
                    f"LLM's maximum of {max_length}; truncated to the first {max_length}",
                    TruncationWarning,
                    stacklevel=3,
                )
                merged = merged[:max_length]
                merged_labels = merged_labels[:max_length] if merged_labels is not None else None
            rows.append(merged)
            row_labels.append(merged_labels)

        width = max(r.shape[0] for r in rows)
        hidden = text_embeds.shape[-1]
        inputs_embeds = text_embeds.new_zeros(batch_size, width, hidden)
        new_mask = attention_mask.new_zeros(batch_size, width)
        new_labels = input_ids.new_full((batch_size, width), IGNORE_INDEX) if labels is not None else None
        for row, (merged, merged_labels) in enumerate(zip(rows, row_labels)):
            span = slice(0, merged.shape[0]) if padding_side == "right" else slice(width - merged.shape[0], width)
            inputs_embeds[row, span] = merged
            new_mask[row, span] = 1
            if new_labels is not None:
                new_labels[row, span] = merged_labels
        position_ids = (new_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return MultimodalBatch(inputs_embeds, new_mask, position_ids, new_labels, visual_lengths)

    # ------------------------------------------------------------------ forward / generate

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        images: torch.Tensor | Sequence[torch.Tensor] | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DoveLlavaOutput:
        """Training / scoring forward (right padding). `labels` align with `input_ids`, as a collator builds
        them; the output's `labels`, `attention_mask` and `logits` align with the expanded sequence.

        `images`: [N,3,S,S] (or a list of N [3,S,S]) in [0,1], one per `<image>` placeholder in reading
        order; or one per sample with `image_sample_mask`. The vision options (`VisionKwargs`: `queries`,
        `budget`, `threshold`, `image_sample_mask`, `sample_ids`) are per image like `images`; any other
        keyword goes to the LLM. `pixel_values` is `images` under the name `DoveLlavaProcessor` (and every
        transformers processor) gives it.
        """
        images = _images_or_pixel_values(images, pixel_values)
        vision = _pop_vision_kwargs(kwargs)
        if inputs_embeds is not None:  # already spliced (e.g. a continuation step): straight to the LLM
            out = self.llm(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                labels=labels,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            return DoveLlavaOutput(
                **{k: getattr(out, k, None) for k in ("loss", "logits", "cache", "hidden_states", "attentions")}
            )
        if input_ids is None:
            raise ValueError("forward needs input_ids (or inputs_embeds)")
        batch = self.prepare_multimodal_inputs(
            input_ids, attention_mask=attention_mask, labels=labels, images=images, padding_side="right", **vision
        )
        out = self.llm(
            inputs_embeds=batch.inputs_embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=batch.labels,
            use_cache=use_cache if use_cache is not None else False,
            **kwargs,
        )
        return DoveLlavaOutput(
            loss=out.loss,
            logits=out.logits,
            cache=getattr(out, "cache", None),
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
            labels=batch.labels,
            attention_mask=batch.attention_mask,
            visual_lengths=batch.visual_lengths,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | Sequence[torch.Tensor] | None = None,
        pixel_values: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Splice (left padding) and run the LLM's `generate`; returns only the new token ids [B, T_new].

        The vision options (`VisionKwargs`) are taken as in `forward`; every other keyword goes to
        `transformers`' `generate` (`max_new_tokens`, `do_sample`, ...). `pixel_values` is `images` under the
        processor's name, so `model.generate(**processor(images=..., text=...))` works.
        `last_visual_lengths` holds each image's token count afterwards.
        """
        images = _images_or_pixel_values(images, pixel_values)
        vision = _pop_vision_kwargs(kwargs)
        batch = self.prepare_multimodal_inputs(
            input_ids, attention_mask=attention_mask, images=images, padding_side="left", **vision
        )
        return self.llm.generate(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, **kwargs)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        tokenizer: Any | None = None,
        save_llm: bool = True,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> Path:
        """Write the layout described in the module docstring.

        `state_dict` (what the HF Trainer passes, gathered under DeepSpeed ZeRO-3) replaces the live
        parameters when given. With `save_llm=False` the LLM weights are not written and are reloaded
        from `config.llm_source` (a hub id or dir), as for a frozen LLM that only carries a LoRA adapter.
        """
        directory = Path(save_directory)
        if not is_main_process:
            return directory
        if not save_llm and not self.config.llm_source:
            raise ValueError("save_llm=False needs config.llm_source (where the LLM weights can be reloaded from)")
        parts = _split_state(state_dict)
        base = self._base_llm()
        self.config.llm_config = base.config.to_dict()
        self.config.tower_config = self.vision_tower.config.to_dict()
        self.config.hidden_size = _llm_hidden_size(base)
        tower = self.vision_tower
        self.config.tower_trainable, self.config.use_query = tower.trainable, tower.use_query
        self.config.eos_threshold, self.config.token_budget = tower.threshold, tower.budget
        self.config.architectures = [type(self).__name__]  # what hub tooling reads to pick the model class
        # Only the files written here replace their namesakes in `directory` (anything else there stays),
        # and a kill mid-save leaves the previous model loadable (see `atomic_directory`).
        with atomic_directory(directory, owned=ADAPTER_FILES) as staging:
            self.config.save_pretrained(staging)
            self.vision_tower.tokenizer.save_pretrained(staging / TOWER_DIR, state_dict=parts[_TOWER_PREFIX])
            save_file(
                projector_state_dict(self.mm_projector, parts[_PROJECTOR_PREFIX]),
                str(staging / PROJECTOR_FILE),
                metadata={"format": "pt"},
            )
            llm_state = parts[_LLM_PREFIX]
            if _is_peft(self.llm):
                if save_llm:
                    base_state = _base_weights(llm_state if llm_state is not None else self.llm.state_dict())
                    base.save_pretrained(staging / LLM_DIR, state_dict=base_state)
                self.llm.save_pretrained(str(staging), state_dict=llm_state)
                # peft's model card is no part of the model and must not replace a README.md of the user's
                (staging / "README.md").unlink(missing_ok=True)
            elif save_llm:
                self.llm.save_pretrained(staging / LLM_DIR, state_dict=llm_state)
            if tokenizer is not None:  # the processor writes the tokenizer's files and its own
                DoveLlavaProcessor.for_model(self, tokenizer).save_pretrained(staging)
        return directory

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        is_trainable: bool = False,
        **kwargs: Any,
    ) -> DoveLlavaForCausalLM:
        """Load a directory (or hub id) written by `save_pretrained`, LoRA adapter included when present.

        `dtype` is the LLM's (and the projector's); the tower keeps float32. The default, float32 whatever
        the checkpoint's dtype, gives the master weights training needs (bf16 training is autocast over
        them); pass `torch.bfloat16` to load for inference, or `"auto"` for the dtype the LLM was saved in.
        `is_trainable` keeps a loaded LoRA adapter trainable (to continue fine-tuning); `attn_implementation`
        is passed to the LLM's loader.
        """
        if "torch_dtype" in kwargs:  # would otherwise be dropped silently, leaving float32
            raise TypeError("DoveLlavaForCausalLM.from_pretrained takes dtype=, not torch_dtype=")
        directory = resolve_pretrained_dir(pretrained_model_name_or_path)
        config = DoveLlavaConfig.from_pretrained(directory)
        tower = DoveVisionTower(
            str(directory / TOWER_DIR),
            trainable=config.tower_trainable,
            use_query=config.use_query,
            threshold=config.eos_threshold,
            budget=config.token_budget,
        )
        llm_dir = directory / LLM_DIR
        if not llm_dir.is_dir():
            if not config.llm_source:
                raise FileNotFoundError(f"{directory} holds no {LLM_DIR}/ and its config records no llm_source")
            llm_dir = resolve_pretrained_dir(config.llm_source)
        llm_kwargs = {k: kwargs.pop(k) for k in ("attn_implementation",) if k in kwargs}
        with _naming_damaged_weights(llm_dir):
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=dtype or torch.float32, **llm_kwargs)
        model = cls(config, llm=llm, vision_tower=tower)
        load_projector_weights(model.mm_projector, directory / PROJECTOR_FILE)
        model.mm_projector.to(dtype=model.get_input_embeddings().weight.dtype)
        if (directory / ADAPTER_CONFIG).is_file():
            from peft import PeftModel

            with _naming_damaged_weights(directory / "adapter_model.safetensors"):
                model.llm = PeftModel.from_pretrained(model.llm, str(directory), is_trainable=is_trainable)
        if device_map is not None and str(device_map) != "auto":
            model.to(device_map)
        return model.eval()


def register_auto_classes() -> None:
    """Let `AutoConfig`, `AutoModelForCausalLM`, `AutoImageProcessor` and `AutoProcessor` open saved DOVE-LLaVA
    directories (run when this module is imported)."""
    AutoConfig.register(DoveLlavaConfig.model_type, DoveLlavaConfig, exist_ok=True)
    AutoModelForCausalLM.register(DoveLlavaConfig, DoveLlavaForCausalLM, exist_ok=True)
    AutoImageProcessor.register(
        DoveLlavaConfig,
        image_processor_classes={"torchvision": DoveLlavaImageProcessor, "pil": DoveLlavaImageProcessor},
        exist_ok=True,
    )
    AutoProcessor.register(DoveLlavaConfig, DoveLlavaProcessor, exist_ok=True)


# ---------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _naming_damaged_weights(where: Path) -> Iterator[None]:
    """transformers and peft let a damaged safetensors file escape as a bare SafetensorError naming no file."""
    from safetensors import SafetensorError, safe_open

    try:
        yield
    except SafetensorError as err:
        damaged = where
        for candidate in sorted(where.glob("*.safetensors")) if where.is_dir() else ():
            try:
                with safe_open(str(candidate), framework="pt"):
                    pass
            except SafetensorError:
                damaged = candidate
                break
        raise corrupt_weights_error(damaged, err) from err


def _images_or_pixel_values(images: Any, pixel_values: torch.Tensor | None) -> Any:
    if pixel_values is None:
        return images
    if images is not None:
        raise ValueError("pass the images once: as images= or as pixel_values=, not both")
    return pixel_values


def _llm_hidden_size(llm: PreTrainedModel) -> int:
    """The LLM's embedding width, read from the module attribute (a ZeRO-3 partitioned weight has shape [0])."""
    embeddings = llm.get_input_embeddings()
    width = getattr(embeddings, "embedding_dim", None)
    return int(width if width is not None else embeddings.weight.shape[-1])


def _image_token_id(tokenizer: Any) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer does not know {IMAGE_TOKEN}; call conversation.add_image_token(tokenizer)")
    return int(token_id)


def _sample_names(sample_ids: Sequence[Any] | None, batch_size: int) -> list[str]:
    if sample_ids is None:
        return [f"batch row {row}" for row in range(batch_size)]
    if len(sample_ids) != batch_size:
        raise ValueError(f"sample_ids has {len(sample_ids)} entries for a batch of {batch_size}")
    return [f"sample {sample_id!r}" for sample_id in sample_ids]


def _select_images(
    images: torch.Tensor | Sequence[torch.Tensor] | None,
    image_sample_mask: torch.Tensor | None,
    queries: Sequence[str | None] | None,
    budget: Any,
    batch_size: int,
) -> tuple[Any, Any, Any]:
    """Apply `image_sample_mask` to images and to per-image queries / budgets; check their counts."""
    if images is not None and not isinstance(images, torch.Tensor):
        images = list(images)
    if image_sample_mask is not None:
        mask = [bool(x) for x in torch.as_tensor(image_sample_mask).flatten().tolist()]
        if len(mask) != batch_size:
            raise ValueError(f"image_sample_mask has {len(mask)} entries for a batch of {batch_size}")
        if images is None or len(images) != batch_size:
            got = 0 if images is None else len(images)
            raise ValueError(f"with image_sample_mask, images needs one entry per sample ({batch_size}), got {got}")
        keep = [i for i, flag in enumerate(mask) if flag]
        images = images[keep] if isinstance(images, torch.Tensor) else [images[i] for i in keep]
        if queries is not None and len(queries) == batch_size:
            queries = [queries[i] for i in keep]
        if isinstance(budget, (list, tuple, torch.Tensor)) and len(budget) == batch_size:
            budget = [int(budget[i]) for i in keep]
    if images is not None and queries is not None and len(queries) != len(images):
        raise ValueError(f"queries has {len(queries)} entries but there are {len(images)} images")
    if images is not None and len(images) == 0:
        images = None
    return images, queries, budget


def _check_image_count(counts: list[int], num_images: int, names: list[str]) -> None:
    total = sum(counts)
    if total == num_images:
        return
    if total > num_images:
        seen = 0
        for name, count in zip(names, counts):
            seen += count
            if seen > num_images:
                raise ValueError(
                    f"{name}: more {IMAGE_TOKEN} placeholders than images (the batch has {total} placeholders "
                    f"and {num_images} images)"
                )
    lacking = [name for name, count in zip(names, counts) if count == 0]
    raise ValueError(
        f"{num_images} images for {total} {IMAGE_TOKEN} placeholders; each image needs a placeholder in its "
        f"sample's text (samples without one: {', '.join(lacking) or 'none'})"
    )


def _split_state(state_dict: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor] | None]:
    prefixes = (_TOWER_PREFIX, _PROJECTOR_PREFIX, _LLM_PREFIX)
    if state_dict is None:
        return dict.fromkeys(prefixes)
    parts: dict[str, dict[str, torch.Tensor] | None] = {p: {} for p in prefixes}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                parts[prefix][key[len(prefix) :]] = value
                break
    return parts


def _is_peft(module: nn.Module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "get_base_model")


def _base_weights(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A peft model's state dict -> the base LLM's own keys (adapter tensors dropped, wrappers unwrapped)."""
    prefix = "base_model.model."
    clean = {}
    for key, value in peft_state.items():
        if "lora_" in key or ".modules_to_save." in key:
            continue
        key = key.removeprefix(prefix)
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        clean[key] = value
    return clean


register_auto_classes()
