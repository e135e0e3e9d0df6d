"""LLaVA's two-stage recipe for a DOVE VLM, on the Hugging Face Trainer (optionally under DeepSpeed).

Stage 1 (alignment): everything frozen but the projector; the `plain` template (the image, then the
answer). Stage 2 (instruction tuning): LoRA adapters on the LLM's linear layers, or the whole LLM,
plus the projector at its own learning rate; the LLM's chat template (or `vicuna_v1`). The tower's own
trainable part (`tower_trainable`) joins stage 2. The EOS head learns only through a length objective
(`token_price`, see `length_objective`): lengths are a hard cut, so the LM loss alone never reaches it.

DeepSpeed: pass a ZeRO config by name (`zero2`, `zero3`, `zero3_offload`: shipped in
`llava_adapter/deepspeed_configs`) or as a path to a JSON file; the Trainer fills its "auto" fields.
Launch with `deepspeed` or `torchrun` (see `scripts/finetune_*.sh`), or as a plain process for a single
device. `bf16` under DeepSpeed runs as DeepSpeed's torch autocast rather than its bf16 mode: the bf16
mode casts every parameter directly, bypassing the guard that keeps the VQ encoder in fp32, whereas
autocast leaves parameters in fp32 and the VQ switches autocast off.

The model is built before the DeepSpeed config is handed to `transformers`, so ZeRO-3 partitions it when
the engine starts rather than while the LLM loads (`zero.Init`); each process holds the full model once
during loading.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from tokenizer.evaluation.loss_curve import LOSS_CURVE_FILE, plot_loss_curve
from tokenizer.hub import remove_saved_files, resolve_pretrained_dir
from tokenizer.training.checkpointing import (
    CorruptCheckpointError,
    check_file_digests,
    existing_run_error,
    file_digests,
    newest_usable,
)

from .conversation import add_image_token
from .data import LlavaCollator, LlavaConversationDataset, pad_token_id
from .deepspeed_configs import resolve_deepspeed_config
from .inference import load_llm_tokenizer
from .length_objective import DEFAULT_CANDIDATES, AnswerLengthObjective
from .lora import apply_lora, is_lora_wrapped, merge_lora
from .modeling import DoveLlavaForCausalLM
from .sampler import VisualLengthGroupedSampler, cached_visual_lengths, expanded_lengths
from .vision_tower import TRAINING_LENGTHS

logger = logging.getLogger(__name__)

LOG_FILE = "finetune_log.json"
TRAINING_ARGS_FILE = "training_args.bin"  # the Trainer's own name for it
CHECKPOINT_RECORD = "checkpoint_files.json"  # sizes and checksums of a Trainer checkpoint's files
STAGE_TEMPLATES = {1: "plain", 2: None}  # None: the model's recorded template, else "auto"
DEFAULT_LEARNING_RATES = {"stage1": 1e-3, "lora": 2e-4, "full": 2e-5}  # LLaVA-1.5's


@dataclass
class FinetuneArguments:
    """Everything one stage needs. Either `model` (a saved VLM, e.g. stage 1's output) or `llm` and
    `tower` (plus `pretrained_projector` to start stage 2 from a projector file) name the starting point."""

    stage: int
    data: str
    output_dir: str
    image_folder: str | None = None
    model: str | None = None
    llm: str | None = None
    tower: str | None = None
    tokenizer: str | None = None
    projector_type: str = "mlp2x_gelu"
    pretrained_projector: str | None = None
    template: str | None = None
    use_query: bool = True
    tower_trainable: str | None = None  # None: the saved model's part with `model`, else "none"
    threshold: float | None = None
    budget: int | None = None
    train_lengths: str = "auto"  # "uniform": each training image gets a random length (vision_tower.TRAINING_LENGTHS)
    token_price: float | None = None  # None: the saved model's price with `model`, else no length objective
    length_candidates: int = DEFAULT_CANDIDATES
    model_max_length: int | None = None
    lora: bool = False
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    learning_rate: float | None = None
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    bf16: bool = False
    deepspeed: str | None = None
    group_by_visual_length: bool = True
    visual_length_cache: str | None = None
    visual_length_batch_size: int = 32
    dataloader_num_workers: int = 0
    cache_dataset: bool = False  # keep tokenised conversations and pixels in memory after their first use
    save_steps: int | None = None
    save_total_limit: int | None = 1
    logging_steps: int = 1
    seed: int = 0
    report_to: list[str] = field(default_factory=list)
    save_llm: bool | None = None
    resume: bool = False
    overwrite: bool = False
    strict: bool = False  # an unreadable image stops the run (before the first step) instead of being skipped
    allow_outside_root: bool = False  # records' image paths may be absolute or climb out of image_folder
    progress: bool | None = None  # progress bars (Trainer, visual-length pass); None: when stderr is a terminal

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if self.stage == 1 and self.lora:
            raise ValueError("stage 1 trains the projector only; LoRA belongs to stage 2")
        if self.model is None and (self.llm is None or self.tower is None):
            raise ValueError("name a saved model (--model) or both an LLM (--llm) and a tower (--tower)")
        if self.model is not None and (self.llm is not None or self.tower is not None):
            raise ValueError("--model already holds the LLM and the tower; do not combine it with --llm/--tower")
        if self.model is not None and self.pretrained_projector is not None:
            raise ValueError("--pretrained-projector applies when building from --llm/--tower, not with --model")
        if self.token_price is not None:
            if not math.isfinite(self.token_price) or self.token_price < 0:
                raise ValueError(f"--token-price must be a finite number >= 0, got {self.token_price}")
            if self.stage == 1:
                raise ValueError("--token-price tunes the tower's EOS head, which trains in stage 2, not stage 1")
            if self.tower_trainable == "none":
                raise ValueError("--token-price needs a trainable EOS head: --tower-trainable eos_head (or generator)")
            if self.budget is not None:
                raise ValueError("--budget forces every length, leaving --token-price nothing to choose; pass one")
        if self.train_lengths not in TRAINING_LENGTHS:
            raise ValueError(
                f"--train-lengths must be one of {', '.join(TRAINING_LENGTHS)}, got {self.train_lengths!r}"
            )
        if self.train_lengths != "auto" and self.budget is not None:
            raise ValueError("--budget forces every length, so --train-lengths has nothing to draw; pass one")
        if self.train_lengths != "auto" and self.token_price is not None:
            raise ValueError(
                "--train-lengths uniform trains the LLM on random lengths while --token-price tunes the EOS head's "
                "choice of length: run them as separate stages"
            )
        if self.length_candidates < 2:
            raise ValueError(f"length_candidates must be at least 2, got {self.length_candidates}")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate is None:
            kind = "stage1" if self.stage == 1 else "lora" if self.lora else "full"
            self.learning_rate = DEFAULT_LEARNING_RATES[kind]


@dataclass
class FinetuneResult:
    """What a finished stage leaves in memory. Under ZeRO-3 `model`'s parameters are partitioned: run it
    through `trainer.model_wrapped` (the DeepSpeed engine), or reload `output_dir`."""

    output_dir: Path
    losses: list[float]
    model: DoveLlavaForCausalLM
    tokenizer: PreTrainedTokenizerBase
    trainer: Trainer
    visual_length_cache: Path | None


# ---------------------------------------------------------------------------------------------- model


def load_model(args: FinetuneArguments) -> tuple[DoveLlavaForCausalLM, PreTrainedTokenizerBase]:
    """The starting model and its LLM tokenizer (which learns `<image>` if it did not know it)."""
    dtype = torch.float32  # bf16 is autocast over fp32 weights (module doc), with or without DeepSpeed
    if args.model is not None:
        directory = resolve_pretrained_dir(args.model)
        model = DoveLlavaForCausalLM.from_pretrained(directory, dtype=dtype, is_trainable=True)
        tokenizer = (
            AutoTokenizer.from_pretrained(resolve_pretrained_dir(args.tokenizer))
            if args.tokenizer
            else load_llm_tokenizer(directory, model)
        )
        image_id = add_image_token(tokenizer)
        if image_id != model.config.image_token_id:
            raise ValueError(
                f"the tokenizer maps <image> to {image_id} but {args.model} was trained with id "
                f"{model.config.image_token_id}; use the tokenizer saved with the model"
            )
        if args.model_max_length is not None:
            model.config.model_max_length = args.model_max_length
        if args.tower_trainable is not None:
            model.vision_tower.set_trainable(args.tower_trainable)
            model.config.tower_trainable = args.tower_trainable
        if args.token_price is not None:
            model.config.token_price = args.token_price
        return model, tokenizer
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained_dir(args.tokenizer or args.llm))
    add_image_token(tokenizer)
    model = DoveLlavaForCausalLM.from_components(
        args.llm,
        args.tower,
        projector_type=args.projector_type,
        tokenizer=tokenizer,
        tower_trainable=args.tower_trainable or "none",
        use_query=args.use_query,
        threshold=args.threshold,
        budget=args.budget,
        model_max_length=args.model_max_length,
        conversation_template=args.template if args.template and args.stage == 2 else "auto",
        pretrained_projector=args.pretrained_projector,
        dtype=dtype,
    )
    model.config.token_price = args.token_price
    return model, tokenizer


def length_objective(model: DoveLlavaForCausalLM, args: FinetuneArguments) -> AnswerLengthObjective | None:
    """The stage's length objective, or None; refuses an EOS head that would train without one.

    The price is the run's `token_price`, else the one the model was saved with (continuing a tuned model)."""
    if args.stage == 1:
        return None
    price = model.config.token_price
    trainable = model.vision_tower.trainable
    if trainable == "eos_head" and price is None:
        raise ValueError(
            "--tower-trainable eos_head trains nothing by itself: lengths are a hard cut of the tokens, so the "
            "answer loss never reaches the EOS head. Give it a length objective with --token-price BETA (the "
            "answer loss one visual token must save to be kept; 0 prices tokens at nothing)"
        )
    if args.token_price is not None and trainable == "none":
        raise ValueError("--token-price needs a trainable EOS head: --tower-trainable eos_head (or generator)")
    if price is None or trainable == "none":  # a frozen head keeps the price it was tuned at, as a record
        return None
    if model.vision_tower.budget is not None:
        raise ValueError(f"the tower forces {model.vision_tower.budget} tokens per image: no length left to learn")
    return AnswerLengthObjective(price, candidates=args.length_candidates)


def configure_trainable(model: DoveLlavaForCausalLM, args: FinetuneArguments) -> DoveLlavaForCausalLM:
    """Freeze and unfreeze by stage; wrap the LLM in LoRA for a LoRA stage 2."""
    if is_lora_wrapped(model.llm) and (args.stage == 1 or not args.lora):
        merge_lora(model)  # an adapter from an earlier run becomes part of the weights being trained on
    model.llm.requires_grad_(False)
    model.mm_projector.requires_grad_(True)
    if args.stage == 1:
        model.vision_tower.requires_grad_(False)
    elif args.lora:
        if not is_lora_wrapped(model.llm):
            model.llm = apply_lora(
                model.llm,
                r=args.lora_r,
                alpha=args.lora_alpha,
                dropout=args.lora_dropout,
                target_modules=args.lora_target_modules,
            )
        else:  # continuing an adapter loaded with the model
            for name, param in model.llm.named_parameters():
                param.requires_grad_("lora_" in name)
    else:
        model.llm.requires_grad_(True)
    if args.gradient_checkpointing:
        base = model.llm.get_base_model() if is_lora_wrapped(model.llm) else model.llm
        # Non-reentrant checkpointing keeps gradients flowing to adapters even though the (frozen)
        # embeddings that feed the first block do not require grad.
        if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.2x
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    return model


def trainable_parameter_groups(
    model: DoveLlavaForCausalLM, learning_rate: float, projector_lr: float | None, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer groups: the projector at `projector_lr` (when given), the rest at `learning_rate`;
    no weight decay on biases and norms."""

    def decays(name: str, param: nn.Parameter) -> bool:
        lowered = name.lower()
        return param.ndim >= 2 and "norm" not in lowered and not lowered.endswith("bias")

    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_projector = name.startswith("mm_projector.")
        groups.setdefault((is_projector, decays(name, param)), []).append(param)
    result = []
    for (is_projector, decay), params in sorted(groups.items()):
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if is_projector and projector_lr is not None:
            group["lr"] = projector_lr
        result.append(group)
    if not result:
        raise ValueError("nothing to train: every parameter is frozen")
    return result


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------- trainer


class DoveLlavaTrainer(Trainer):
    """The HF Trainer with four changes: the visual-length-grouped sampler, the projector's own
    learning rate, saving through `DoveLlavaForCausalLM.save_pretrained` (tower, projector, adapter), and,
    with a `length_objective`, that objective as the loss (its lengths logged as `expected_visual_tokens`
    and `visual_tokens`, the threshold's choice)."""

    def __init__(
        self,
        *args: Any,
        sample_lengths: Sequence[int] | None = None,
        projector_lr: float | None = None,
        save_llm: bool = True,
        length_objective: AnswerLengthObjective | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.sample_lengths = list(sample_lengths) if sample_lengths is not None else None
        self.projector_lr = projector_lr
        self.save_llm = save_llm
        self.length_objective = length_objective
        self._length_logs: list[tuple[float, float]] = []
        if length_objective is not None:
            self.loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides it by the accumulation

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        if self.length_objective is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        result = self.length_objective(model, self.accelerator.unwrap_model(model), inputs)
        if math.isfinite(result.expected_length):
            self._length_logs.append((result.expected_length, result.threshold_length))
        return (result.loss, result) if return_outputs else result.loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._length_logs and "loss" in logs:
            logs["expected_visual_tokens"] = sum(e for e, _ in self._length_logs) / len(self._length_logs)
            logs["visual_tokens"] = sum(t for _, t in self._length_logs) / len(self._length_logs)
            self._length_logs = []
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        if self.sample_lengths is None:
            return super()._get_train_sampler(train_dataset)
        return VisualLengthGroupedSampler(
            self.sample_lengths,
            batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps,
            seed=self.args.seed,
        )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            groups = trainable_parameter_groups(
                opt_model, self.args.learning_rate, self.projector_lr, self.args.weight_decay
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume (without DeepSpeed, whose engine loads its own files): the Trainer's loader looks for one
        model.safetensors, where a DOVE VLM checkpoint holds the `save_pretrained` layout."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        saved = DoveLlavaForCausalLM.from_pretrained(resume_from_checkpoint, is_trainable=True)
        model.load_state_dict(saved.state_dict(), strict=True)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the model on the saving process only: under DeepSpeed the Trainer calls `_save` on every rank
        (after the collective gather of the state dict), and two ranks writing one directory collide."""
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        model.save_pretrained(
            output_dir, state_dict=state_dict, tokenizer=self.processing_class, save_llm=self.save_llm
        )
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))


# ---------------------------------------------------------------------------------------------- stage


def deepspeed_config(path: str | os.PathLike, bf16: bool) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (a packaged config's name or a path); with `bf16`, its bf16 mode becomes
    bf16 torch autocast (see module doc)."""
    path = resolve_deepspeed_config(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise TypeError(f"DeepSpeed config {path} must hold a JSON object, not {type(config).__name__}")
    if bf16:
        config["bf16"] = {"enabled": False}
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if "optimizer" in config:
        logger.warning(
            "%s defines its own optimizer: DeepSpeed builds it over all trainable parameters at one learning "
            "rate, so --projector-lr does not apply",
            path,
        )
    return config


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` directories the Trainer wrote in `output_dir`, oldest first."""
    steps = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name.removeprefix("checkpoint-")
        if path.is_dir() and suffix.isdigit():
            steps.append((int(suffix), path))
    return [path for _, path in sorted(steps)]


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-<step>` in `output_dir` that verifies (`verify_trainer_checkpoint`), or None to
    start afresh. Each damaged one is skipped with a warning naming it; when none is usable, the error names
    every damaged file.

    The newest is transformers' `get_last_checkpoint`; ours goes further because that one picks the
    highest-numbered directory without looking inside, and a run killed mid-save (or a damaged file) must
    fall back to the checkpoint before it rather than crash in `torch.load` or resume from half a state."""
    if not Path(output_dir).is_dir():
        return None
    newest = get_last_checkpoint(str(output_dir))
    if newest is None:
        return None
    older = [path for path in reversed(checkpoint_dirs(output_dir)) if path != Path(newest)]

    def verified(path: Path) -> str:
        verify_trainer_checkpoint(path)
        return str(path)

    return newest_usable(
        [Path(newest), *older],
        verified,
        where=output_dir,
        advice="Delete the damaged checkpoint-* directories to resume from an earlier one, or start afresh with "
        "--overwrite",
    )


def verify_trainer_checkpoint(path: str | os.PathLike) -> None:
    """Raise `CorruptCheckpointError` naming the file when a Trainer checkpoint is unfinished or damaged.

    With the record `ChecksumCallback` writes, every file must have its recorded size and SHA-256. Without
    one (a kill between the Trainer's save and the record), every file must at least open: the Trainer's
    state as JSON, safetensors headers, and torch.save archives as zip files, none of them unpickled."""
    path = Path(path)
    record = path / CHECKPOINT_RECORD
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptCheckpointError(f"{record} is not valid JSON: {err}") from err
        check_file_digests(path, recorded)
        return
    state = path / TRAINER_STATE_NAME
    if not state.is_file():
        raise CorruptCheckpointError(f"{path} has no {TRAINER_STATE_NAME}: the Trainer never finished writing it")
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file):
                    pass
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as err:
            raise CorruptCheckpointError(f"{file} is damaged ({type(err).__name__}: {err})") from err


class ChecksumCallback(TrainerCallback):
    """Records the size and SHA-256 of every file of each checkpoint once the Trainer has written it, so a
    resume can tell a damaged checkpoint (`verify_trainer_checkpoint`) and fall back to the one before."""

    def on_save(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every process has written its part of the checkpoint
        directory = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and directory.is_dir():
            files = {k: v for k, v in file_digests(directory).items() if k != CHECKPOINT_RECORD}
            partial = directory / f".{CHECKPOINT_RECORD}.tmp"
            partial.write_text(json.dumps(files, indent=1) + "\n")
            os.replace(partial, directory / CHECKPOINT_RECORD)


def claim_output_dir(args: FinetuneArguments) -> None:
    """Refuse a fresh run over an earlier run's checkpoints (the Trainer would mix both, and `--resume` would
    continue the old one); `overwrite` deletes those checkpoints, and the model and log that run saved."""
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite discards it: pass one of them")
    found = checkpoint_dirs(args.output_dir)
    if args.resume or not found:
        return
    if not args.overwrite:
        raise existing_run_error(args.output_dir, found)
    if args.model and Path(args.model).resolve() == Path(args.output_dir).resolve():
        raise ValueError(f"--model {args.model} is the model --overwrite would delete; write to another --output")
    if int(os.environ.get("RANK", "0")) == 0:
        logger.warning("--overwrite: discarding the earlier run in %s", args.output_dir)
        for path in found:
            shutil.rmtree(path)
        remove_saved_files(args.output_dir)
        for name in (LOG_FILE, LOSS_CURVE_FILE, TRAINING_ARGS_FILE):
            Path(args.output_dir, name).unlink(missing_ok=True)


def build_training_arguments(args: FinetuneArguments) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    ds_config = deepspeed_config(args.deepspeed, args.bf16) if args.deepspeed else None
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        lr_scheduler_type=args.lr_scheduler_type,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps,
        # Under DeepSpeed, bf16 is autocast configured in the DeepSpeed config itself.
        bf16=args.bf16 and ds_config is None,
        use_cpu=not on_gpu,
        deepspeed=ds_config,
        remove_unused_columns=False,
        dataloader_num_workers=args.dataloader_num_workers,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        report_to=args.report_to or "none",
        # The Trainer's bar (with its ETA) on a terminal; in a log file its redraws would be noise, and the
        # Trainer prints each logged loss as a line instead.
        disable_tqdm=not (sys.stderr.isatty() if args.progress is None else args.progress),
    )


def finetune(args: FinetuneArguments, callbacks: Sequence[TrainerCallback] = ()) -> FinetuneResult:
    """Run one stage and save the model (config, tower, projector, LLM or adapter, tokenizer) to `output_dir`.

    `callbacks` go to the Trainer (progress reporting, measurements)."""
    # A DeepSpeed config left active by an earlier run in this process would make `from_pretrained`
    # partition the LLM while it loads (ZeRO-3); this stage builds its model unpartitioned (module doc).
    unset_hf_deepspeed_config()
    claim_output_dir(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args)
    objective = length_objective(model, args)
    configure_trainable(model, args)
    model.vision_tower.training_lengths = args.train_lengths
    template = args.template or STAGE_TEMPLATES[args.stage] or model.config.conversation_template or "auto"
    dataset = LlavaConversationDataset(
        args.data,
        tokenizer,
        model.vision_tower.image_processor,
        image_folder=args.image_folder,
        template=template,
        use_query=model.config.use_query,
        allow_outside_root=args.allow_outside_root,
        cache_items=args.cache_dataset,
    )
    dataset.drop_unreadable_images(strict=args.strict, num_workers=args.dataloader_num_workers)
    training_args = build_training_arguments(args)

    lengths = None
    cache_path = None
    if args.group_by_visual_length:
        # The Trainer would move the model to the device only when training starts; the one pass of the
        # tower over the data should already run there.
        model.vision_tower.to(training_args.device)
        with training_args.main_process_first(local=False, desc="visual lengths"):
            visual, cache_path, hit = cached_visual_lengths(
                model.vision_tower,
                dataset,
                cache_dir=args.visual_length_cache,
                batch_size=args.visual_length_batch_size,
                num_workers=args.dataloader_num_workers,
                progress=not training_args.disable_tqdm,
            )
        logger.info("visual lengths %s %s", "read from" if hit else "written to", cache_path)
        lengths = expanded_lengths(dataset.text_length_estimates(), visual)

    save_llm = args.save_llm
    if save_llm is None:  # skip rewriting a frozen LLM that can be reloaded from where it came from
        llm_trained = args.stage == 2 and not args.lora
        save_llm = llm_trained or not model.config.llm_source
    counts = count_parameters(model)
    logger.info("stage %d: %d of %d parameters trainable", args.stage, counts["trainable"], counts["total"])

    trainer = DoveLlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=LlavaCollator(pad_token_id(tokenizer)),
        processing_class=tokenizer,
        sample_lengths=lengths,
        projector_lr=args.projector_lr if args.stage == 2 else None,
        save_llm=save_llm,
        length_objective=objective,
        callbacks=[ChecksumCallback(), *callbacks],
    )
    try:
        trainer.train(resume_from_checkpoint=latest_checkpoint(args.output_dir) if args.resume else None)
        if args.stage == 2:
            model.config.conversation_template = template  # what generation should reproduce
        trainer.save_model(args.output_dir)
    finally:
        unset_hf_deepspeed_config()
    if not trainer.is_deepspeed_enabled:
        # Drop the autocast wrapper `accelerate` put around `forward` for bf16, so the returned model
        # computes as a reloaded one does.
        model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    losses = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        record = {
            "arguments": asdict(args),
            "template": template,
            "parameters": counts,
            "losses": losses,
            "visual_length_cache": str(cache_path) if cache_path else None,
            "log_history": trainer.state.log_history,
        }
        Path(args.output_dir, LOG_FILE).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        plot_loss_curve(
            trainer.state.log_history, Path(args.output_dir, LOSS_CURVE_FILE), title=f"finetune stage {args.stage}"
        )
    if any(not math.isfinite(loss) for loss in losses):
        raise FloatingPointError(f"training produced a non-finite loss: {losses}")
    return FinetuneResult(Path(args.output_dir), losses, model, tokenizer, trainer, cache_path)
