"""A light adversarial loss: a PatchGAN discriminator, hinge losses, and the VQGAN-style adaptive weight.

MSE and LPIPS alone leave reconstructions blurry; a discriminator judging overlapping patches restores
texture. Its weight is set each step from gradient norms at the generator's last layer, so the adversarial
pull never drowns the reconstruction signal, and it only switches on after reconstruction has settled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = [
    "PatchDiscriminator",
    "adaptive_adversarial_weight",
    "adversarial_weight_at",
    "hinge_d_loss",
    "hinge_g_loss",
]


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convolutions ending in one real/fake logit per overlapping patch.

    `norm="group"` (default) normalises each sample on its own, so per-GPU batches of a few images train
    the same as large ones and DDP has no running statistics to keep in sync. `norm="spectral"` bounds
    each layer's Lipschitz constant instead (its power-iteration vectors are buffers, saved with the
    state dict). Images come in [0,1], as everywhere in the tokenizer.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, norm: str = "group") -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if norm not in ("group", "spectral"):
            raise ValueError(f"norm must be 'group' or 'spectral', got {norm!r}")
        self.n_layers = n_layers
        widths = [base_channels * min(2**i, 8) for i in range(n_layers + 1)]
        strides = [2] * n_layers + [1]
        layers: list[nn.Module] = []
        channels = in_channels
        for index, (width, stride) in enumerate(zip(widths, strides)):
            conv = nn.Conv2d(
                channels, width, kernel_size=4, stride=stride, padding=1, bias=index == 0 or norm != "group"
            )
            if norm == "spectral":
                layers.append(spectral_norm(conv))
            else:
                layers.append(conv)
                if index > 0:  # the first layer sees raw pixels; normalising them would discard colour levels
                    layers.append(nn.GroupNorm(_groups(width), width))
            layers.append(nn.LeakyReLU(0.2))
            channels = width
        head = nn.Conv2d(channels, 1, kernel_size=4, stride=1, padding=1)
        layers.append(spectral_norm(head) if norm == "spectral" else head)
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    @property
    def min_input_size(self) -> int:
        """Smallest image side with at least one patch: n stride-2 halvings, then two 4x4 valid-ish convs."""
        return 3 * 2**self.n_layers

    def reset_parameters(self) -> None:
        """Small normal init (std 0.02), as GAN discriminators are usually started."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                weight = (
                    module.parametrizations.weight.original if hasattr(module, "parametrizations") else module.weight
                )
                nn.init.normal_(weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.GroupNorm):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B,C,H,W] in [0,1] -> patch logits [B,1,h,w]."""
        if images.ndim != 4 or min(images.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"PatchDiscriminator with n_layers={self.n_layers} needs [B,C,H,W] images with sides >= "
                f"{self.min_input_size}, got {tuple(images.shape)}; use fewer layers for small images"
            )
        dtype = next(self.parameters()).dtype
        return self.layers(images.to(dtype) * 2.0 - 1.0)


def _groups(channels: int) -> int:
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))]): zero once real >= 1 and fake <= -1."""
    return 0.5 * (F.relu(1.0 - real_logits.float()).mean() + F.relu(1.0 + fake_logits.float()).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """-E[D(fake)]: the generator raises the discriminator's score of its reconstructions."""
    return -fake_logits.float().mean()


def adaptive_adversarial_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """||d rec / d W|| / (||d g / d W|| + 1e-4), clamped to [0, max_weight] and detached.

    W is the generator's last layer. Scaling the adversarial loss by this ratio makes its gradient there
    about as large as the reconstruction's, whatever the two losses' scales (as in VQGAN). Both losses must
    still have their graphs; the graphs are kept for the backward pass that follows.
    """
    if not last_layer_weight.requires_grad:
        raise ValueError("adaptive_adversarial_weight needs a last-layer weight that requires grad (is it frozen?)")
    rec_grad = _grad_or_error(rec_loss, last_layer_weight, "rec_loss")
    g_grad = _grad_or_error(g_loss, last_layer_weight, "g_loss")
    weight = rec_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def _grad_or_error(loss: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError(f"{name} does not depend on the last-layer weight passed to adaptive_adversarial_weight")
    return grad


def adversarial_weight_at(step: int, start_step: int, value: float = 1.0) -> float:
    """The adversarial loss factor: 0 before `start_step`, `value` from it on."""
    return float(value) if step >= start_step else 0.0
