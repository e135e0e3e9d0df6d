"""How many tokens an image gets: the first confident EOS, clamped, or a budget the caller forces."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def lengths_from_eos(eos_probs: torch.Tensor, threshold: float, min_tokens: int) -> torch.Tensor:
    """Length = the 1-based index of the first position whose EOS probability exceeds `threshold`.

    Positions before `min_tokens` cannot end the sequence; with no such position the length is N.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    batch, max_tokens = eos_probs.shape
    positions = torch.arange(max_tokens, device=eos_probs.device)
    stops = (eos_probs > threshold) & (positions >= min_tokens - 1)
    first = stops.int().argmax(dim=1) + 1
    return torch.where(stops.any(dim=1), first, torch.full_like(first, max_tokens)).long()


def resolve_budget(
    budget: int | Sequence[int] | torch.Tensor | None, batch_size: int, max_tokens: int, name: str = "budget"
) -> torch.Tensor | None:
    """A forced length per image ([B] long tensor), or None for automatic lengths.

    Python and numpy integers (and integral floats) are accepted, alone or one per image, in a list, a
    numpy array or a tensor; anything else is refused with a message naming `name` (the caller's
    argument) and the offending entry.
    """
    if budget is None:
        return None
    scalar = False
    if isinstance(budget, (torch.Tensor, np.ndarray)) and budget.ndim == 0:
        budget, scalar = budget.item(), True
    if isinstance(budget, (torch.Tensor, np.ndarray)):
        values = budget.reshape(-1).tolist()
    elif isinstance(budget, (int, float, np.integer, np.floating)) and not isinstance(budget, (bool, np.bool_)):
        values, scalar = [budget] * batch_size, True
    elif isinstance(budget, Sequence) and not isinstance(budget, (str, bytes)):
        values = list(budget)
    else:
        raise TypeError(f"{name} must be an int, a list of ints or None; got {type(budget).__name__} {budget!r}")
    if len(values) != batch_size:
        raise ValueError(f"{name} has {len(values)} entries but the batch has {batch_size} images")
    for index, value in enumerate(values):
        where = name if scalar else f"{name}[{index}]"
        integral = isinstance(value, (int, np.integer)) or (
            isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer()
        )
        if isinstance(value, (bool, np.bool_)) or not integral:
            raise TypeError(f"{where} must be an integer number of tokens, got {value!r}")
        if not 1 <= value <= max_tokens:
            raise ValueError(f"{where}={value} is outside [1, max_tokens={max_tokens}]")
    return torch.tensor([int(v) for v in values], dtype=torch.long)


def mask_from_lengths(lengths: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """[B] lengths -> [B, N] long mask with ones on each image's kept tokens."""
    positions = torch.arange(max_tokens, device=lengths.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()
