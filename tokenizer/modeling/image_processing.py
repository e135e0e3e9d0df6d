"""Turning whatever a user holds (paths, PIL images, tensors) into the [B, 3, S, S] batch in [0, 1] the VQ wants.

The attributes mirror a Hugging Face / LLaVA image processor (`preprocess(..., return_tensors="pt")`,
`image_mean`, `crop_size`, `size`) so that LLaVA code that pads images to a square with
`image_mean` or reads `crop_size` works unchanged. There is no normalisation: the aMUSEd VQ reads
pixels in [0, 1].
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]


class ImageLoadError(ValueError):
    """An input image could not be read; the message names the file or the argument."""


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Open and fully decode one image, from a file path or encoded bytes (e.g. a dataset cell), to RGB.

    The one image decoder of the project: a missing file, a non-image, a truncated or corrupt file and
    a decompression bomb (more pixels than PIL's `Image.MAX_IMAGE_PIXELS` allows, however small the
    file) all raise `ImageLoadError` naming `name` (default: the path) instead of a PIL traceback.
    """
    if isinstance(source, (bytes, bytearray)):
        name = name or "(image bytes)"
        opened: Any = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        name = name or str(path)
        if not path.exists():
            raise ImageLoadError(f"image file not found: {name}")
        if not path.is_file():
            raise ImageLoadError(f"image path is not a file: {name}")
        opened = path
    # A truncated file must be an error here, whatever a caller (lmms-eval does) set globally.
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(opened) as image:
            image.load()
            return to_rgb(image)
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"not an image file (unrecognised format): {name}") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"image {name} is too large to decode safely (a decompression bomb?): {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(f"could not decode image {name} (truncated or corrupt?): {err}") from err
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white, 16-bit is rescaled, not clipped."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        gray = ((array - array.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class DoveImageProcessor:
    """Resize (shorter side) + centre crop to `image_size`, output float pixels in [0, 1]."""

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int) -> None:
        self.image_size = int(image_size)
        self.image_mean = [0.0, 0.0, 0.0]
        self.image_std = [1.0, 1.0, 1.0]
        self.size = {"shortest_edge": self.image_size}
        self.crop_size = {"height": self.image_size, "width": self.image_size}

    def __repr__(self) -> str:
        return f"DoveImageProcessor(image_size={self.image_size})"

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **_: Any) -> dict[str, torch.Tensor]:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        return {"pixel_values": self.to_tensor(images)}

    def to_tensor(self, images: Any, argument: str = "images") -> torch.Tensor:
        """A [B, 3, S, S] float32 batch in [0, 1] from a tensor, a path, a PIL image or a list of them."""
        if isinstance(images, torch.Tensor):
            return self._from_tensor(images, argument)
        if isinstance(images, (str, os.PathLike, Image.Image)):
            images = [images]
        if not isinstance(images, Sequence) or len(images) == 0:
            raise TypeError(
                f"{argument} must be a tensor [B,3,H,W] in [0,1], a path, a PIL image or a non-empty list of them; "
                f"got {type(images).__name__}"
            )
        tensors = []
        for index, item in enumerate(images):
            if isinstance(item, Image.Image):
                tensors.append(self._from_pil(to_rgb(item)))
            elif isinstance(item, (str, os.PathLike)):
                tensors.append(self._from_pil(load_image(item)))
            elif isinstance(item, torch.Tensor):
                tensors.append(self._from_tensor(item, f"{argument}[{index}]"))
            else:
                raise TypeError(f"{argument}[{index}] has unsupported type {type(item).__name__}")
        return torch.cat(tensors, dim=0)

    def geometry(self, width: int, height: int) -> tuple[float, int, int, int, int]:
        """How an image of `width` x `height` is resized then cropped: (scale, new_w, new_h, left, top).

        A point (x, y) of the original lands at (x * new_w / width - left, y * new_h / height - top);
        annotation boxes are mapped with the same numbers the pixels went through.
        """
        scale = self.image_size / min(width, height)
        new_w = max(self.image_size, round(width * scale))
        new_h = max(self.image_size, round(height * scale))
        return scale, new_w, new_h, (new_w - self.image_size) // 2, (new_h - self.image_size) // 2

    def _from_pil(self, image: Image.Image) -> torch.Tensor:
        _, new_w, new_h, left, top = self.geometry(*image.size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        array = np.asarray(image, dtype=np.float32) / 255.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)

    def _from_tensor(self, tensor: torch.Tensor, argument: str) -> torch.Tensor:
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"{argument} must have shape [B, 3, H, W] (or [3, H, W]); got {tuple(tensor.shape)}")
        if tensor.numel() == 0:
            raise ValueError(
                f"{argument} is empty: shape {tuple(tensor.shape)} (at least one image of at least 1x1 pixels)"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"{argument} must be a floating-point tensor in [0, 1]; got dtype {tensor.dtype}")
        tensor = tensor.detach().float()
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{argument} contains NaN or infinite values")
        low, high = tensor.min().item(), tensor.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(f"{argument} must hold values in [0, 1]; got range [{low:.3f}, {high:.3f}]")
        tensor = tensor.clamp(0, 1)
        height, width = tensor.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            scale = self.image_size / min(height, width)
            size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
            tensor = F.interpolate(tensor, size=size, mode="bicubic", align_corners=False, antialias=True)
            top = (size[0] - self.image_size) // 2
            left = (size[1] - self.image_size) // 2
            tensor = tensor[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        return tensor.contiguous()
