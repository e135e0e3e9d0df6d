"""Q-DOVE annotations: the JSON records, checked up front, and their boxes turned into relevance masks.

A record is `{"image_id", "question", "answer", "bounding_box": [[x, y, w, h], ...]}` with boxes in the
pixels of the ORIGINAL image. Everything here is checked when a dataset is built rather than when a
batch is drawn, so a typo in record 40 000 stops the run before the first optimiser step instead of
inside a DataLoader worker hours later. The box -> mask mapping uses the image processor's own
resize/crop geometry, so the mask cannot drift from the pixels it labels.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..modeling.image_processing import DoveImageProcessor

Box = tuple[float, float, float, float]

REQUIRED_FIELDS = ("image_id", "question", "bounding_box")


class AnnotationError(ValueError):
    """A malformed annotation file or record; the message names the file, the record index and the field."""


@dataclass(frozen=True)
class QueryRecord:
    """One validated annotation: which image, the question asked about it, and the boxes it refers to."""

    image_id: str
    question: str
    answer: str | None
    boxes: tuple[Box, ...]


def load_annotations(path: str | os.PathLike) -> list[QueryRecord]:
    """Read and validate a Q-DOVE annotation file (a JSON list of records, or JSON Lines for `.jsonl`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text ({err})") from err
    if path.suffix.lower() == ".jsonl":
        raw = []
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise AnnotationError(f"{path}: line {line_number} is not valid JSON: {err.msg}") from err
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise AnnotationError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}") from err
        if not isinstance(raw, list):
            raise AnnotationError(f"{path}: the top level must be a JSON list of records, got a {type(raw).__name__}")
    if not raw:
        raise AnnotationError(f"{path}: holds no records")
    return [parse_record(item, index, str(path)) for index, item in enumerate(raw)]


def parse_record(item: Any, index: int, source: str) -> QueryRecord:
    """Validate one raw record; `source` and `index` are only used to say where a problem is."""
    where = f"{source}: record {index}"
    if not isinstance(item, dict):
        raise AnnotationError(f"{where}: must be a JSON object, got {type(item).__name__}")
    missing = [name for name in REQUIRED_FIELDS if name not in item]
    if missing:
        raise AnnotationError(f"{where}: missing field(s) {missing}; a record needs {list(REQUIRED_FIELDS)}")

    image_id = item["image_id"]
    if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
        raise AnnotationError(f"{where}, field 'image_id': must be a string or an integer, got {image_id!r}")
    image_id = str(image_id)
    if not image_id.strip():
        raise AnnotationError(f"{where}, field 'image_id': is empty")

    question = item["question"]
    if question is None:
        question = ""
    if not isinstance(question, str):
        raise AnnotationError(f"{where}, field 'question': must be a string, got {type(question).__name__}")

    answer = item.get("answer")
    if answer is not None:
        if isinstance(answer, (dict, list)):
            raise AnnotationError(f"{where}, field 'answer': must be a string or a number, got {type(answer).__name__}")
        answer = str(answer)

    return QueryRecord(
        image_id=image_id,
        question=question.strip(),
        answer=answer,
        boxes=parse_boxes(item["bounding_box"], f"{where}, field 'bounding_box'"),
    )


def parse_boxes(value: Any, where: str) -> tuple[Box, ...]:
    """A list of `[x, y, w, h]` boxes, each with finite numbers and a positive width and height."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise AnnotationError(f"{where}: must be a list of [x, y, w, h] boxes, got {type(value).__name__}")
    if len(value) == 4 and all(_is_number(v) for v in value):
        raise AnnotationError(
            f"{where}: must be a list of boxes; got a single box {list(value)!r} (wrap it in a list: [[x, y, w, h]])"
        )
    return tuple(parse_box(box, f"{where}[{k}]") for k, box in enumerate(value))


def parse_box(value: Any, where: str) -> Box:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise AnnotationError(f"{where}: a box must be 4 numbers [x, y, w, h], got {value!r}")
    if not all(_is_number(v) for v in value):
        raise AnnotationError(f"{where}: a box must be 4 numbers [x, y, w, h], got {value!r}")
    x, y, w, h = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise AnnotationError(f"{where}: box {list(value)!r} has a NaN or infinite value")
    if w <= 0 or h <= 0:
        raise AnnotationError(f"{where}: box {list(value)!r} must have a positive width and height")
    return (x, y, w, h)


def check_boxes_inside(boxes: tuple[Box, ...], width: int, height: int, where: str, tolerance: float) -> None:
    """Refuse boxes that leave a `width` x `height` image by more than `tolerance` pixels.

    A box past the edge is almost always a sign of coordinates in the wrong frame (resized images,
    normalised [0, 1] values, x1y1x2y2 read as xywh); a pixel or two of overhang is rounding and is clipped.
    """
    for k, (x, y, w, h) in enumerate(boxes):
        if x < -tolerance or y < -tolerance or x + w > width + tolerance or y + h > height + tolerance:
            raise AnnotationError(
                f"{where}[{k}]: box [x={x:g}, y={y:g}, w={w:g}, h={h:g}] lies outside the {width}x{height} image "
                f"(boxes are [x, y, width, height] in original-image pixels)"
            )


def escapes_root(name: str) -> bool:
    """Whether a record's relative image path is absolute or climbs out of its folder with `..`.

    Records name images relative to the image folder; one that leaves it reads a file the data was
    never meant to hold (a typo, or a crafted record pointing at `/etc/...`), so callers refuse it
    unless told otherwise.
    """
    text = name.replace("\\", "/")
    if os.path.isabs(text) or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        return True
    normal = os.path.normpath(text).replace("\\", "/")
    return normal == ".." or normal.startswith("../")


def relevance_mask(boxes: tuple[Box, ...], width: int, height: int, processor: DoveImageProcessor) -> torch.Tensor:
    """The [1, S, S] float mask of the query-relevant region in the processed (resized + cropped) frame.

    Every output pixel a box touches counts as relevant: the resize smears an object's edge over
    neighbouring pixels, so rounding outward keeps the whole object inside its region. Boxes are clipped
    to the crop. With no boxes, or when every box falls outside the crop (the object was cropped away,
    so nothing in the image answers the query), the whole image is relevant: the Q-DOVE loss then
    reduces to the plain DOVE loss instead of dividing by an empty region.
    """
    size = processor.image_size
    mask = torch.zeros(1, size, size)
    if boxes:
        _, new_w, new_h, left, top = processor.geometry(width, height)
        sx, sy = new_w / width, new_h / height
        eps = 1e-6
        for x, y, w, h in boxes:
            x0 = max(0.0, x * sx - left)
            x1 = min(float(size), (x + w) * sx - left)
            y0 = max(0.0, y * sy - top)
            y1 = min(float(size), (y + h) * sy - top)
            if x1 <= x0 or y1 <= y0:
                continue
            c0, c1 = math.floor(x0 + eps), math.ceil(x1 - eps)
            r0, r1 = math.floor(y0 + eps), math.ceil(y1 - eps)
            mask[:, r0 : max(r1, r0 + 1), c0 : max(c1, c0 + 1)] = 1.0
    if not mask.any():
        mask.fill_(1.0)
    return mask


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
