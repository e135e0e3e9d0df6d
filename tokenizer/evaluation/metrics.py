"""Reconstruction quality: PSNR, SSIM, LPIPS and rFID, per token budget.

PSNR and SSIM are torchmetrics' (images in [0, 1], data range 1). LPIPS reuses the training loss's
`PerceptualLoss`, so it needs VGG16 weights from a path or hub id and never runs with a random trunk.

rFID is torchmetrics' `FrechetInceptionDistance` between the inputs and their reconstructions. Its
Inception network must come from a weights file (`inception_weights`); without one this is an error.
- With `torch-fidelity` installed the file is the standard FID Inception
  (`pt_inception-2015-12-05-6726825d.pth`), given to torchmetrics as `feature_extractor_weights_path`:
  numbers comparable with published FIDs.
- Without it, the file is a torchvision `inception_v3` state dict and its 2048-d pool features are used
  (a custom feature extractor for torchmetrics). Such scores rank models consistently but are not
  comparable with published FID values; `RFID.backend` says which was used.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

INCEPTION_HINT = (
    "rFID needs Inception weights: with torch-fidelity installed, the FID Inception file "
    "pt_inception-2015-12-05-6726825d.pth; otherwise a torchvision inception_v3 state dict "
    "(.pth/.safetensors, e.g. inception_v3_google-0cc3c7bd.pth). Leave it out to skip rFID."
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, [B]; images [B,3,H,W] in [0,1] (recon is clamped)."""
    return peak_signal_noise_ratio(
        recon.float().clamp(0, 1), target.float(), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, [B] (Gaussian window 11, sigma 1.5; images [B,3,H,W] in [0,1])."""
    return structural_similarity_index_measure(
        recon.float().clamp(0, 1), target.float(), data_range=1.0, reduction="none"
    )


class LPIPSMetric(nn.Module):
    """Per-image LPIPS (VGG16 trunk from `weights`), [B]; lower is better."""

    def __init__(self, weights: str | os.PathLike) -> None:
        super().__init__()
        from ..training.perceptual import PerceptualLoss

        self.perceptual = PerceptualLoss(weights)

    @torch.no_grad()
    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.perceptual(recon.float().clamp(0, 1), target.float()).mean(dim=(1, 2, 3))


class TorchvisionInceptionFeatures(nn.Module):
    """2048-d pool features of a torchvision `inception_v3` loaded from a local state dict.

    Takes images in [0,1] (any size; resized to 299 here) and exposes `num_features` for torchmetrics.
    """

    num_features = 2048

    def __init__(self, weights: str | os.PathLike) -> None:
        super().__init__()
        from torchvision.models import inception_v3

        state = _read_state(Path(weights))
        network = inception_v3(weights=None, aux_logits=False, init_weights=False)
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        missing, unexpected = network.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} is not a torchvision inception_v3 state dict: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}. {INCEPTION_HINT}"
            )
        network.fc = nn.Identity()
        self.network = network.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> TorchvisionInceptionFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        images = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return self.network((images - self.mean) / self.std)


def _read_state(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights not found: {path}. {INCEPTION_HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # foreign or corrupt files raise many types; the user needs the file and the cause
        raise ValueError(f"cannot read Inception weights from {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping):
        raise TypeError(f"{path} is not a state dict. {INCEPTION_HINT}")
    return state


class RFID:
    """Reconstruction FID: real = the inputs, fake = their reconstructions (torchmetrics FID, fp64 statistics)."""

    def __init__(self, inception_weights: str | os.PathLike | None, device: torch.device | str = "cpu") -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        if inception_weights is None or str(inception_weights).strip() == "":
            raise ValueError(f"no Inception weights given. {INCEPTION_HINT}")
        path = Path(inception_weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found: {path}. {INCEPTION_HINT}")
        if importlib.util.find_spec("torch_fidelity") is not None and path.name.startswith("pt_inception"):
            self.backend = "fid-inception (torch-fidelity)"
            self.metric = FrechetInceptionDistance(
                feature=2048, normalize=True, feature_extractor_weights_path=str(path)
            )
        else:
            self.backend = "torchvision inception_v3"
            self.metric = FrechetInceptionDistance(feature=TorchvisionInceptionFeatures(path), normalize=True)
        self.metric = self.metric.to(device)

    def update(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        self.metric.update(target.float().clamp(0, 1), real=True)
        self.metric.update(recon.float().clamp(0, 1), real=False)

    def compute(self) -> float:
        if int(self.metric.fake_features_num_samples) < 2:
            raise ValueError("rFID needs at least 2 images")
        return float(self.metric.compute())


@dataclass
class BudgetScores:
    """Running sums for one budget (or the automatic length)."""

    tokens: float = 0.0
    psnr: float = 0.0
    ssim: float = 0.0
    lpips: float = 0.0
    count: int = 0
    rfid: RFID | None = None

    def row(self, name: str, with_lpips: bool) -> dict[str, float | str]:
        n = max(self.count, 1)
        row: dict[str, float | str] = {
            "budget": name,
            "tokens": self.tokens / n,
            "psnr": self.psnr / n,
            "ssim": self.ssim / n,
        }
        if with_lpips:
            row["lpips"] = self.lpips / n
        if self.rfid is not None:
            row["rfid"] = self.rfid.compute()
        return row


@dataclass
class ReconstructionMetrics:
    """Accumulates PSNR / SSIM (/ LPIPS / rFID) for each budget and for the automatic length."""

    budgets: Iterable[int]
    lpips_weights: str | os.PathLike | None = None
    inception_weights: str | os.PathLike | None = None
    device: torch.device | str = "cpu"
    scores: dict[str, BudgetScores] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.budgets = [int(b) for b in self.budgets]
        self.lpips = LPIPSMetric(self.lpips_weights).to(self.device) if self.lpips_weights else None
        for name in [str(b) for b in self.budgets] + ["auto"]:
            rfid = RFID(self.inception_weights, self.device) if self.inception_weights else None
            self.scores[name] = BudgetScores(rfid=rfid)

    def update(self, name: str, recon: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> None:
        scores = self.scores[name]
        scores.psnr += float(psnr(recon, target).sum())
        scores.ssim += float(ssim(recon, target).sum())
        if self.lpips is not None:
            scores.lpips += float(self.lpips(recon, target).sum())
        if scores.rfid is not None:
            scores.rfid.update(recon, target)
        scores.tokens += float(lengths.float().sum())
        scores.count += int(target.shape[0])

    def rows(self) -> list[dict[str, float | str]]:
        return [scores.row(name, self.lpips is not None) for name, scores in self.scores.items()]
