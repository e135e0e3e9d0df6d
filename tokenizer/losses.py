"""Reconstruction losses for DOVE / Q-DOVE training, and the query dropping Q-DOVE trains with.

Q-DOVE asks the tokenizer to spend its tokens on what a question is about. The loss therefore weighs
each pixel by its relevance: 1 inside the union of the question's boxes, a small lambda elsewhere.
Normalising by the sum of the weights keeps the value on the scale of the plain loss, so the length
control's running threshold means the same thing with and without queries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .perceptual import PERCEPTUAL_WEIGHTS_HINT, PerceptualLoss

__all__ = [
    "PerceptualLoss",
    "ReconstructionLoss",
    "ReconstructionTerms",
    "drop_queries",
    "region_weighted_mean",
]


@dataclass
class ReconstructionTerms:
    """One batch's reconstruction loss, split for logging.

    `per_sample` [B] is the weighted total per image (what length control compares with its threshold);
    `total` is its mean, the term to optimise. `mse` and `perceptual` are batch means of the region-weighted
    terms before their weights are applied; `*_per_sample` keep them per image.
    """

    per_sample: torch.Tensor
    mse: torch.Tensor
    perceptual: torch.Tensor
    total: torch.Tensor
    mse_per_sample: torch.Tensor
    perceptual_per_sample: torch.Tensor


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


def relevance_weights(relevance: torch.Tensor, shape: torch.Size, region_lambda: float) -> torch.Tensor:
    """Relevance [B,1,h,w] or [B,h,w] in [0,1] -> per-pixel weights [B,1,H,W] matching `shape`."""
    if relevance.ndim == 3:
        relevance = relevance.unsqueeze(1)
    batch, _, height, width = shape
    if relevance.ndim != 4 or relevance.shape[0] != batch or relevance.shape[1] != 1:
        raise ValueError(f"relevance must be [B,1,H,W] with B={batch}, got {tuple(relevance.shape)}")
    relevance = relevance.float()
    if relevance.shape[-2:] != (height, width):
        relevance = F.interpolate(relevance, size=(height, width), mode="nearest")
    return relevance + region_lambda * (1.0 - relevance)


class ReconstructionLoss(nn.Module):
    """mse_weight * MSE + perceptual_weight * LPIPS, each region-weighted per image, in fp32.

    With `perceptual_weight` 0 no perceptual network is needed or built. A positive weight needs a
    `PerceptualLoss` (or the path / hub id of its VGG16 weights); without one this refuses to start rather
    than train on a different objective than the one asked for.
    """

    def __init__(
        self,
        mse_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual: PerceptualLoss | str | os.PathLike | None = None,
        region_lambda: float = 0.1,
    ) -> None:
        super().__init__()
        if mse_weight < 0 or perceptual_weight < 0:
            raise ValueError(
                f"loss weights must be >= 0, got mse_weight={mse_weight}, perceptual_weight={perceptual_weight}"
            )
        if not 0.0 <= region_lambda <= 1.0:
            raise ValueError(f"region_lambda must lie in [0, 1], got {region_lambda}")
        self.mse_weight = float(mse_weight)
        self.perceptual_weight = float(perceptual_weight)
        self.region_lambda = float(region_lambda)
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

    def forward(
        self, recon: torch.Tensor, target: torch.Tensor, relevance: torch.Tensor | None = None
    ) -> ReconstructionTerms:
        """Images [B,3,H,W] in [0,1]; relevance [B,1,H,W] (1 = relevant) or None for the whole image."""
        if recon.shape != target.shape or recon.ndim != 4:
            raise ValueError(
                f"recon and target must be [B,C,H,W] of one shape, got {tuple(recon.shape)} and {tuple(target.shape)}"
            )
        with torch.autocast(device_type=recon.device.type, enabled=False):
            recon32, target32 = recon.float(), target.float()
            squared = (recon32 - target32).pow(2).mean(dim=1, keepdim=True)
            mse = region_weighted_mean(squared, relevance, self.region_lambda)
            per_sample = self.mse_weight * mse
            if self.perceptual is not None:
                perceptual = region_weighted_mean(self.perceptual(recon32, target32), relevance, self.region_lambda)
                per_sample = per_sample + self.perceptual_weight * perceptual
            else:
                perceptual = torch.zeros_like(mse)
        return ReconstructionTerms(
            per_sample=per_sample,
            mse=mse.mean(),
            perceptual=perceptual.mean(),
            total=per_sample.mean(),
            mse_per_sample=mse,
            perceptual_per_sample=perceptual,
        )


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
