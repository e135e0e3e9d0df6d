"""How many tokens an image gets: the first confident EOS, clamped, or a budget the caller forces."""

from __future__ import annotations

from collections.abc import Sequence

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
    budget: int | Sequence[int] | torch.Tensor | None, batch_size: int, max_tokens: int
) -> torch.Tensor | None:
    """A forced length per image ([B] long tensor), or None for automatic lengths."""
    if budget is None:
        return None
    if isinstance(budget, torch.Tensor):
        values = budget.flatten().tolist() if budget.ndim else [int(budget.item())] * batch_size
    elif isinstance(budget, (int,)) and not isinstance(budget, bool):
        values = [budget] * batch_size
    elif isinstance(budget, Sequence) and not isinstance(budget, str):
        values = list(budget)
    else:
        raise TypeError(f"budget must be an int, a list of ints or None; got {type(budget).__name__}")
    if len(values) != batch_size:
        raise ValueError(f"budget has {len(values)} entries but the batch has {batch_size} images")
    for index, value in enumerate(values):
        if isinstance(value, bool) or int(value) != value:
            raise TypeError(f"budget[{index}] must be an integer, got {value!r}")
        if not 1 <= value <= max_tokens:
            raise ValueError(f"budget[{index}]={value} is outside [1, max_tokens={max_tokens}]")
    return torch.tensor([int(v) for v in values], dtype=torch.long)


def mask_from_lengths(lengths: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """[B] lengths -> [B, N] long mask with ones on each image's kept tokens."""
    positions = torch.arange(max_tokens, device=lengths.device)
    return (positions.unsqueeze(0) < lengths.unsqueeze(1)).long()
