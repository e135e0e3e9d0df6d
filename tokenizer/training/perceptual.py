"""LPIPS perceptual distance for training, with its VGG16 backbone read only from weights the user names.

The `lpips` package ships the calibrated linear heads but fetches the VGG16 trunk from torchvision's
download servers. Training machines are often offline, and a randomly initialised trunk would give a
meaningless loss without any error, so the trunk here comes from an explicit file or hub id, or from
torchvision's own ImageNet weights when asked for by name (`torchvision`), or the loss refuses to exist.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import lpips
import torch
from torch import nn

from ..hub import resolve_pretrained_dir

PERCEPTUAL_WEIGHTS_HINT = (
    "the perceptual (LPIPS) loss needs pretrained VGG16 weights: pass `torchvision` (torchvision's ImageNet "
    "VGG16, downloaded once into its cache), or a torchvision-format VGG16 state dict "
    "(.safetensors, .pth or .pt; the full model's or just its `features`, e.g. torchvision's vgg16-397923af.pth) "
    "as a file path, a directory holding one such file, or a Hugging Face hub id; "
    "or set the perceptual loss weight to 0 to train without it"
)
# `--perceptual-weights torchvision` / `train.perceptual_weights: torchvision`: torchvision's own weights.
TORCHVISION_WEIGHTS = "torchvision"

_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_FEATURES_KEY = re.compile(r"(?:^|\.)features\.(\d+)\.(weight|bias)$")
_BARE_KEY = re.compile(r"^(\d+)\.(weight|bias)$")
_TRUNK_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")


class PerceptualLoss(nn.Module):
    """Frozen LPIPS (VGG16 trunk, v0.1 linear heads) returning a per-pixel distance map.

    A spatial map, rather than one number per image, lets Q-DOVE weight the relevant region more than
    the rest. Its mean over pixels is the usual LPIPS value. Runs in fp32 whatever the surrounding
    autocast says, and stays in eval mode (the heads carry dropout) even inside a module put in training.
    """

    def __init__(self, weights: str | os.PathLike | None) -> None:
        super().__init__()
        features = load_vgg16_features(weights)
        # Built on the meta device so nothing is initialised at random (or downloaded) only to be overwritten.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's notice about the legacy `pretrained` flag
            metric = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, spatial=True, verbose=False)
        state = _assemble_state(metric, features, source=weights)
        metric.load_state_dict(state, strict=True, assign=True)
        on_meta = [name for name, tensor in metric.state_dict().items() if tensor.is_meta]
        if on_meta:
            raise RuntimeError(f"LPIPS tensors left without values after loading {weights}: {on_meta}")
        metric.requires_grad_(False)
        self.lpips = metric.eval()
        self.weights_source = str(weights)

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Images and targets [B,3,H,W] in [0,1] -> distance map [B,1,H,W] (differentiable in `images`)."""
        if images.shape != targets.shape or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"PerceptualLoss expects two [B,3,H,W] batches of the same shape, got {tuple(images.shape)} "
                f"and {tuple(targets.shape)}"
            )
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.lpips(images.float(), targets.float(), normalize=True)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The VGG16 trunk in torchvision `features` naming (`"0.weight"`, ...), to check what was loaded."""
        out = {}
        for name, tensor in self.lpips.state_dict().items():
            match = _TRUNK_KEY.match(name)
            if match:
                out[f"{match.group(1)}.{match.group(2)}"] = tensor
        return out


def load_vgg16_features(source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """Read VGG16 `features` weights from a file, a directory with one weight file, or a hub id.

    Returns them keyed as torchvision's `vgg16().features` names them (`"0.weight"`, `"28.bias"`, ...).
    """
    if source is None or str(source).strip() == "":
        raise ValueError(f"no VGG16 weights given: {PERCEPTUAL_WEIGHTS_HINT}")
    if str(source) == TORCHVISION_WEIGHTS:
        path, state = _torchvision_vgg16()
    else:
        path = _resolve_weights_file(source)
        state = _read_state_dict(path)
    features: dict[str, torch.Tensor] = {}
    matched = {name: _FEATURES_KEY.search(name) for name in state}
    if not any(matched.values()):
        matched = {name: _BARE_KEY.match(name) for name in state}
    for name, match in matched.items():
        if match:
            features[f"{match.group(1)}.{match.group(2)}"] = state[name]
    if not features:
        sample = sorted(state)[:5]
        raise ValueError(
            f"{path} holds no VGG16 `features` weights (keys like 'features.0.weight' or '0.weight'); "
            f"found keys such as {sample}. {PERCEPTUAL_WEIGHTS_HINT}"
        )
    return features


def _torchvision_vgg16() -> tuple[Path, Mapping[str, torch.Tensor]]:
    """torchvision's ImageNet VGG16 (IMAGENET1K_V1, the trunk LPIPS was calibrated on) through torchvision's
    own loader: read from its cache (`$TORCH_HOME/hub/checkpoints`), downloaded there first if absent."""
    import torch.hub
    from torchvision.models import VGG16_Weights

    weights = VGG16_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        state = weights.get_state_dict(progress=False, weights_only=True)
    except Exception as err:  # urllib, OSError, a truncated file...: the user needs the cause and what to do
        raise FileNotFoundError(
            f"--perceptual-weights {TORCHVISION_WEIGHTS}: torchvision could not load its ImageNet VGG16 weights "
            f"({type(err).__name__}: {err}); it downloads them once from {weights.url} into {cached.parent}. "
            f"Offline, copy that file (or any VGG16 state dict) onto this machine and pass its path instead: "
            f"--perceptual-weights /path/to/{cached.name} (or a directory or hub id holding it)"
        ) from err
    return cached, state


def _resolve_weights_file(source: str | os.PathLike) -> Path:
    local = Path(source).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        directory = local
    else:
        try:
            directory = resolve_pretrained_dir(source)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"VGG16 weights not found at {source!s} ({err}); {PERCEPTUAL_WEIGHTS_HINT}"
            ) from err
    for suffix in _WEIGHT_SUFFIXES:
        candidates = sorted(directory.glob(f"*{suffix}"))
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ValueError(
                f"{directory} holds several {suffix} files ({[c.name for c in candidates]}); "
                "name the VGG16 weight file itself"
            )
    raise FileNotFoundError(
        f"{directory} holds no weight file ({', '.join(_WEIGHT_SUFFIXES)}); {PERCEPTUAL_WEIGHTS_HINT}"
    )


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt or foreign files raise many types; the user needs the file and the cause
        raise ValueError(f"cannot read VGG16 weights from {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors; {PERCEPTUAL_WEIGHTS_HINT}")
    return state


def _assemble_state(metric: lpips.LPIPS, features: dict[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
    """Every tensor LPIPS needs: trunk from the user's file, heads from the package, input scaling constants."""
    heads_path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)
    scaling = lpips.ScalingLayer().state_dict()
    state: dict[str, torch.Tensor] = {}
    missing, wrong_shape = [], []
    for name, expected in metric.state_dict().items():
        trunk = _TRUNK_KEY.match(name)
        if trunk:
            key = f"{trunk.group(1)}.{trunk.group(2)}"
            if key not in features:
                missing.append(key)
                continue
            value = features[key]
            if value.shape != expected.shape:
                wrong_shape.append(f"{key}: {tuple(value.shape)} (VGG16 needs {tuple(expected.shape)})")
                continue
            state[name] = value.detach().to(torch.float32).clone()
        elif name.startswith("scaling_layer."):
            state[name] = scaling[name.removeprefix("scaling_layer.")]
        else:
            head = re.sub(r"^lins\.(\d+)\.", r"lin\1.", name)
            if head not in heads:
                raise RuntimeError(f"the installed lpips package lacks {head} in {heads_path}")
            state[name] = heads[head].to(torch.float32)
    if missing or wrong_shape:
        raise ValueError(
            f"{source} is not a VGG16 `features` state dict: missing {missing}, wrong shapes {wrong_shape}. "
            f"{PERCEPTUAL_WEIGHTS_HINT}"
        )
    return state
