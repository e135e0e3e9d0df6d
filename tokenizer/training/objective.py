"""The whole DOVE / Q-DOVE training objective in one place.

    generator loss = reconstruction (region-aware MSE + LPIPS)                       `ReconstructionLoss`
                   + latent_weight * MSE(decoded latents, input latents) / Var(input latents)   optional
                   + codebook_weight * the VQ's codebook/commitment loss        only while the VQ trains
                   + adversarial_weight * adaptive * hinge_g(D(reconstruction))   from `adversarial_start_step`
                   + length control (EOS earlier where a sample beat its running threshold)   `LengthControl`
    discriminator loss = hinge_d(D(input), D(reconstruction))

During the VQ warm-up only MSE(VQ(pixels), pixels) + codebook trains. `TokenizerObjective` computes these
terms from one forward's outputs and keeps the state they need across steps (the length thresholds'
history); the loop (`loop.py`) only runs the model, accumulates, clips and steps the optimisers.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .discriminator import adaptive_adversarial_weight, adversarial_weight_at, hinge_d_loss, hinge_g_loss
from .length_control import LengthControl
from .losses import ReconstructionLoss


@dataclass
class GeneratorLoss:
    """The generator's loss for one micro-batch, its logged terms, and what length control judged."""

    total: torch.Tensor
    logs: dict[str, float]
    judged: torch.Tensor | None = None
    kinds: torch.Tensor | None = None
    asked: torch.Tensor | None = None
    dropped: list[bool] = field(default_factory=list)


class TokenizerObjective(nn.Module):
    """Every loss term of tokenizer training, from `TrainConfig`'s weights, and the length-control state."""

    def __init__(self, config: TrainConfig, vq_warmup_steps: int, full_length_steps: int) -> None:
        super().__init__()
        self.config = config
        self.rec_loss = ReconstructionLoss(
            mse_weight=config.mse_weight,
            perceptual_weight=config.perceptual_weight,
            perceptual=config.perceptual_weights,
            region_lambda=config.region_lambda,
            region_loss=config.region_loss,
        )
        self.length_control = LengthControl(
            history=config.length_history,
            weight_start=config.length_weight_start,
            weight_max=config.length_weight_max,
            ramp_steps=config.length_ramp_steps,
            start_step=vq_warmup_steps + full_length_steps,  # the first step with length control
        )
        self._judged_totals: torch.Tensor | None = None  # this optimizer step's judged losses (`add_judgements`)

    # ------------------------------------------------------------------ the generator

    def vq_warmup_loss(self, out: dict[str, torch.Tensor], pixels: torch.Tensor) -> GeneratorLoss:
        """The VQ autoencoder alone: pixel MSE plus its codebook loss (while the codebook trains)."""
        vq_rec = F.mse_loss(out["vq_recon"].float(), pixels.float())
        total = vq_rec
        if self.config.codebook_weight > 0 and out["codebook_loss"].requires_grad:
            total = total + self.config.codebook_weight * out["codebook_loss"]
        logs = {"loss/vq_reconstruction": vq_rec.item(), "loss/total": total.item(), "length/predicted_mean": 0.0}
        return GeneratorLoss(total=total, logs=logs)

    def adversarial_factor(self, step: int) -> float:
        return adversarial_weight_at(step, self.config.adversarial_start_step, self.config.adversarial_weight)

    def generator_loss(
        self,
        out: dict[str, torch.Tensor],
        pixels: torch.Tensor,
        relevance: torch.Tensor,
        queries: list[str],
        asked: torch.Tensor,
        dropped: list[bool],
        step: int,
        discriminator: nn.Module | None,
        last_layer: torch.Tensor | None,
        autocast: Callable[[], AbstractContextManager[Any]],
        full_length: bool,
    ) -> GeneratorLoss:
        """The token path's loss. `queries` are the ones the model saw (some dropped), `asked` each sample's
        own boxes whether its question was dropped or not, `dropped` which ones were. `discriminator` is read
        with its parameters detached: the generator's step must not move it."""
        config = self.config
        recon = out["recon"]
        rec = self.rec_loss(recon, pixels, relevance, asked=asked if any(dropped) else None)
        total = rec.total
        logs = {"loss/reconstruction": rec.total.item(), "loss/mse": rec.mse.item()}
        if self.rec_loss.perceptual is not None:
            logs["loss/perceptual"] = rec.perceptual.item()
        if config.latent_weight > 0:
            latent = self._latent_loss(out, relevance)
            total = total + config.latent_weight * latent
            logs["loss/latent"] = latent.item()
        if config.codebook_weight > 0 and out["codebook_loss"].requires_grad:
            total = total + config.codebook_weight * out["codebook_loss"]
            logs["loss/codebook"] = float(out["codebook_loss"].item())
        factor = self.adversarial_factor(step)
        if factor > 0 and discriminator is not None:
            frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
            with autocast():
                fake_logits = torch.func.functional_call(discriminator, frozen, (recon,))
            g_loss = hinge_g_loss(fake_logits)
            weight = torch.tensor(1.0, device=pixels.device)
            if config.adaptive_adversarial_weight:
                weight = adaptive_adversarial_weight(rec.total, g_loss, last_layer)
            total = total + factor * weight * g_loss
            logs["loss/generator_adversarial"] = g_loss.item()
            logs["adversarial/adaptive_weight"] = weight.item()
        result = GeneratorLoss(total=total, logs=logs, asked=rec.asked_per_sample, dropped=dropped)
        if not full_length:  # at full length every sample is judged at N tokens: nothing to learn or track
            result.judged = self.rec_loss.length_judgement(rec, relevance)
            result.kinds = self.judgement_kinds(queries, pixels.device)
            length_loss = self.length_control.loss(
                out["eos_logits"], out["lengths"], result.judged, step, kinds=result.kinds
            )
            total = total + length_loss
            logs["loss/length"] = length_loss.item()
            logs["length/weight"] = self.length_control.weight_at(step)
        result.total = total
        logs["loss/total"] = total.item()
        return result

    def _latent_loss(self, out: dict[str, torch.Tensor], relevance: torch.Tensor) -> torch.Tensor:
        """MSE of the decoded latent grid against the VQ's, relative to the latents' own variance: scale-free,
        so one weight suits aMUSEd's latents and a from-scratch encoder's unbounded continuous ones (raw MSE
        reached 30 there and drowned the rest). With the paper's loss it splits by region like the pixel
        loss, a cell being relevant if any of its pixels is: over the whole grid it would keep asking a
        question's tokens for everything."""
        target = out["target_latents"].detach().float()
        squared = (out["latents"].float() - target).pow(2).mean(dim=1, keepdim=True)
        squared = squared / target.var().clamp(min=1e-6)
        if self.config.region_loss == "paper":
            cells = F.adaptive_max_pool2d(relevance.float(), squared.shape[-2:])
            return self.rec_loss.combine_regions(squared, cells)[0].mean()
        return squared.mean()

    # ------------------------------------------------------------------ the discriminator

    def discriminator_loss(
        self,
        discriminator: nn.Module,
        pixels: torch.Tensor,
        recon: torch.Tensor,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> torch.Tensor:
        """Hinge loss on real inputs against the (detached) reconstructions, in one discriminator call."""
        with autocast():
            logits = discriminator(torch.cat([pixels, recon.detach().clamp(0, 1)]))
        real_logits, fake_logits = logits.chunk(2)
        return hinge_d_loss(real_logits, fake_logits)

    # ------------------------------------------------------------------ length control's running thresholds

    def dropped_questions(self, asked_queries: list[str], queries: list[str]) -> list[bool]:
        """Which samples had a question the loop dropped: with the paper's loss their whole-image
        reconstructions measure what a question's boxes cost (see `add_judgements`)."""
        return [bool(a) and not q and self.config.region_loss == "paper" for a, q in zip(asked_queries, queries)]

    def judgement_kinds(self, queries: list[str], device: torch.device) -> torch.Tensor:
        """Which running threshold judges each sample: with the paper's loss a sample with a question is judged
        by its boxes' mean and gets the question threshold; all others the whole-image one."""
        with_question = [bool(q) and self.config.region_loss == "paper" for q in queries]
        return torch.tensor(
            [LengthControl.QUESTION if q else LengthControl.WHOLE_IMAGE for q in with_question], device=device
        )

    def add_judgements(self, loss: GeneratorLoss) -> None:
        """Add one micro-batch's contributions to each threshold's history to the optimizer step's totals.

        Whole images: their judged loss, the whole image's mean. Questions: NOT the judged loss of samples with
        a question, but the error that whole-image reconstructions leave in a question's boxes, read off the
        samples whose question was dropped (`asked`). A box mean and a whole-image mean are not on one scale
        (a box sits on an object, a whole image is mostly background that any token reconstructs), and a
        threshold made of questions' own losses would only rank questions against each other. This one asks
        of each question what Q-DOVE promises: its tokens must reconstruct its boxes at least as well as a
        reconstruction of the whole image does, and they may stop as soon as they do. Without dropped
        questions in the history yet, questions are judged against their own batch mean.
        """
        if loss.judged is None:
            return
        judged = loss.judged.detach().float()
        whole = loss.kinds == LengthControl.WHOLE_IMAGE
        sums = [judged[whole].sum()]
        counts = [whole.sum().float()]
        mask = torch.tensor(loss.dropped, device=judged.device, dtype=torch.bool)
        if loss.asked is not None and bool(mask.any()):
            sums.append(loss.asked.detach().float()[mask].sum())
            counts.append(mask.sum().float())
        else:
            sums.append(judged.new_zeros(()))
            counts.append(judged.new_zeros(()))
        totals = torch.cat([torch.stack(sums), torch.stack(counts)])
        self._judged_totals = totals if self._judged_totals is None else self._judged_totals + totals

    def record_judgements(self, summed: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """At the end of an optimizer step: record each kind's mean judged loss over the step's micro-batches,
        summed over processes by `summed`, so the history's `length_history` entries are optimizer steps
        whatever the gradient accumulation, and tau is the same on all processes."""
        totals, self._judged_totals = self._judged_totals, None
        if totals is None:
            return
        totals = summed(totals)
        for kind in range(LengthControl.KINDS):
            count = float(totals[LengthControl.KINDS + kind])
            if count > 0:
                self.length_control.update(totals[kind] / count, kind=kind)
