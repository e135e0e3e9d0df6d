"""The VQGAN backbone: a diffusers `VQModel` that always computes in fp32.

The aMUSEd VQ produces NaNs in fp16, so its parameters refuse dtype casts (device moves still apply)
and its forward runs with autocast off. Callers get latents in fp32 and cast them where they need to.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import VQModel
from torch import nn


class VQBackbone(nn.Module):
    def __init__(
        self, vq_config: dict[str, Any] | None = None, model: VQModel | None = None, quantize: bool = True
    ) -> None:
        super().__init__()
        self.quantize = quantize
        if model is None:
            if vq_config is None:
                raise ValueError("VQBackbone needs a vq_config or a VQModel")
            model = VQModel(**vq_config)
        self.model = model.float()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> VQBackbone:
        def keep_fp32(tensor: torch.Tensor) -> torch.Tensor:
            if tensor.is_floating_point():
                target = fn(torch.zeros((), dtype=tensor.dtype, device=tensor.device))
                if target.dtype != tensor.dtype:
                    return tensor.to(device=target.device)
            return fn(tensor)

        return super()._apply(keep_fp32, recurse)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the encoder's and decoder's blocks in the backward pass instead of keeping their activations.

        diffusers' `Encoder` / `Decoder` checkpoint their blocks when these two attributes are set, but
        `VQModel` does not declare `_supports_gradient_checkpointing`, so its `enable_gradient_checkpointing`
        refuses; the attributes are set here as diffusers' own `_set_gradient_checkpointing` would.
        """
        function = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
        for part in (self.model.encoder, self.model.decoder):
            part.gradient_checkpointing = enabled
            part._gradient_checkpointing_func = function

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B,3,H,W] in [0,1] -> latent grid [B,C,g,g]: quantized (straight-through gradients), or the
        continuous pre-quantisation latents when built with `quantize=False`."""
        with torch.autocast(device_type=pixels.device.type, enabled=False):
            hidden = self.model.quant_conv(self.model.encoder(pixels.float()))
            if not self.quantize:
                return hidden
            quantized, _, _ = self.model.quantize(hidden)
        return quantized

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Continuous latent grid [B,C,g,g] -> pixels [B,3,H,W] (unclamped, for losses)."""
        with torch.autocast(device_type=latents.device.type, enabled=False):
            hidden = self.model.post_quant_conv(latents.float())
            return self.model.decoder(hidden, latents.float() if self.model.config.norm_type == "spatial" else None)
