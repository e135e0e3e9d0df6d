"""Reconstruction losses for DOVE / Q-DOVE training, and the query dropping Q-DOVE trains with.

Q-DOVE asks the tokenizer to spend its tokens on what a question is about. The paper's loss splits each
image into the query-relevant region (the union of the question's boxes) and the rest, and takes each
region's own per-pixel mean:

    L = L_rel + lambda * L_irr            (lambda = 1e-10 in the paper)

so a small box counts as much as a large one, and the rest of the image is all but ignored. An image
without a question is wholly relevant: L is then the plain mean. `region_loss="weighted_mean"` keeps the
alternative of one mean under per-pixel weights (1 inside the boxes, lambda outside), normalised by the
weights' sum.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import PERCEPTUAL_WEIGHTS_HINT, PerceptualLoss

__all__ = [
    "REGION_LOSSES",
    "PerceptualLoss",
    "ReconstructionLoss",
    "ReconstructionTerms",
    "drop_queries",
    "region_means",
    "region_weighted_mean",
]

REGION_LOSSES = ("paper", "weighted_mean")


@dataclass
class ReconstructionTerms:
    """One batch's reconstruction loss, split for logging.

    `per_sample` [B] is the weighted total per image and `total` its mean, the term to optimise.
    `relevant_per_sample` [B] is the same weighted sum of MSE and LPIPS over the relevant region alone (the
    whole image without a question): what length control judges. `asked_per_sample` is the same over the
    boxes of `asked` (a question's boxes even where it was dropped), when given. `mse` and `perceptual` are
    batch means of the region-combined terms before their weights are applied; `*_per_sample` keep them
    per image.
    """

    per_sample: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor
    total: torch.Tensor
    mse_per_sample: torch.Tensor
    perceptual_per_sample: torch.Tensor
    relevant_per_sample: torch.Tensor
    asked_per_sample: torch.Tensor | None = None


def region_means(per_pixel: torch.Tensor, relevance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,1,H,W] map -> ([B] mean over the relevant pixels, [B] mean over the others).

    Each region's mean is over its own pixels, so the relevant term does not shrink with the box. An image
    whose mask has no relevant pixel (every box cropped away) is treated as wholly relevant, like an image
    without a question, rather than dividing by zero; an image with no irrelevant pixel has 0 there.
    """
    if relevance is None:
        return per_pixel.mean(dim=(1, 2, 3)), per_pixel.new_zeros(per_pixel.shape[0])
    relevant = _resized_relevance(relevance, per_pixel.shape).to(per_pixel.dtype)
    inside = relevant.sum(dim=(1, 2, 3), keepdim=True)
    relevant = torch.where(inside > 0, relevant, torch.ones_like(relevant))
    irrelevant = 1.0 - relevant
    rel = (per_pixel * relevant).sum(dim=(1, 2, 3)) / relevant.sum(dim=(1, 2, 3))
    outside = irrelevant.sum(dim=(1, 2, 3))
    irr = (per_pixel * irrelevant).sum(dim=(1, 2, 3)) / outside.clamp(min=1e-12)
    return rel, torch.where(outside > 0, irr, torch.zeros_like(irr))


def region_weighted_mean(per_pixel: torch.Tensor, relevance: torch.Tensor | None, region_lambda: float) -> torch.Tensor:
    """[B,1,H,W] map -> [B]: the mean under weights relevance + lambda * (1 - relevance).

    A mask resolution other than the map's is resized (nearest). An image whose weights sum to zero
    (lambda 0 and no relevant pixel, e.g. every box cropped away) falls back to the plain mean rather
    than dividing by zero or silently contributing nothing.
    """
    if relevance is None:
        return per_pixel.mean(dim=(1, 2, 3))
    weights = relevance_weights(relevance, per_pixel.shape, region_lambda).to(per_pixel.dtype)
    totals = weights.sum(dim=(1, 2, 3), keepdim=True)
    weights = torch.where(totals > 0, weights, torch.ones_like(weights))
    return (per_pixel * weights).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))


def _resized_relevance(relevance: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Relevance [B,1,h,w] or [B,h,w] in [0,1] -> [B,1,H,W] fp32 matching `shape` (nearest resize)."""
    if relevance.ndim == 3:
        relevance = relevance.unsqueeze(1)
    batch, _, height, width = shape
    if relevance.ndim != 4 or relevance.shape[0] != batch or relevance.shape[1] != 1:
        raise ValueError(f"relevance must be [B,1,H,W] with B={batch}, got {tuple(relevance.shape)}")
    relevance = relevance.float()
    if relevance.shape[-2:] != (height, width):
        relevance = F.interpolate(relevance, size=(height, width), mode="nearest")
    return relevance


def relevance_weights(relevance: torch.Tensor, shape: torch.Size, region_lambda: float) -> torch.Tensor:
    """Relevance [B,1,h,w] or [B,h,w] in [0,1] -> per-pixel weights [B,1,H,W] matching `shape`."""
    relevance = _resized_relevance(relevance, shape)
    return relevance + region_lambda * (1.0 - relevance)


class ReconstructionLoss(nn.Module):
    """mse_weight * MSE + perceptual_weight * LPIPS, each combined over the Q-DOVE regions per image, in fp32.

    `region_loss="paper"`: L_rel + region_lambda * L_irr, each a mean over its own pixels.
    `region_loss="weighted_mean"`: one mean under weights 1 (relevant) and region_lambda (the rest).
    With `perceptual_weight` 0 no perceptual network is needed or built. A positive weight needs a
    `PerceptualLoss` (or the path / hub id of its VGG16 weights); without one this refuses to start rather
    than train on a different objective than the one asked for.
    """

    def __init__(
        self,
        mse_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual: PerceptualLoss | str | os.PathLike | None = None,
        region_lambda: float = 1e-10,
        region_loss: str = "paper",
    ) -> None:
        super().__init__()
        if mse_weight < 0 or perceptual_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got mse_weight={mse_weight}, perceptual_weight={perceptual_weight}"
            )
        if not 0.0 <= region_lambda <= 1.0:
            raise ValueError(f"region_lambda must lie in [0, 1], got {region_lambda}")
        if region_loss not in REGION_LOSSES:
            raise ValueError(f"region_loss must be one of {REGION_LOSSES}, got {region_loss!r}")
        self.mse_weight = float(mse_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.region_lambda = float(region_lambda)
        self.region_loss = region_loss
        if self.perceptual_weight > 0:
            if perceptual is None:
                raise ValueError(
                    f"perceptual_weight={perceptual_weight} but no perceptual network: {PERCEPTUAL_WEIGHTS_HINT}"
                )
            if not isinstance(perceptual, PerceptualLoss):
                perceptual = PerceptualLoss(perceptual)
            self.perceptual = perceptual
        else:
            self.perceptual = None

    def combine_regions(
        self, per_pixel: torch.Tensor, relevance: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,1,H,W] -> (the region-combined loss [B], the relevant region's mean [B])."""
        relevant, irrelevant = region_means(per_pixel, relevance)
        if self.region_loss == "weighted_mean":
            return region_weighted_mean(per_pixel, relevance, self.region_lambda), relevant
        return relevant + self.region_lambda * irrelevant, relevant

    def forward(
        self,
        recon: torch.Tensor,
        target: torch.Tensor,
        relevance: torch.Tensor | None = None,
        asked: torch.Tensor | None = None,
    ) -> ReconstructionTerms:
        """Images [B,3,H,W] in [0,1]; relevance [B,1,H,W] (1 = relevant) or None for the whole image; `asked`
        [B,1,H,W], optional: other boxes to measure the relevant mean over as well (no effect on the loss)."""
        if recon.shape != target.shape or recon.ndim != 4:
            raise ValueError(
                f"recon and target must be [B,C,H,W] of one shape, got {tuple(recon.shape)} and {tuple(target.shape)}"
            )
        with torch.autocast(device_type=recon.device.type, enabled=False):
            recon32, target32 = recon.float(), target.float()
            squared = (recon32 - target32).pow(2).mean(dim=1, keepdim=True)
            mse, mse_relevant = self.combine_regions(squared, relevance)
            per_sample = self.mse_weight * mse
            relevant = self.mse_weight * mse_relevant
            asked_mean = None if asked is None else self.mse_weight * region_means(squared.detach(), asked)[0]
            if self.perceptual is not None:
                distance = self.perceptual(recon32, target32)
                perceptual, perceptual_relevant = self.combine_regions(distance, relevance)
                per_sample = per_sample + self.perceptual_weight * perceptual
                relevant = relevant + self.perceptual_weight * perceptual_relevant
                if asked is not None:
                    asked_mean = asked_mean + self.perceptual_weight * region_means(distance.detach(), asked)[0]
            else:
                perceptual = torch.zeros_like(mse)
        return ReconstructionTerms(
            per_sample=per_sample,
            mse=mse.mean(),
            perceptual=perceptual.mean(),
            total=per_sample.mean(),
            mse_per_sample=mse,
            perceptual_per_sample=perceptual,
            relevant_per_sample=relevant,
            asked_per_sample=asked_mean,
        )

    def length_judgement(self, terms: ReconstructionTerms, relevance: torch.Tensor | None) -> torch.Tensor:
        """What length control compares with its running threshold, per sample [B].

        With the paper's loss: the relevant region's own per-pixel mean (MSE, plus LPIPS when weighted in),
        i.e. the boxes' mean for a question and the whole image's mean without one. Neither is scaled by
        the region's area: a value that shrank with the box would make every small-box sample count as good
        and every whole image as bad, whatever either holds. The irrelevant region takes no part: the
        question is whether the tokens were enough for what was asked. (The training loop compares samples
        with and without a question against separate running thresholds; see `LengthControl`.)

        With `region_loss="weighted_mean"`: the weighted mean times the weighted area fraction (1 without
        a question), all samples against one threshold.
        """
        if self.region_loss == "paper" or relevance is None:
            return terms.relevant_per_sample
        shape = torch.Size((terms.per_sample.shape[0], 1, *relevance.shape[-2:]))
        area = relevance_weights(relevance, shape, self.region_lambda).mean(dim=(1, 2, 3))
        return terms.per_sample * area.to(terms.per_sample.dtype)


def drop_queries(
    queries: list[str],
    relevance: torch.Tensor | None,
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[list[str], torch.Tensor | None]:
    """Replace each query by "" with probability p, making its whole image relevant.

    Q-DOVE trains half its steps without queries so that one model serves both uses. Any empty query
    (dropped here or empty to begin with) gets an all-ones mask: no question means every pixel matters.
    One random number is drawn per query whatever p is, so the stream of a seeded generator does not
    depend on the setting.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"query drop probability must lie in [0, 1], got {p}")
    queries = list(queries)
    if relevance is not None and relevance.shape[0] != len(queries):
        raise ValueError(f"{len(queries)} queries but relevance masks for {relevance.shape[0]} images")
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(len(queries), generator=generator, device=device).tolist()
    kept = [query if query and draw >= p else "" for query, draw in zip(queries, draws)]
    if relevance is None:
        return kept, None
    empty = torch.tensor([not query for query in kept], device=relevance.device)
    if not bool(empty.any()):
        return kept, relevance
    shape = (-1,) + (1,) * (relevance.ndim - 1)
    relevance = torch.where(empty.view(shape), torch.ones_like(relevance), relevance)
    return kept, relevance
