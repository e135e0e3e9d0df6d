"""Projectors from the tower's token space to the LLM's embedding space, under LLaVA's names.

`linear` is LLaVA-1's single matrix, `mlp{N}x_gelu` LLaVA-1.5's stack of N linear layers with GELU between
them, `identity` passes features through unchanged (the tower must then already emit the LLM's width).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from tokenizer.hub import load_safetensors, load_state_dict_exactly

PROJECTOR_KEY = "mm_projector."
_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """A freshly initialised projector of one of LLaVA's named types."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    if projector_type == "identity":
        if in_dim != out_dim:
            raise ValueError(
                f"projector 'identity' needs the tower width ({in_dim}) to equal the LLM width ({out_dim})"
            )
        return nn.Identity()
    match = _MLP_PATTERN.match(projector_type)
    if match:
        depth = int(match.group(1))
        if depth < 1:
            raise ValueError(f"projector {projector_type!r} needs at least one layer")
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector type {projector_type!r}; expected 'linear', 'identity' or 'mlp<N>x_gelu'")


def projector_state_dict(projector: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The projector's weights under `mm_projector.*` keys, the layout LLaVA's `mm_projector.bin` uses."""
    state = projector.state_dict() if state is None else state
    return {f"{PROJECTOR_KEY}{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def load_projector_weights(projector: nn.Module, path: str | os.PathLike) -> None:
    """Load a file of `mm_projector.*` tensors (safetensors, or a torch `.bin` read with weights_only).

    Anything before `mm_projector.` in a key is dropped, so both our files and LLaVA's
    (`model.mm_projector.0.weight`) load. Missing, extra or misshapen tensors are refused by name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector weights not found: {path}")
    if path.suffix == ".safetensors":
        raw = load_safetensors(path)
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{path} does not hold a state dict (got {type(raw).__name__})")
    state = {key.split(PROJECTOR_KEY, 1)[1]: value for key, value in raw.items() if PROJECTOR_KEY in key}
    if not state:
        shown = ", ".join(sorted(raw)[:8]) or "nothing"
        raise ValueError(f"{path} holds no '{PROJECTOR_KEY}*' tensors (found: {shown})")
    load_state_dict_exactly(projector, state, f"projector weights in {path}")
