"""Labelled image grids: inputs, reconstructions per budget and at the automatic length."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..modeling.dove_tokenizer import Reconstruction


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(array)


def image_grid(
    rows: Sequence[Sequence[torch.Tensor]], labels: Sequence[Sequence[str]], cell: int = 128, header: int = 18
) -> Image.Image:
    """A grid of [3,H,W] tensors, each cell scaled to `cell` px with its own caption above it."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    canvas = Image.new("RGB", (n_cols * cell, n_rows * (cell + header)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, header - 6))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top = r * (cell + header)
            picture = tensor_to_pil(image).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(picture, (c * cell, top + header))
            draw.text((c * cell + 3, top + 2), labels[r][c], fill="black", font=font)
    return canvas


def save_reconstruction_grid(result: Reconstruction, path: str | os.PathLike, cell: int = 128) -> Path:
    """One row per image: the input, each budget's reconstruction, then the automatic length's."""
    rows, labels = [], []
    for index in range(result.inputs.shape[0]):
        row = [result.inputs[index]]
        caption = ["input"]
        for budget, images in sorted(result.by_budget.items()):
            row.append(images[index])
            caption.append(f"{budget} tok")
        if result.auto is not None:
            row.append(result.auto[index])
            caption.append(f"auto: {int(result.auto_lengths[index])} tok")
        rows.append(row)
        labels.append(caption)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, labels, cell=cell).save(path)
    return path
