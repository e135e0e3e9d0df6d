"""Training data for the DOVE / Q-DOVE tokenizer: image folders, Q-DOVE annotation JSON, Hugging Face datasets.

Every dataset yields the same example dict, so the training loop never asks where data came from:

    {"pixels": FloatTensor[3, S, S] in [0, 1], "query": str ("" for none),
     "relevance": FloatTensor[1, S, S] (1 = the query is about this pixel), "index": int, "source": str}

Pixels go through `DoveImageProcessor`, the code inference uses, so training and inference cannot
disagree on resize, crop or colour conversion.

Corrupt images: a web-scale folder always holds a few. By default an unreadable image is logged once
and `dataset[i]` returns a `SkippedExample`; `collate_examples` drops it and reports how many it
dropped in the batch's `"skipped"` count. Counting travels inside the batch because DataLoader
workers are separate processes: a counter on the dataset object would be incremented in a copy the
training loop never sees. With `strict=True` the first bad image raises `ImageLoadError` instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..modeling.image_processing import DoveImageProcessor, ImageLoadError, load_image, to_rgb
from .annotations import (
    AnnotationError,
    QueryRecord,
    check_boxes_inside,
    escapes_root,
    load_annotations,
    parse_boxes,
    relevance_mask,
)
from .sampler import ResumableSampler

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HUB_PREFIX = "hf://"
# A few corrupt files are normal in web data; past this share of unreadable images (training warns, in
# tokenizer and LLaVA training alike) the data or its decoding is probably wrong.
SKIPPED_WARN_SHARE = 0.1

__all__ = [
    "AnnotationError",
    "HFImageDataset",
    "ImageFolderDataset",
    "QueryAnnotationDataset",
    "ResumableSampler",
    "SkippedExample",
    "build_dataset",
    "collate_examples",
    "list_images",
]


@dataclass(frozen=True)
class SkippedExample:
    """What `dataset[i]` returns for an image that could not be read (non-strict mode)."""

    index: int
    source: str
    reason: str


_warned_sources: set[str] = set()


def _skip(index: int, source: str, error: Exception) -> SkippedExample:
    # Once per file and process: a corrupt file revisited every epoch should not flood the log.
    if source not in _warned_sources:
        _warned_sources.add(source)
        logger.warning("skipping unreadable image %s: %s", source, error)
    return SkippedExample(index=index, source=source, reason=str(error))


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path; hidden files and folders are ignored.

    Hidden entries are skipped because they are tool debris (`.ipynb_checkpoints/`, macOS `._name.jpg`
    resource forks that carry an image extension but no image).
    """
    root = Path(root)
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(directory) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class _ExampleDataset(Dataset):
    """Shared plumbing: the processor, strict/non-strict handling and the example dict."""

    def __init__(self, image_size: int, strict: bool) -> None:
        self.processor = DoveImageProcessor(image_size)
        self.image_size = self.processor.image_size
        self.strict = bool(strict)

    def _read(self, index: int, path: Path) -> Image.Image | SkippedExample:
        """The image at `path`, or (non-strict) a `SkippedExample` saying why it could not be read."""
        try:
            return load_image(path)
        except ImageLoadError as err:
            if self.strict:
                raise
            return _skip(index, str(path), err)

    def _example(
        self, image: Image.Image, index: int, source: str, query: str = "", boxes: tuple = ()
    ) -> dict[str, Any]:
        pixels = self.processor.to_tensor(image)[0]
        if query:
            relevance = relevance_mask(boxes, image.width, image.height, self.processor)
        else:
            relevance = torch.ones(1, self.image_size, self.image_size)
        return {"pixels": pixels, "query": query, "relevance": relevance, "index": index, "source": source}


class ImageFolderDataset(_ExampleDataset):
    """Every image under a folder (subfolders included), in sorted order; no queries (DOVE training)."""

    def __init__(self, root: str | os.PathLike, image_size: int, strict: bool = False) -> None:
        super().__init__(image_size, strict)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.paths = list_images(self.root)
        if not self.paths:
            raise ValueError(
                f"no images found under {self.root} (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedExample:
        path = self.paths[index]
        image = self._read(index, path)
        return image if isinstance(image, SkippedExample) else self._example(image, index, str(path))


class QueryAnnotationDataset(_ExampleDataset):
    """Q-DOVE records (question + boxes) over an image folder; one example per record.

    All records are validated when the dataset is built: fields and types, box shape, and that each
    image exists and each box lies within it (`box_tolerance` pixels of overhang are forgiven and
    clipped). Image sizes come from file headers, so this costs one small read per distinct image.
    """

    def __init__(
        self,
        annotations_path: str | os.PathLike,
        image_root: str | os.PathLike,
        image_size: int,
        strict: bool = False,
        box_tolerance: float = 2.0,
        allow_outside_root: bool = False,
    ) -> None:
        super().__init__(image_size, strict)
        self.annotations_path = Path(annotations_path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(
                f"image folder for annotations {self.annotations_path} not found: {self.image_root}"
            )
        self.records: list[QueryRecord] = load_annotations(self.annotations_path)
        resolver = _ImageResolver(self.image_root, allow_outside_root)
        self.paths: list[Path] = []
        sizes: dict[Path, tuple[int, int] | None] = {}
        for index, record in enumerate(self.records):
            where = f"{self.annotations_path}: record {index}"
            path = resolver.resolve(record.image_id, f"{where}, field 'image_id'")
            if path not in sizes:
                sizes[path] = self._header_size(path)
            if sizes[path] is not None:
                width, height = sizes[path]
                check_boxes_inside(record.boxes, width, height, f"{where}, field 'bounding_box'", box_tolerance)
            self.paths.append(path)

    def _header_size(self, path: Path) -> tuple[int, int] | None:
        """(width, height) from the header; an unreadable file is left for `__getitem__` to skip or raise."""
        try:
            with Image.open(path) as image:
                return image.size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            if self.strict:
                raise ImageLoadError(f"not a readable image: {path} ({err})") from err
            return None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedExample:
        record, path = self.records[index], self.paths[index]
        image = self._read(index, path)
        if isinstance(image, SkippedExample):
            return image
        return self._example(image, index, str(path), record.question, record.boxes)


class _ImageResolver:
    """Maps an annotation's `image_id` to a file: the id as a relative path, else the id plus an image extension."""

    def __init__(self, root: Path, allow_outside_root: bool = False) -> None:
        self.root = root
        self.allow_outside_root = allow_outside_root
        self.by_name: dict[str, Path] = {}
        self.by_stem: dict[str, list[Path]] = {}
        for path in list_images(root):
            relative = path.relative_to(root).as_posix()
            self.by_name[relative] = path
            self.by_stem.setdefault(relative[: -len(path.suffix)], []).append(path)

    def resolve(self, image_id: str, where: str) -> Path:
        if not self.allow_outside_root and escapes_root(image_id):
            raise AnnotationError(
                f"{where}: image id {image_id!r} points outside the image folder {self.root} (an absolute path or "
                f"one climbing with '..'); pass allow_outside_root=True (--allow-paths-outside-root) to allow it"
            )
        key = image_id.replace("\\", "/")
        while key.startswith("./"):
            key = key[2:]
        if key in self.by_name:
            return self.by_name[key]
        candidates = self.by_stem.get(key, [])
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise AnnotationError(f"{where}: image id {image_id!r} is ambiguous in {self.root} ({names})")
        direct = self.root / image_id
        if direct.is_file():
            return direct
        raise AnnotationError(
            f"{where}: no image {image_id!r} in {self.root} (tried the id itself and the id + "
            f"{'/'.join(IMAGE_EXTENSIONS)})"
        )


class HFImageDataset(_ExampleDataset):
    """An image dataset in the Hugging Face `datasets` format: a dataset saved with `save_to_disk`,
    parquet files, or a hub id (fetched by `datasets` into its cache; not available offline).

    Optional columns give Q-DOVE supervision: `question_column` (text) and `boxes_column` (a list of
    `[x, y, w, h]` boxes in original-image pixels). Images are decoded here, not by `datasets`, so a
    corrupt cell can be skipped instead of raising inside the Arrow decoding.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        split: str = "train",
        image_column: str = "image",
        question_column: str | None = None,
        boxes_column: str | None = None,
        *,
        image_size: int,
        strict: bool = False,
        config_name: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        box_tolerance: float = 2.0,
    ) -> None:
        super().__init__(image_size, strict)
        import datasets

        self.name = str(name_or_path)
        self.split = split
        self.box_tolerance = box_tolerance
        table = _open_hf(self.name, split, config_name, cache_dir)
        for role, column in (("image", image_column), ("question", question_column), ("boxes", boxes_column)):
            if column is not None and column not in table.column_names:
                raise ValueError(
                    f"{self.name} (split {split!r}) has no {role} column {column!r}; columns: {table.column_names}"
                )
        if len(table) == 0:
            raise ValueError(f"{self.name} (split {split!r}) is empty")
        if isinstance(table.features[image_column], datasets.Image):
            table = table.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.question_column = question_column
        self.boxes_column = boxes_column
        self.table = table
        self.questions, self.boxes = self._validate_annotations()

    def _validate_annotations(self) -> tuple[list[str] | None, list[tuple] | None]:
        questions = boxes = None
        if self.question_column is not None:
            questions = []
            for row, value in enumerate(self.table[self.question_column]):
                if value is not None and not isinstance(value, str):
                    raise AnnotationError(
                        f"{self._where(row)}, column {self.question_column!r}: must be a string, got {type(value).__name__}"
                    )
                questions.append((value or "").strip())
        if self.boxes_column is not None:
            boxes = [
                parse_boxes(value, f"{self._where(row)}, column {self.boxes_column!r}")
                for row, value in enumerate(self.table[self.boxes_column])
            ]
        return questions, boxes

    def _where(self, row: int) -> str:
        return f"{self.name} (split {self.split!r}) row {row}"

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedExample:
        cell = self.table[int(index)][self.image_column]
        source = self._where(index)
        try:
            image, source = self._decode(cell, source)
        except ImageLoadError as err:
            if self.strict:
                raise
            return _skip(index, source, err)
        query = self.questions[index] if self.questions is not None else ""
        boxes = self.boxes[index] if self.boxes is not None else ()
        if boxes:
            check_boxes_inside(
                boxes, image.width, image.height, f"{source}, column {self.boxes_column!r}", self.box_tolerance
            )
        return self._example(image, index, source, query, boxes)

    def _decode(self, cell: Any, source: str) -> tuple[Image.Image, str]:
        if isinstance(cell, Image.Image):
            return to_rgb(cell), source
        if isinstance(cell, dict):
            path = cell.get("path")
            if path:
                source = f"{source} ({path})"
            if cell.get("bytes"):
                return load_image(cell["bytes"], source), source
            if path:
                return load_image(path), source
        if isinstance(cell, (str, os.PathLike)):
            return load_image(cell), f"{source} ({cell})"
        if isinstance(cell, (bytes, bytearray)):
            return load_image(bytes(cell), source), source
        raise ImageLoadError(f"{source}: the image cell holds no image (got {type(cell).__name__})")


def _open_hf(name: str, split: str, config_name: str | None, cache_dir: str | os.PathLike | None) -> Any:
    import datasets

    path = Path(name)
    if path.is_dir() and any((path / marker).is_file() for marker in HF_DISK_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{path} has no split {split!r}; splits: {sorted(loaded)}")
            loaded = loaded[split]
        return loaded
    if path.suffix.lower() == ".parquet" or (path.is_dir() and any(path.glob("*.parquet"))):
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
        return datasets.load_dataset("parquet", data_files={split: files}, split=split, cache_dir=cache_dir)
    if path.exists():
        raise ValueError(
            f"{path} is neither a dataset saved with save_to_disk (no {'/'.join(HF_DISK_MARKERS)}) nor parquet"
        )
    return datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir)


def build_dataset(
    data: str | os.PathLike,
    annotations: str | os.PathLike | None = None,
    *,
    image_size: int,
    strict: bool = False,
    hf_split: str = "train",
    image_column: str = "image",
    question_column: str | None = None,
    boxes_column: str | None = None,
    hf_config: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    box_tolerance: float = 2.0,
    allow_outside_root: bool = False,
) -> Dataset:
    """Pick the dataset class for a `--data` argument (and optional `--annotations`).

    - `hf://NAME`: a Hugging Face hub dataset.
    - a folder holding `dataset_info.json` / `state.json` / `dataset_dict.json`: a `save_to_disk` dataset.
    - a `.parquet` file: a Hugging Face parquet dataset.
    - any other folder: an image folder; with `annotations`, the image root of the Q-DOVE records
      (a record whose `image_id` leaves that folder is refused unless `allow_outside_root`).
    """
    text = str(data)
    hf_kwargs = {
        "split": hf_split,
        "image_column": image_column,
        "question_column": question_column,
        "boxes_column": boxes_column,
        "image_size": image_size,
        "strict": strict,
        "config_name": hf_config,
        "cache_dir": cache_dir,
        "box_tolerance": box_tolerance,
    }
    if text.startswith(HUB_PREFIX):
        if annotations is not None:
            raise ValueError(
                "annotations JSON needs an image folder as data, not a hub dataset; "
                "use question/boxes columns for Hugging Face data"
            )
        return HFImageDataset(text[len(HUB_PREFIX) :], **hf_kwargs)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(
            f"data path not found: {path} (an image folder, a save_to_disk dataset, a .parquet file, "
            f"or hf://NAME for a hub dataset)"
        )
    is_hf = path.suffix.lower() == ".parquet" or (
        path.is_dir() and any((path / marker).is_file() for marker in HF_DISK_MARKERS)
    )
    if annotations is not None:
        if is_hf or not path.is_dir():
            raise ValueError(f"annotations {annotations} need an image folder as data; {path} is not one")
        return QueryAnnotationDataset(
            annotations,
            path,
            image_size,
            strict=strict,
            box_tolerance=box_tolerance,
            allow_outside_root=allow_outside_root,
        )
    if is_hf:
        return HFImageDataset(path, **hf_kwargs)
    if path.is_dir():
        return ImageFolderDataset(path, image_size, strict=strict)
    raise ValueError(f"data {path} is a file; expected an image folder, a dataset folder or a .parquet file")


def collate_examples(batch: Sequence[dict[str, Any] | SkippedExample | None]) -> dict[str, Any]:
    """Stack examples into a batch, dropping skipped ones and counting them.

    Returns `{"pixels": [B,3,S,S], "queries": list[str], "relevance": [B,1,S,S], "index": LongTensor[B],
    "sources": list[str], "skipped": int, "skipped_sources": list[str], "consumed": int}`. `consumed` is
    how many sampler indices the batch covered (kept + skipped): what `ResumableSampler.advance` wants.
    When every example was skipped, B is 0 (pixels of shape [0, 3, 0, 0]); a loop must skip such a
    batch, and under DDP agree across ranks before skipping (one rank stepping alone hangs the others).
    """
    kept = [item for item in batch if isinstance(item, dict)]
    skipped = [item for item in batch if not isinstance(item, dict)]
    skipped_sources = [item.source for item in skipped if isinstance(item, SkippedExample)]
    if kept:
        pixels = torch.stack([item["pixels"] for item in kept])
        relevance = torch.stack([item["relevance"] for item in kept])
    else:
        pixels = torch.zeros(0, 3, 0, 0)
        relevance = torch.zeros(0, 1, 0, 0)
    return {
        "pixels": pixels,
        "queries": [item["query"] for item in kept],
        "relevance": relevance,
        "index": torch.tensor([int(item["index"]) for item in kept], dtype=torch.long),
        "sources": [item["source"] for item in kept],
        "skipped": len(skipped),
        "skipped_sources": skipped_sources,
        "consumed": len(batch),
    }
