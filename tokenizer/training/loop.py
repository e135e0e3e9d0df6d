"""The DOVE / Q-DOVE tokenizer training loop, on accelerate (one process, or DDP under `accelerate launch` / `torchrun`).

The first `vq_warmup_steps` steps (0 by default) train only the VQ autoencoder, MSE(VQ(pixels), pixels)
plus its codebook loss: a VQ trained from scratch must mean something before tokens can describe it.
The next `full_length_steps` (0 by default) decode every image from all N tokens, without length control:
tokens first learn to describe the image, then to put what matters most first.

One micro-step (`gradient_accumulation_steps` of them per optimiser step):

    pixels, query --TrainingModel--> all N tokens, EOS logits, the VQ's latents of the input
    predicted length = first EOS past the threshold (no gradient)
    training length  = the predicted one or a uniform draw (`sample_training_lengths`), per sample
    tokens[:L] --token decoder--> latent grid --VQ decoder--> reconstruction
    generator loss (`TokenizerObjective`, objective.py) -> backward, clip, step
    discriminator loss on (input, reconstruction) -> backward, clip, step      from `adversarial_start_step`

The VQ stays in fp32 whatever `mixed_precision` says (`VQBackbone` refuses casts and turns autocast off);
the generator and decoder run under autocast. Checkpoints (see `checkpointing`) resume exactly: weights,
optimisers, schedules, discriminator, the length-control history, every RNG and the data position.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..evaluation.loss_curve import LOSS_CURVE_FILE, plot_loss_curve
from ..hub import remove_saved_files
from ..modeling.dove_tokenizer import WEIGHTS_NAME, DoveTokenizer
from ..modeling.length import lengths_from_eos, mask_from_lengths
from .checkpointing import CheckpointManager, RNGState, TrainingCheckpoint, existing_run_error
from .config import ModelSpec, TrainConfig, TrainingSetup
from .data import SKIPPED_WARN_SHARE, build_dataset, collate_examples
from .discriminator import PatchDiscriminator
from .length_control import LengthControl, sample_training_lengths
from .losses import drop_queries
from .objective import TokenizerObjective
from .sampler import ResumableSampler

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
SAMPLES_DIR = "samples"
LOGS_DIR = "logs"
METRICS_FILE = "metrics.jsonl"
CURVE_KEYS = ("loss/total", "loss/vq_reconstruction", "loss/reconstruction", "loss/latent", "loss/length")


def build_tokenizer(spec: ModelSpec) -> DoveTokenizer:
    """The model a run starts from: a preset, pretrained components, or an earlier checkpoint."""
    if spec.init_from is not None:
        return DoveTokenizer.from_pretrained(spec.init_from)
    if spec.vq is not None or spec.generator is not None:
        if spec.vq is None or spec.generator is None:
            raise ValueError("model: pretrained initialisation needs both `vq` and `generator` (paths or hub ids)")
        return DoveTokenizer.from_components(
            spec.vq, spec.generator, text_tokenizer=spec.text_tokenizer, preset=spec.preset,
            vq_subfolder=spec.vq_subfolder, **spec.overrides,
        )  # fmt: skip
    text_tokenizer = None
    if spec.text_tokenizer is not None:
        from transformers import AutoTokenizer

        from ..hub import resolve_pretrained_dir

        text_tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained_dir(spec.text_tokenizer))
    return DoveTokenizer(spec.architecture(), text_tokenizer=text_tokenizer)


class TrainingModel(nn.Module):
    """The tokenizer's whole training forward as ONE module call, so DDP sees every parameter in one forward.

    `choose_lengths(predicted) -> lengths` picks each sample's reconstruction length from the EOS
    head's own prediction. The VQ's codebook/commitment loss (which `VQBackbone.encode` discards) is
    caught with a forward hook on the quantiser.
    """

    def __init__(self, tokenizer: DoveTokenizer) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self._codebook_loss: torch.Tensor | None = None
        tokenizer.vq.model.quantize.register_forward_hook(self._catch_codebook_loss)

    def _catch_codebook_loss(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._codebook_loss = output[1]

    def forward(
        self,
        pixels: torch.Tensor,
        query_ids: torch.Tensor | None,
        query_mask: torch.Tensor | None,
        choose_lengths: Callable[[torch.Tensor], torch.Tensor],
        vq_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        model = self.tokenizer
        if vq_only:  # the VQ autoencoder alone (warm-up)
            latents = model.vq.encode(pixels)
            codebook = self._codebook_loss if self._codebook_loss is not None else latents.new_zeros(())
            self._codebook_loss = None
            return {"vq_recon": model.vq.decode(latents), "codebook_loss": codebook}
        tokens, eos_logits, target_latents = model(pixels, query_ids, query_mask)
        with torch.no_grad():
            predicted = lengths_from_eos(
                torch.sigmoid(eos_logits.float()), model.config.eos_threshold, model.config.min_tokens
            )
        lengths = choose_lengths(predicted).to(pixels.device)
        mask = mask_from_lengths(lengths, model.max_tokens)
        latents = model.decode_latents(tokens, mask)
        recon = model.vq.decode(latents)
        codebook = self._codebook_loss if self._codebook_loss is not None else recon.new_zeros(())
        self._codebook_loss = None
        return {
            "recon": recon,
            "latents": latents,
            "target_latents": target_latents,
            "eos_logits": eos_logits,
            "lengths": lengths,
            "predicted_lengths": predicted,
            "codebook_loss": codebook,
        }


def parameter_groups(tokenizer: DoveTokenizer, config: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups VQ / generator / decoder, each with its learning rate. A frozen VQ gets no group at all.

    Biases, norms and learned position/query tables skip weight decay (the usual transformer recipe).
    """
    parts = [("decoder", tokenizer.decoder, config.lr_decoder), ("generator", tokenizer.generator, config.lr_generator)]
    if not config.freeze_vq or config.vq_warmup_steps > 0:  # a frozen VQ still trains during its warm-up
        parts.insert(0, ("vq", tokenizer.vq, config.lr_vq))
    groups = []
    for name, module, lr in parts:
        decay, no_decay = [], []
        for pname, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (no_decay if param.ndim < 2 or pname.endswith(("_pos", "grid_queries")) else decay).append(param)
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": config.weight_decay})
        groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then a cosine down to `min_ratio` at `total_steps` (a multiplier on each group's lr).

    transformers' `get_cosine_with_min_lr_schedule_with_warmup` has the same cosine but spends step 0 at
    lr 0 and has no late start (`warmup_cosine_from`), so both schedules stay here as two small functions."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_from(step: int, start_step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """`warmup_cosine` for a part that starts training at `start_step` (the discriminator): 0 before it, then
    the warm-up from its first step and the cosine over the steps left. Counted from step 0 instead, a part
    starting late would skip its warm-up and begin part-way down the decay."""
    if step < start_step:
        return 0.0
    return warmup_cosine(step - start_step, warmup_steps, max(1, total_steps - start_step), min_ratio)


@torch.no_grad()
def init_codebook_from_data(tokenizer: DoveTokenizer, pixels: torch.Tensor, seed: int) -> int:
    """Reset the VQ codebook to randomly chosen encoder outputs of real images; returns the number of codes.

    A freshly initialised diffusers VQ draws its codes from U(-1/K, 1/K): every quantised latent is then
    nearly zero, the generator sees almost nothing of the image, and a from-scratch run spends most of
    its steps waiting for the codebook to grow. Codes taken from the data (the usual data-dependent VQ
    initialisation) carry the encoder's features at their own scale from the first step. Meant for VQs
    trained from scratch; a pretrained VQ keeps its codebook.
    """
    model = tokenizer.vq.model
    hidden = model.quant_conv(model.encoder(pixels.float().to(tokenizer.vq.device)))
    vectors = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
    codebook = model.quantize.embedding.weight
    generator = torch.Generator().manual_seed(seed)
    if vectors.shape[0] >= codebook.shape[0]:
        chosen = vectors[torch.randperm(vectors.shape[0], generator=generator)[: codebook.shape[0]]]
    else:
        picks = torch.randint(vectors.shape[0], (codebook.shape[0],), generator=generator)
        noise = torch.randn(codebook.shape, generator=generator) * vectors.std() * 0.01
        chosen = vectors[picks] + noise.to(vectors.device)
    codebook.copy_(chosen.to(codebook.dtype))
    return codebook.shape[0]


def last_trainable_layer(tokenizer: DoveTokenizer) -> torch.Tensor:
    """The weight the adaptive adversarial weight balances gradients at: the last layer before the pixels
    that trains (the VQ decoder's output conv, or the token decoder's output projection when the VQ is frozen)."""
    conv_out = tokenizer.vq.model.decoder.conv_out.weight
    return conv_out if conv_out.requires_grad else tokenizer.decoder.latent_out.weight


@dataclass
class TrainingSummary:
    output_dir: Path
    final_dir: Path
    steps: int
    resumed_from: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    skipped_images: int = 0


class TokenizerTrainer:
    """Sets up data, model, discriminator, optimisers and accelerate; `train()` runs to `max_steps`."""

    def __init__(
        self,
        setup: TrainingSetup,
        data: str | os.PathLike,
        output_dir: str | os.PathLike,
        annotations: str | os.PathLike | None = None,
        strict: bool = False,
        resume: bool | str | os.PathLike = False,
        dataset_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
        overwrite: bool = False,
    ) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.setup = setup
        self.config = config = setup.train
        self.output_dir = Path(output_dir)
        self.data = str(data)
        self.with_queries = annotations is not None or bool((dataset_kwargs or {}).get("question_column"))
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        tracker = None if config.tracker == "none" else config.tracker
        self.accelerator = accelerator = Accelerator(
            # Without this, accelerate treats `torchrun` processes on a CPU-only host as separate single runs.
            cpu=not _has_accelerator_device(),
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=tracker,
            project_dir=str(self.output_dir / LOGS_DIR),
            # The query embedding takes no part in a batch without queries (DOVE data, or every query dropped).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.progress = progress and accelerator.is_local_main_process
        set_seed(config.seed)  # the same initial weights on every process

        self.checkpoints = CheckpointManager(self.output_dir, keep=max(1, config.keep_checkpoints))
        self._claim_output(resume, overwrite)
        tokenizer = build_tokenizer(setup.model)
        tokenizer.set_gradient_checkpointing(config.gradient_checkpointing)
        self.tokenizer = tokenizer
        if config.vq_warmup_steps == 0:
            self._freeze_vq_parts()
        self.dataset = build_dataset(
            data, annotations, image_size=tokenizer.config.image_size, strict=strict, **(dataset_kwargs or {})
        )
        self.discriminator = PatchDiscriminator(
            base_channels=config.discriminator_channels, n_layers=config.discriminator_layers
        )
        self.objective = TokenizerObjective(config, config.vq_warmup_steps, config.full_length_steps)
        betas = (config.adam_beta1, config.adam_beta2)
        gen_optimizer = torch.optim.AdamW(parameter_groups(tokenizer, config), betas=betas)
        disc_optimizer = torch.optim.AdamW(
            self.discriminator.parameters(), lr=config.lr_discriminator, betas=(0.5, 0.9), weight_decay=0.0
        )
        schedule = partial(
            warmup_cosine, warmup_steps=config.warmup_steps, total_steps=config.max_steps, min_ratio=config.min_lr_ratio
        )
        # Not passed through accelerator.prepare: its scheduler wrapper steps once per process per call.
        self.gen_schedule = torch.optim.lr_scheduler.LambdaLR(gen_optimizer, schedule)
        disc_schedule = partial(
            warmup_cosine_from, start_step=config.adversarial_start_step, warmup_steps=config.warmup_steps,
            total_steps=config.max_steps, min_ratio=config.min_lr_ratio,
        )  # fmt: skip
        self.disc_schedule = torch.optim.lr_scheduler.LambdaLR(disc_optimizer, disc_schedule)
        self.sampler = ResumableSampler(
            len(self.dataset), seed=config.seed, num_replicas=accelerator.num_processes, rank=accelerator.process_index
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=config.batch_size,
            sampler=self.sampler,
            collate_fn=collate_examples,
            num_workers=config.num_workers,
            persistent_workers=config.num_workers > 0,
        )
        # The loop's own randomness (query dropping, training lengths): one generator per process.
        self.rng = torch.Generator().manual_seed(config.seed * 1_000_003 + accelerator.process_index)
        self.step = 0
        self.skipped_images = 0
        self.images_seen = 0
        self.resumed_from: Path | None = None

        checkpoint = self._find_checkpoint(resume)
        if checkpoint is None and config.codebook_init_images > 0:
            images = self._first_images(config.codebook_init_images)
            if images is not None:
                init_codebook_from_data(tokenizer, images, config.seed)
        if checkpoint is not None:  # weights before prepare(), so DDP broadcasts the restored ones
            tokenizer.load_weights(checkpoint.model_dir / WEIGHTS_NAME)
            if checkpoint.discriminator:
                self.discriminator.load_state_dict(checkpoint.discriminator)

        self.train_model, self.disc_model, self.gen_optimizer, self.disc_optimizer = accelerator.prepare(
            TrainingModel(tokenizer), self.discriminator, gen_optimizer, disc_optimizer
        )
        self.objective.to(accelerator.device)
        self.last_layer = last_trainable_layer(tokenizer)
        self.grid_pixels = self._grid_examples()
        if checkpoint is not None:
            self._restore(checkpoint)

    def _freeze_vq_parts(self) -> None:
        """Apply `freeze_vq` / `freeze_vq_encoder`: from the start, or once the VQ warm-up is over."""
        vq = self.tokenizer.vq
        if self.config.freeze_vq:
            vq.requires_grad_(False)
        elif self.config.freeze_vq_encoder:
            for part in (vq.model.encoder, vq.model.quant_conv, vq.model.quantize):
                part.requires_grad_(False)

    @property
    def in_vq_warmup(self) -> bool:
        return self.step < self.config.vq_warmup_steps

    # ------------------------------------------------------------------ resume

    def _claim_output(self, resume: bool | str | os.PathLike, overwrite: bool) -> None:
        """Refuse a fresh run where an earlier one left results: its checkpoints would outrank the new ones
        (pruning sorts by step), `final/` and the metrics would mix both runs, and `--resume` would continue
        the old one. `overwrite` deletes what a run writes and nothing else."""
        if resume and overwrite:
            raise ValueError("--resume continues the run in OUTPUT and --overwrite discards it: pass one of them")
        if resume:
            return
        found = self._earlier_run_files()
        if not found:
            return
        if not overwrite:
            raise existing_run_error(self.output_dir, found)
        if self.accelerator.is_main_process:
            logger.warning("--overwrite: discarding the earlier run in %s", self.output_dir)
            for path in found:
                if path.name == FINAL_DIR:
                    remove_saved_files(path)
                elif path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            for folder in (self.checkpoints.root, self.output_dir / SAMPLES_DIR):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self.accelerator.wait_for_everyone()

    def _earlier_run_files(self) -> list[Path]:
        """What a run writes in OUTPUT: checkpoints (staging ones too), final/, the metrics and the grids."""
        found = []
        if self.checkpoints.root.is_dir():
            found += sorted(p for p in self.checkpoints.root.iterdir() if p.name.lstrip(".").startswith("step-"))
        logs = self.output_dir / LOGS_DIR
        found += [p for p in (self.output_dir / FINAL_DIR, logs / METRICS_FILE, logs / LOSS_CURVE_FILE) if p.exists()]
        found += sorted((self.output_dir / SAMPLES_DIR).glob("step-*.png"))
        return found

    def _find_checkpoint(self, resume: bool | str | os.PathLike) -> TrainingCheckpoint | None:
        if not resume:
            return None
        if resume is True or str(resume) == "latest":
            # The newest checkpoint that verifies: a damaged one is skipped with a warning naming it.
            checkpoint = self.checkpoints.load_latest()
            if checkpoint is None:
                if self.accelerator.is_main_process:
                    logger.warning("--resume: no checkpoint under %s yet; starting from step 0", self.checkpoints.root)
                return None
        else:
            checkpoint = CheckpointManager.load(resume)
        self.resumed_from = checkpoint.path
        return checkpoint

    def _restore(self, checkpoint: TrainingCheckpoint) -> None:
        state = checkpoint.state
        optimizers = checkpoint.optimizers
        self.gen_optimizer.load_state_dict(optimizers["generator"])
        self.disc_optimizer.load_state_dict(optimizers["discriminator"])
        self.gen_schedule.load_state_dict(optimizers["generator_schedule"])
        self.disc_schedule.load_state_dict(optimizers["discriminator_schedule"])
        scaler = self.accelerator.scaler
        if scaler is not None and optimizers.get("scaler"):
            scaler.load_state_dict(optimizers["scaler"])
        self.objective.length_control.load_state_dict(state["length_control"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = checkpoint.step
        if self.config.vq_warmup_steps and not self.in_vq_warmup:
            self._freeze_vq_parts()
        self.skipped_images = int(state.get("skipped_images", 0))
        self.images_seen = int(state.get("images_seen", 0))
        # Last: everything above may draw random numbers; the run continues from the saved streams.
        rank = self.accelerator.process_index
        checkpoint.rng[rank % len(checkpoint.rng)].restore({"loop": self.rng})
        if self.accelerator.is_main_process:
            logger.info("resumed from %s at step %d", checkpoint.path, self.step)

    def save_checkpoint(self) -> Path | None:
        accelerator = self.accelerator
        rng = RNGState.capture({"loop": self.rng})
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rng_states = gather_object([rng])
        else:
            rng_states = [rng]
        path = None
        if accelerator.is_main_process:
            optimizers = {
                "generator": self.gen_optimizer.state_dict(),
                "discriminator": self.disc_optimizer.state_dict(),
                "generator_schedule": self.gen_schedule.state_dict(),
                "discriminator_schedule": self.disc_schedule.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
            }
            state = {
                "sampler": self.sampler.state_dict(),
                "length_control": self.objective.length_control.state_dict(),
                "skipped_images": self.skipped_images,
                "images_seen": self.images_seen,
                "world_size": accelerator.num_processes,
                "setup": self.setup.to_dict(),
            }
            path = self.checkpoints.save(
                self.step,
                write_model=self.tokenizer.save_pretrained,
                discriminator_state=accelerator.unwrap_model(self.disc_model).state_dict(),
                optimizers=optimizers,
                rng_states=rng_states,
                state=state,
            )
        accelerator.wait_for_everyone()
        return path

    # ------------------------------------------------------------------ one step

    @property
    def in_full_length_phase(self) -> bool:
        start = self.config.vq_warmup_steps
        return start <= self.step < start + self.config.full_length_steps

    def _choose_lengths(self, predicted: torch.Tensor) -> torch.Tensor:
        cfg = self.tokenizer.config
        if self.in_full_length_phase:
            return torch.full_like(predicted.cpu(), cfg.max_tokens)
        return sample_training_lengths(
            predicted.cpu(), cfg.max_tokens, cfg.min_tokens, self.config.uniform_length_fraction, generator=self.rng
        )

    def _vq_warmup_step(self, batch: dict[str, Any], log: bool) -> dict[str, float]:
        """One micro-step of the VQ autoencoder alone. On logging steps the token path's reconstruction loss
        is measured too (no gradient), so `loss/reconstruction` means the same thing throughout a run."""
        accelerator = self.accelerator
        pixels = batch["pixels"].to(accelerator.device)
        with accelerator.accumulate(self.train_model, self.disc_model):
            out = self.train_model(pixels, None, None, self._choose_lengths, vq_only=True)
            loss = self.objective.vq_warmup_loss(out, pixels)
            self._optimizer_step(self.gen_optimizer, self.train_model, loss.total)
        logs = loss.logs
        if log:
            with torch.no_grad():
                model = accelerator.unwrap_model(self.train_model)
                token_path = model(pixels, None, None, self._choose_lengths)
                logs["loss/reconstruction"] = self.objective.rec_loss(token_path["recon"], pixels).total.item()
                logs["length/predicted_mean"] = token_path["predicted_lengths"].float().mean().item()
        return logs

    def _optimizer_step(self, optimizer: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor) -> float | None:
        """Backward, clip on the micro-batch that ends an accumulation, step (accelerate skips the others)."""
        self.accelerator.backward(loss)
        norm = None
        if self.accelerator.sync_gradients and self.config.max_grad_norm > 0:
            norm = float(self.accelerator.clip_grad_norm_(model.parameters(), self.config.max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _micro_step(self, batch: dict[str, Any], log: bool = False) -> dict[str, float]:
        if self.in_vq_warmup:
            return self._vq_warmup_step(batch, log)
        if self.config.vq_warmup_steps and self.step == self.config.vq_warmup_steps:
            self._freeze_vq_parts()  # idempotent; the first step after the warm-up
        accelerator, config, objective = self.accelerator, self.config, self.objective
        pixels = batch["pixels"].to(accelerator.device)
        relevance = batch["relevance"].to(accelerator.device)
        queries = list(batch["queries"])
        asked = relevance  # each question's own boxes, also where the question is dropped below
        dropped = [False] * len(queries)
        if self.with_queries:
            asked_queries = queries
            queries, relevance = drop_queries(queries, relevance, config.query_drop_prob, generator=self.rng)
            dropped = objective.dropped_questions(asked_queries, queries)
        query = self.tokenizer.tokenize_queries(queries, pixels.shape[0])
        query_ids, query_mask = query if query is not None else (None, None)
        adversarial = objective.adversarial_factor(self.step) > 0

        with accelerator.accumulate(self.train_model, self.disc_model):
            out = self.train_model(pixels, query_ids, query_mask, self._choose_lengths)
            loss = objective.generator_loss(
                out, pixels, relevance, queries, asked, dropped, self.step,
                discriminator=accelerator.unwrap_model(self.disc_model) if adversarial else None,
                last_layer=self.last_layer, autocast=accelerator.autocast, full_length=self.in_full_length_phase,
            )  # fmt: skip
            logs = loss.logs
            norm = self._optimizer_step(self.gen_optimizer, self.train_model, loss.total)
            if norm is not None:
                logs["grad_norm/generator"] = norm
            if adversarial:
                d_loss = objective.discriminator_loss(self.disc_model, pixels, out["recon"], accelerator.autocast)
                self._optimizer_step(self.disc_optimizer, self.disc_model, d_loss)
                logs["loss/discriminator"] = d_loss.item()

        objective.add_judgements(loss)
        if objective.length_control.threshold is not None:
            logs["length/threshold"] = float(objective.length_control.threshold)
        question_tau = objective.length_control.threshold_of(LengthControl.QUESTION)
        if question_tau is not None:
            logs["length/threshold_question"] = float(question_tau)
        logs["length/predicted_mean"] = out["predicted_lengths"].float().mean().item()
        logs["length/trained_mean"] = out["lengths"].float().mean().item()
        return logs

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainingSummary:
        accelerator, config = self.accelerator, self.config
        if config.tracker != "none":
            accelerator.init_trackers(config.tracker_project, config=_scalar_config(self.setup))
        metrics_path = self.output_dir / LOGS_DIR / METRICS_FILE
        if accelerator.is_main_process:
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
        history: list[dict[str, float]] = []
        bar = tqdm(total=config.max_steps, initial=self.step, desc="train-tokenizer", disable=not self.progress)
        self.train_model.train()
        self.disc_model.train()
        micro = 0
        started = time.perf_counter()
        images_at_start = self.images_seen
        epoch = self.sampler.epoch
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step\\(\\).*optimizer.step\\(\\).*")
            warned = False
            while self.step < config.max_steps:
                self.sampler.set_epoch(epoch)
                full_epoch = self.sampler.offset == 0  # a resumed run's first pass covers only the rest
                usable, counts = 0, torch.zeros(2)  # (skipped, consumed) in this pass, this process
                for batch in self.loader:
                    self.sampler.advance(batch["consumed"])
                    self.skipped_images += batch["skipped"]
                    counts += torch.tensor([batch["skipped"], batch["consumed"]], dtype=torch.float32)
                    if not self._all_processes_have_images(batch):
                        continue
                    usable += 1
                    will_log = (self.step + 1) % config.log_every == 0 or self.step + 1 == config.max_steps
                    logs = self._micro_step(batch, log=will_log)
                    self.images_seen += batch["pixels"].shape[0] * accelerator.num_processes
                    micro += 1
                    if micro % config.gradient_accumulation_steps:
                        continue
                    self.objective.record_judgements(self._summed)
                    self.gen_schedule.step()
                    self.disc_schedule.step()
                    self.step += 1
                    bar.update(1)
                    if self.step % config.log_every == 0 or self.step == config.max_steps:
                        elapsed = max(time.perf_counter() - started, 1e-9)
                        logs["lr/generator"] = self.gen_schedule.get_last_lr()[0]
                        logs["data/skipped_images"] = float(self._total_skipped())
                        warned = self._warn_if_mostly_skipped(counts, warned)
                        logs["throughput/images_per_s"] = (self.images_seen - images_at_start) / elapsed
                        self._log(logs, metrics_path, history)
                        bar.set_postfix(
                            rec=f"{logs.get('loss/reconstruction', float('nan')):.4f}",
                            len=f"{logs['length/predicted_mean']:.1f}",
                        )
                    if config.grid_every and self.step % config.grid_every == 0:
                        self.save_grid()
                    if config.checkpoint_every and self.step % config.checkpoint_every == 0:
                        self.save_checkpoint()
                    if self.step >= config.max_steps:
                        break
                else:
                    warned = self._warn_if_mostly_skipped(counts, warned)
                    if full_epoch and usable == 0:
                        skipped, consumed = (int(v) for v in self._summed(counts).tolist())
                        raise ValueError(
                            f"a whole epoch over {self.data} gave no batch to train on: {skipped} of {consumed} "
                            f"images were unreadable and skipped (each is named in a warning above); "
                            f"training would never advance"
                        )
                    epoch += 1
        bar.close()
        if not config.checkpoint_every or self.step % config.checkpoint_every:
            self.save_checkpoint()
        final = self.output_dir / FINAL_DIR
        if accelerator.is_main_process:
            self.tokenizer.save_pretrained(final)
            write_loss_curve(metrics_path)
        skipped = self._total_skipped()
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return TrainingSummary(
            output_dir=self.output_dir,
            final_dir=final,
            steps=self.step,
            resumed_from=self.resumed_from,
            history=history,
            skipped_images=skipped,
        )

    def _all_processes_have_images(self, batch: dict[str, Any]) -> bool:
        """A batch whose every image was corrupt is skipped, by all processes together (one alone would hang DDP)."""
        has = self._summed(torch.tensor([1.0 if batch["pixels"].shape[0] > 0 else 0.0]))
        return bool(has.item() == self.accelerator.num_processes)

    def _summed(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over processes (every process must call this at the same point)."""
        values = values.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        return values.cpu()

    def _warn_if_mostly_skipped(self, counts: torch.Tensor, warned: bool) -> bool:
        """Warn once per run when more than SKIPPED_WARN_SHARE of this pass's images were unreadable."""
        if warned:  # the same on every process: it was decided on summed counts
            return True
        skipped, consumed = (int(v) for v in self._summed(counts).tolist())
        if consumed and skipped / consumed > SKIPPED_WARN_SHARE:
            if self.accelerator.is_main_process:
                logger.warning(
                    "%d of %d images read so far from %s were unreadable and skipped (%.0f%%, more than %.0f%%): "
                    "check the data",
                    skipped, consumed, self.data, 100 * skipped / consumed, 100 * SKIPPED_WARN_SHARE,
                )  # fmt: skip
            return True
        return warned

    def _total_skipped(self) -> int:
        return int(self._summed(torch.tensor([float(self.skipped_images)])).item())

    def _log(self, logs: dict[str, float], metrics_path: Path, history: list[dict[str, float]]) -> None:
        record = {"step": self.step, **logs}
        history.append(record)
        if self.config.tracker != "none":
            self.accelerator.log(logs, step=self.step)
        if self.accelerator.is_main_process:
            with open(metrics_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ pictures

    def _first_images(self, count: int) -> torch.Tensor | None:
        """The first `count` readable images in dataset order (distinct sources): fixed, and no RNG drawn."""
        images, seen = [], set()
        for index in range(len(self.dataset)):
            item = self.dataset[index]
            if isinstance(item, dict) and item["source"] not in seen:
                seen.add(item["source"])
                images.append(item["pixels"])
            if len(images) == count:
                break
        return torch.stack(images) if images else None

    def _grid_examples(self) -> torch.Tensor | None:
        if not self.config.grid_every or not self.config.grid_images:
            return None
        return self._first_images(self.config.grid_images)

    def save_grid(self) -> Path | None:
        """Inputs and reconstructions of fixed examples at `grid_budgets` and the automatic length. Draws no
        random numbers, so writing grids never changes the run."""
        if self.grid_pixels is None or not self.accelerator.is_main_process:
            return None
        from ..evaluation.visualize import save_reconstruction_grid

        budgets = sorted({b for b in self.config.grid_budgets if b <= self.tokenizer.max_tokens})
        was_training = self.tokenizer.training
        self.tokenizer.eval()
        with torch.no_grad():
            result = self.tokenizer.reconstruct(self.grid_pixels.to(self.accelerator.device), budgets=budgets)
        self.tokenizer.train(was_training)
        return save_reconstruction_grid(result, self.output_dir / SAMPLES_DIR / f"step-{self.step:08d}.png")


def _has_accelerator_device() -> bool:
    probe = getattr(torch, "accelerator", None)
    if probe is not None and hasattr(probe, "is_available"):
        return bool(probe.is_available())
    return torch.cuda.is_available()


def _scalar_config(setup: TrainingSetup) -> dict[str, Any]:
    """TensorBoard's hparams take scalars only: flatten and stringify the rest."""
    flat: dict[str, Any] = {}
    for section, values in setup.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def write_loss_curve(metrics_path: Path) -> Path | None:
    """Draw `LOSS_CURVE_FILE` in LOGS_DIR, beside the metrics log, from every step it holds; returns its path, or None when the
    log has no loss to draw. A resumed run re-logs the steps after its checkpoint, so the last record of each
    step is the one drawn (the run that produced the weights)."""
    if not metrics_path.is_file():
        return None
    by_step: dict[int, dict[str, Any]] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    history = [by_step[step] for step in sorted(by_step)]
    keys = [key for key in CURVE_KEYS if any(key in record for record in history)]
    return plot_loss_curve(history, metrics_path.with_name(LOSS_CURVE_FILE), keys=keys, title="train-tokenizer")


def train_tokenizer(
    setup: TrainingSetup,
    data: str | os.PathLike,
    output_dir: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    strict: bool = False,
    resume: bool | str | os.PathLike = False,
    dataset_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> TrainingSummary:
    """Train (or resume) a tokenizer; the result is exported to `output_dir/final` with `save_pretrained`.

    A fresh run refuses an `output_dir` holding an earlier run unless `overwrite` (which discards it)."""
    trainer = TokenizerTrainer(
        setup, data, output_dir, annotations=annotations, strict=strict, resume=resume,
        dataset_kwargs=dataset_kwargs, progress=progress, overwrite=overwrite,
    )  # fmt: skip
    return trainer.train()
