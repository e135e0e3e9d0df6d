"""Procedural shapes-VQA: scenes of coloured shapes, questions about them, and the files every stage reads.

Why synthetic data: the whole pipeline (tokenizer training, VLM fine-tuning, lmms-eval scoring) must run
offline in minutes, and the claim under test needs ground truth a photo set cannot give cheaply: which
pixels a question is about (Q-DOVE boxes), and how busy each image is (object count, Laplacian
variance), so token counts can be checked against scene complexity.

Every object in a scene has a distinct (colour, shape) pair, so "the red circle" always names one
object. Colours are saturated and backgrounds are grey (plain or textured), so a colour word never
describes the background. Objects never touch (a small gap separates their boxes), so each stays
identifiable and a box is exactly the object it names.

Questions (answers are one lowercase word; boxes are those of the objects the question names):
    colour    "What colour is the circle?"               only when that shape occurs once
    shape     "What shape is the red object?"            only when that colour occurs once
    count     "How many objects/circles/red objects are there?"   a digit; boxes of every counted object
    presence  "Is there a red circle?"                   yes/no drawn 50/50; "no" has no boxes
    position  "Is the red circle left of the blue square?"        yes/no drawn 50/50; asked only along an
              axis where the two boxes do not overlap, so the answer is never a matter of degree

Determinism: image i is drawn from its own numpy Generator seeded by (seed, i), so a scene does not
depend on n, and the train/test split comes from a separate Generator seeded by (seed, 0). JSON is
written with sorted keys and a fixed indent; PNGs carry no metadata; parquet row groups have a fixed
size. Same arguments, same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm.auto import tqdm

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 195),
    "orange": (245, 135, 25),
}
# Object side as a fraction of the image side; placement falls back to smaller sizes when crowded.
SIZES: dict[str, float] = {"small": 0.15, "medium": 0.22, "large": 0.30}
TEXTURES: tuple[str, ...] = ("stripes", "checker", "noise")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "presence", "position")
SPLITS: tuple[str, ...] = ("train", "test")

MAX_OBJECTS_LIMIT = 8
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024
MIN_OBJECT_SIDE = 6
MAX_OBJECT_SCALE = 2.5  # a large object is then 75% of the image side: beyond that, nothing fits beside it
OBJECT_GAP = 2  # free pixels between any two object boxes
COLOUR_JITTER = 12  # per-channel spread around a named colour: variety without ambiguity
PLACEMENT_ATTEMPTS = 60
PARQUET_ROW_GROUP = 512

# The parquet's `huggingface` schema metadata: `datasets` (and so lmms-eval) reads the image column as an
# Image feature straight away, without a cast.
_HF_FEATURES = {
    "question_id": {"dtype": "string", "_type": "Value"},
    "image_id": {"dtype": "string", "_type": "Value"},
    "image": {"_type": "Image"},
    "question": {"dtype": "string", "_type": "Value"},
    "answer": {"dtype": "string", "_type": "Value"},
    "question_type": {"dtype": "string", "_type": "Value"},
    "n_objects": {"dtype": "int64", "_type": "Value"},
}
PARQUET_SCHEMA = pa.schema(
    [
        ("question_id", pa.string()),
        ("image_id", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("question_type", pa.string()),
        ("n_objects", pa.int64()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": _HF_FEATURES}})},
)

Box = tuple[int, int, int, int]  # x, y, w, h in image pixels

# The suffix LLaVA-1.5 trains short VQA answers with and lmms-eval's VQA tasks append: training and
# evaluation prompts must read the same.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


class ShapesArgumentError(ValueError):
    """A bad generator argument; `argument` is its Python name, so the CLI can name its flag instead."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument} {message}")
        self.argument = argument
        self.reason = message


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    box: Box

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def to_json(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "box": list(self.box)}


@dataclass(frozen=True)
class Question:
    question_type: str
    question: str
    answer: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class ShapesSummary:
    """What `make_shapes` wrote: counts, and the path of every file (per split where files are per split)."""

    out_dir: Path
    n_images: int
    n_train_images: int
    n_test_images: int
    n_questions: dict[str, int]
    question_type_counts: dict[str, int]
    images_dir: Path
    scenes_path: Path
    readme_path: Path
    annotations: dict[str, Path] = field(default_factory=dict)
    llava: dict[str, Path] = field(default_factory=dict)
    parquet: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- scenes


def _gray_texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey background [size, size] in [0, 255]: saturated object colours stay unambiguous on it."""
    base = int(rng.integers(70, 186))
    if kind == "plain":
        return np.full((size, size), base, dtype=np.float64)
    contrast = int(rng.integers(35, 71)) * (1 if base < 128 else -1)
    ys, xs = np.mgrid[0:size, 0:size]
    scale = size / 64
    if kind == "stripes":
        period = int(rng.integers(max(4, round(4 * scale)), max(5, round(11 * scale))))
        orientation = int(rng.integers(3))
        coordinate = (ys, xs, xs + ys)[orientation] + int(rng.integers(period))
        mask = (coordinate % period) < period // 2
    elif kind == "checker":
        cell = int(rng.integers(max(2, round(3 * scale)), max(3, round(9 * scale))))
        mask = ((ys // cell + xs // cell) % 2).astype(bool)
    elif kind == "noise":
        block = int(rng.integers(1, 3))
        coarse = rng.normal(0.0, 0.5, size=(math.ceil(size / block),) * 2)
        noise = np.kron(coarse, np.ones((block, block)))[:size, :size]
        return np.clip(base + contrast * noise, 0, 255)
    else:
        raise ValueError(f"unknown background kind {kind!r}")
    return np.where(mask, base + contrast, base).astype(np.float64)


def _separated(a: Box, b: Box, gap: int) -> bool:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    return ax + aw + gap <= bx or bx + bw + gap <= ax or ay + ah + gap <= by or by + bh + gap <= ay


def _place(side: int, placed: Sequence[Box], image_size: int, rng: np.random.Generator) -> Box | None:
    """A box of this side, one pixel inside the border and OBJECT_GAP away from every placed box."""
    high = image_size - side  # exclusive: keeps x + side <= image_size - 1
    if high <= 1:
        return None
    for _ in range(PLACEMENT_ATTEMPTS):
        x, y = (int(v) for v in rng.integers(1, high, size=2))
        box = (x, y, side, side)
        if all(_separated(box, other, OBJECT_GAP) for other in placed):
            return box
    return None


def _side(size_name: str, image_size: int, scale: float, rng: np.random.Generator) -> int:
    return max(MIN_OBJECT_SIDE, round(SIZES[size_name] * scale * image_size * rng.uniform(0.9, 1.1)))


def sample_objects(
    n_objects: int, image_size: int, rng: np.random.Generator, object_scale: float = 1.0
) -> list[ShapeObject]:
    """`n_objects` objects with distinct (colour, shape) pairs, placed without touching.

    A crowded scene shrinks an object to the next smaller size rather than overlap it; in the rare case
    no size fits, the object is left out (the scene records what was drawn, not what was asked).
    `object_scale` multiplies every size: larger objects are what a tokenizer trained for minutes sees.
    """
    pair_ids = rng.choice(len(COLOURS) * len(SHAPES), size=n_objects, replace=False)
    colour_names = list(COLOURS)
    size_names = list(SIZES)
    objects: list[ShapeObject] = []
    for pair_id in pair_ids:
        colour = colour_names[int(pair_id) // len(SHAPES)]
        shape = SHAPES[int(pair_id) % len(SHAPES)]
        first = int(rng.integers(len(size_names)))
        for size_name in reversed(size_names[: first + 1]):
            box = _place(_side(size_name, image_size, object_scale, rng), [o.box for o in objects], image_size, rng)
            if box is not None:
                objects.append(ShapeObject(shape=shape, colour=colour, size=size_name, box=box))
                break
    return objects


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, fill: tuple[int, int, int]) -> None:
    x, y, w, h = obj.box
    x1, y1 = x + w - 1, y + h - 1  # PIL's coordinates are inclusive
    cx, cy = x + (w - 1) / 2, y + (h - 1) / 2
    if obj.shape == "circle":
        draw.ellipse([x, y, x1, y1], fill=fill)
    elif obj.shape == "square":
        draw.rectangle([x, y, x1, y1], fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=fill)
    elif obj.shape == "cross":
        arm = max(2, round(w / 3))
        top = y + (h - arm) // 2
        left = x + (w - arm) // 2
        draw.rectangle([x, top, x1, top + arm - 1], fill=fill)
        draw.rectangle([left, y, left + arm - 1, y1], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(
    objects: Sequence[ShapeObject], background: str, image_size: int, rng: np.random.Generator
) -> Image.Image:
    """The scene as an RGB image: a grey background, then each object in its (slightly jittered) colour."""
    gray = _gray_texture(background, image_size, rng)
    image = Image.fromarray(np.repeat(gray.round().astype(np.uint8)[..., None], 3, axis=2), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255))
        _draw_object(draw, obj, fill)
    return image


def _shape_mask(shape: str, box: Box, image_size: int, out_size: int) -> np.ndarray:
    """`shape` drawn in `box` (scene pixels) as a soft mask at `out_size`, area-resampled like a resized image."""
    canvas = Image.new("L", (image_size, image_size), 0)
    _draw_object(ImageDraw.Draw(canvas), ShapeObject(shape=shape, colour="", size="", box=box), 255)
    if out_size != image_size:
        canvas = canvas.resize((out_size, out_size), Image.Resampling.BOX)
    return np.asarray(canvas, dtype=np.float64) / 255.0


def classify_shape(image: np.ndarray, colour: str, box: Sequence[int], image_size: int) -> str | None:
    """Which of `SHAPES` the `colour` object in `box` looks like in `image` ([H, W, 3] in [0, 1], any size).

    A probe of what an image keeps, needing no training: each candidate shape is drawn in the box, and the
    one whose mask correlates best with "how close is each pixel to the named colour" wins. Run on the inputs
    it gives the ceiling at that resolution; on reconstructions, how much of each object's shape survived.
    None when the box holds no trace of the colour (the object is gone, so no shape can be read).
    """
    out_size = image.shape[0]
    scale = out_size / image_size
    x, y, w, h = (int(v) for v in box)
    left, top = max(0, math.floor(x * scale) - 1), max(0, math.floor(y * scale) - 1)
    right, bottom = min(out_size, math.ceil((x + w) * scale) + 1), min(out_size, math.ceil((y + h) * scale) + 1)
    target = np.asarray(COLOURS[colour], dtype=np.float64) / 255.0
    distance = np.linalg.norm(image[top:bottom, left:right].astype(np.float64) - target, axis=-1)
    likeness = np.exp(-((distance / 0.25) ** 2)).ravel()
    if likeness.max() < 0.05 or likeness.std() < 1e-6:  # no pixel within ~0.43 (RGB distance) of the colour
        return None
    scores = {}
    for shape in SHAPES:
        mask = _shape_mask(shape, (x, y, w, h), image_size, out_size)[top:bottom, left:right].ravel()
        scores[shape] = float(np.corrcoef(likeness, mask)[0, 1])
    return max(scores, key=scores.__getitem__)


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the Laplacian of the greyscale image (pixel values in [0, 255]): a cheap busyness score."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    return round(float(ndimage.laplace(gray).var()), 4)


# -------------------------------------------------------------------------------------------- questions


def _colour_question(objects: Sequence[ShapeObject], rng: np.random.Generator) -> Question | None:
    shape_counts = Counter(o.shape for o in objects)
    candidates = [o for o in objects if shape_counts[o.shape] == 1]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return Question("colour", f"What colour is the {obj.shape}?", obj.colour, (obj.box,))


def _shape_question(objects: Sequence[ShapeObject], rng: np.random.Generator) -> Question | None:
    colour_counts = Counter(o.colour for o in objects)
    candidates = [o for o in objects if colour_counts[o.colour] == 1]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return Question("shape", f"What shape is the {obj.colour} object?", obj.shape, (obj.box,))


def _count_question(objects: Sequence[ShapeObject], rng: np.random.Generator) -> Question:
    """Counts of everything, of one shape, or of one colour.

    For a shape or colour count the answer value is drawn first, uniformly among the values this scene
    offers (absent kinds give 0), then a kind with that count: otherwise "1" would dominate, since most
    kinds occur once, and the question text alone would predict the answer.
    """
    kind = int(rng.integers(3))
    if kind == 0:
        counted, text = list(objects), "How many objects are there?"
        return Question("count", text, str(len(counted)), tuple(o.box for o in counted))
    attribute = "shape" if kind == 1 else "colour"
    universe = SHAPES if kind == 1 else tuple(COLOURS)
    counts = {target: sum(getattr(o, attribute) == target for o in objects) for target in universe}
    values = sorted(set(counts.values()))
    value = values[int(rng.integers(len(values)))]
    targets = [target for target in universe if counts[target] == value]
    target = targets[int(rng.integers(len(targets)))]
    counted = [o for o in objects if getattr(o, attribute) == target]
    text = f"How many {PLURALS[target]} are there?" if kind == 1 else f"How many {target} objects are there?"
    return Question("count", text, str(len(counted)), tuple(o.box for o in counted))


def _presence_question(objects: Sequence[ShapeObject], rng: np.random.Generator) -> Question | None:
    """Yes and no drawn 50/50. Half the "no" questions share a colour or a shape with a present object,
    so answering needs the binding of colour to shape, not just a glance at the palette."""
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5:
        obj = objects[int(rng.integers(len(objects)))]
        return Question("presence", f"Is there a {obj.name}?", "yes", (obj.box,))
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in objects)]
    pool = near if near and rng.random() < 0.5 else absent
    colour, shape = pool[int(rng.integers(len(pool)))]
    return Question("presence", f"Is there a {colour} {shape}?", "no", ())


_RELATIONS = {  # relation -> (axis, whether `a` comes first along that axis)
    "left of": (0, True),
    "right of": (0, False),
    "above": (1, True),
    "below": (1, False),
}


def _position_question(objects: Sequence[ShapeObject], rng: np.random.Generator) -> Question | None:
    """Asked only along an axis where the two boxes do not overlap, so the truth is clear-cut."""
    pairs = []
    for a in objects:
        for b in objects:
            if a is b:
                continue
            for relation, (axis, a_first) in _RELATIONS.items():
                first, second = (a, b) if a_first else (b, a)
                if first.box[axis] + first.box[axis + 2] <= second.box[axis]:
                    pairs.append((a, b, relation))  # true statement: "a is <relation> b"
    if not pairs:
        return None
    a, b, relation = pairs[int(rng.integers(len(pairs)))]
    answer = "yes"
    if rng.random() < 0.5:
        relation = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[relation]
        answer = "no"
    return Question("position", f"Is the {a.name} {relation} the {b.name}?", answer, (a.box, b.box))


_QUESTION_MAKERS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "presence": _presence_question,
    "position": _position_question,
}


def sample_questions(
    objects: Sequence[ShapeObject], k: int, rng: np.random.Generator, question_types: Sequence[str] = QUESTION_TYPES
) -> list[Question]:
    """Up to `k` distinct questions, cycling through the types in a random order so types stay balanced.

    A type the scene cannot support (no unique shape, a single object for position) is skipped; a scene
    too small for `k` distinct questions gets fewer.
    """
    questions: list[Question] = []
    seen: set[str] = set()
    types = list(question_types)
    for _ in range(4 * k):  # bounded: duplicates are retried, not looped on forever
        if len(questions) == k:
            break
        order = [types[i] for i in rng.permutation(len(types))]
        for question_type in order:
            if len(questions) == k:
                break
            question = _QUESTION_MAKERS[question_type](objects, rng)
            if question is not None and question.question not in seen:
                seen.add(question.question)
                questions.append(question)
    return questions


# ----------------------------------------------------------------------------------------- the writer


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ShapesArgumentError(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ShapesArgumentError(name, f"must be {bound}, got {value}")
    return int(value)


def _check_number(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> float:
    """A finite number in [low, high], or in (low, high] with `low_open`."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ShapesArgumentError(name, f"must be a number in {interval}, got {value!r}")
    above_low = value > low if low_open else value >= low
    if not (math.isfinite(value) and above_low and value <= high):
        raise ShapesArgumentError(name, f"must be in {interval}, got {value}")
    return float(value)


def _check_question_types(value: Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return QUESTION_TYPES
    types = tuple(value)
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if not types or unknown:
        raise ShapesArgumentError(
            "question_types", f"must be a non-empty subset of {', '.join(QUESTION_TYPES)}; got {list(types)}"
        )
    return tuple(dict.fromkeys(types))


def _write_json_records(path: Path, records: Sequence[Mapping]) -> None:
    """A JSON list, one record per line with sorted keys: diffable, byte-stable, and fast to write."""
    lines = ",\n".join(json.dumps(record, sort_keys=True, ensure_ascii=True) for record in records)
    path.write_text(f"[\n{lines}\n]\n" if records else "[]\n", encoding="utf-8")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _prepare_out_dir(out_dir: Path) -> Path:
    """Refuse to replace a directory that is not empty and not a previous shapes dataset."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ShapesArgumentError("out_dir", f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / "scenes.json").is_file():
            raise ShapesArgumentError(
                "out_dir", f"{out_dir} is not empty and holds no scenes.json; refusing to replace it"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    staging.mkdir()  # plain mkdir, unlike mkdtemp, honours the umask: the dataset is readable by others
    return staging


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` by the finished staging directory, so a killed run never leaves a half dataset."""
    if out_dir.exists():
        retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, retired)
        os.replace(staging, out_dir)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


_README = """\
Procedural shapes-VQA data written by `dove-vlm make-shapes` ({n} images, seed {seed}, {size}x{size} px).

images/{{image_id}}.png     every image, both splits
scenes.json               per image: split, n_objects, laplacian_var (Laplacian variance of the greyscale
                          image, values in [0, 255]), background, objects (shape, colour, size, box [x, y, w, h])
{{split}}/annotations.json  Q-DOVE annotations: image_id, question, answer, bounding_box (boxes of the objects
                          the question names, image pixels), question_id, question_type
{{split}}/llava.json        LLaVA conversations, one per question; image paths are relative to images/
{{split}}/vqa.parquet       question_id, image_id, image {{bytes, path}}, question, answer, question_type,
                          n_objects; the image column is tagged as a `datasets` Image feature
Splits are by image: no test image appears in train. A split with no images still gets its three
files (empty lists, a parquet with the schema and no rows, which `datasets` declines to load).
"""


def make_shapes(
    out_dir: str | os.PathLike,
    n: int,
    seed: int,
    image_size: int = 64,
    max_objects: int = 5,
    questions_per_image: int = 3,
    test_fraction: float = 0.2,
    textured_fraction: float = 0.3,
    question_types: Sequence[str] | None = None,
    object_scale: float = 1.0,
    progress: bool = True,
) -> ShapesSummary:
    """Generate `n` scenes and their questions into `out_dir` (layout in the module docstring / README.txt).

    `out_dir` is replaced as a whole when the run finishes; it must be empty, absent, or an earlier
    output of this function. Raises `ShapesArgumentError` (a ValueError) naming a bad argument.
    """
    n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    max_objects = _check_int("max_objects", max_objects, 1, MAX_OBJECTS_LIMIT)
    questions_per_image = _check_int("questions_per_image", questions_per_image, 1, 20)
    test_fraction = _check_number("test_fraction", test_fraction, 0.0, 1.0)
    textured_fraction = _check_number("textured_fraction", textured_fraction, 0.0, 1.0)
    types = _check_question_types(question_types)
    object_scale = _check_number("object_scale", object_scale, 0.0, MAX_OBJECT_SCALE, low_open=True)
    out_dir = Path(out_dir).expanduser()

    n_test = math.floor(n * test_fraction + 0.5)
    test_images = {int(i) for i in np.random.default_rng([seed, 0]).permutation(n)[:n_test]}

    staging = _prepare_out_dir(out_dir)
    try:
        images_dir = staging / "images"
        images_dir.mkdir()
        scenes: list[dict] = []
        annotations: dict[str, list[dict]] = {split: [] for split in SPLITS}
        llava: dict[str, list[dict]] = {split: [] for split in SPLITS}
        writers = {}
        pending: dict[str, list[dict]] = {split: [] for split in SPLITS}
        for split in SPLITS:
            (staging / split).mkdir()
            writers[split] = pq.ParquetWriter(staging / split / "vqa.parquet", PARQUET_SCHEMA)

        def flush(split: str) -> None:
            if pending[split]:
                rows = pending[split]
                columns = [pa.array([row[f.name] for row in rows], type=f.type) for f in PARQUET_SCHEMA]
                writers[split].write_table(pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA))
                pending[split] = []

        bar = tqdm(total=n, desc="make-shapes", unit="img", disable=not progress or n < 200)
        for index in range(n):
            rng = np.random.default_rng([seed, 1, index])
            image_id = f"shapes_{index:06d}"
            split = "test" if index in test_images else "train"
            objects = sample_objects(int(rng.integers(1, max_objects + 1)), image_size, rng, object_scale)
            background = TEXTURES[int(rng.integers(len(TEXTURES)))] if rng.random() < textured_fraction else "plain"
            image = render_scene(objects, background, image_size, rng)
            png = _png_bytes(image)
            (images_dir / f"{image_id}.png").write_bytes(png)
            scenes.append(
                {
                    "image_id": image_id,
                    "split": split,
                    "n_objects": len(objects),
                    "laplacian_var": laplacian_variance(image),
                    "background": background,
                    "objects": [o.to_json() for o in objects],
                }
            )
            for k, q in enumerate(sample_questions(objects, questions_per_image, rng, types)):
                question_id = f"{image_id}_q{k}"
                annotations[split].append(
                    {
                        "image_id": image_id,
                        "question_id": question_id,
                        "question_type": q.question_type,
                        "question": q.question,
                        "answer": q.answer,
                        "bounding_box": [list(b) for b in q.boxes],
                    }
                )
                llava[split].append(
                    {
                        "id": question_id,
                        "image": f"{image_id}.png",
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{q.question}\n{SHORT_ANSWER_PROMPT}"},
                            {"from": "gpt", "value": q.answer},
                        ],
                    }
                )
                pending[split].append(
                    {
                        "question_id": question_id,
                        "image_id": image_id,
                        "image": {"bytes": png, "path": f"{image_id}.png"},
                        "question": q.question,
                        "answer": q.answer,
                        "question_type": q.question_type,
                        "n_objects": len(objects),
                    }
                )
                if len(pending[split]) >= PARQUET_ROW_GROUP:
                    flush(split)
            bar.update(1)
        bar.close()
        for split in SPLITS:
            flush(split)
            writers[split].close()
            _write_json_records(staging / split / "annotations.json", annotations[split])
            _write_json_records(staging / split / "llava.json", llava[split])
        _write_json_records(staging / "scenes.json", scenes)
        (staging / "README.txt").write_text(_README.format(n=n, seed=seed, size=image_size), encoding="utf-8")
        _swap_in(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    type_counts = Counter(a["question_type"] for split in SPLITS for a in annotations[split])
    return ShapesSummary(
        out_dir=out_dir,
        n_images=n,
        n_train_images=n - len(test_images),
        n_test_images=len(test_images),
        n_questions={split: len(annotations[split]) for split in SPLITS},
        question_type_counts={t: type_counts.get(t, 0) for t in types},
        images_dir=out_dir / "images",
        scenes_path=out_dir / "scenes.json",
        readme_path=out_dir / "README.txt",
        annotations={split: out_dir / split / "annotations.json" for split in SPLITS},
        llava={split: out_dir / split / "llava.json" for split in SPLITS},
        parquet={split: out_dir / split / "vqa.parquet" for split in SPLITS},
    )


# ------------------------------------------------------------------------------------- blind baseline

ANY_TEMPLATE = "*"


def template_key(record: Mapping) -> str:
    """The key a question-only predictor may condition on: `"{question_type}|{question}"`.

    The whole normalised question text is kept (lowercase, single spaces): for this generator the text
    holds only colour, shape and relation words, so this is the strongest guess available without the
    image. Records without `question_type` (annotations from elsewhere) use "any".
    """
    question_type = str(record.get("question_type") or "any")
    text = " ".join(str(record["question"]).lower().split())
    return f"{question_type}|{text}"


def _type_key(record: Mapping) -> str:
    return f"{record.get('question_type') or 'any'}|{ANY_TEMPLATE}"


def _majority(answers: Counter) -> str:
    return min(answers.items(), key=lambda item: (-item[1], item[0]))[0]  # ties: alphabetically first


def _normalise_answer(answer: object) -> str:
    return " ".join(str(answer).lower().split())


def question_only_majority(train_annotations: Sequence[Mapping]) -> dict[str, str]:
    """Majority training answer per template key (see `template_key`), plus fallbacks for unseen text.

    Keys: every `template_key` seen in training; `"{question_type}|*"` (the majority of that type, for a
    test question whose exact text never occurred in training); and `"*"` (the overall majority).
    Ties go to the alphabetically first answer, so the result is deterministic.
    """
    if not train_annotations:
        raise ValueError("train_annotations is empty: no majority answer to learn")
    by_key: dict[str, Counter] = defaultdict(Counter)
    for index, record in enumerate(train_annotations):
        if "question" not in record or "answer" not in record:
            raise ValueError(f"train_annotations[{index}] lacks 'question' or 'answer'")
        answer = _normalise_answer(record["answer"])
        by_key[template_key(record)][answer] += 1
        by_key[_type_key(record)][answer] += 1
        by_key[ANY_TEMPLATE][answer] += 1
    return {key: _majority(answers) for key, answers in sorted(by_key.items())}


def predict_blind(majority: Mapping[str, str], record: Mapping) -> str:
    """The question-only answer: the template's majority, else its type's, else the overall one."""
    for key in (template_key(record), _type_key(record), ANY_TEMPLATE):
        if key in majority:
            return majority[key]
    raise ValueError("the majority table has no '*' entry; build it with question_only_majority")


def blind_baseline_accuracy(train_annotations: Sequence[Mapping], test_annotations: Sequence[Mapping]) -> float:
    """Exact-match accuracy on the test questions of answering from the question text alone."""
    if not test_annotations:
        raise ValueError("test_annotations is empty: no accuracy to compute")
    majority = question_only_majority(train_annotations)
    correct = sum(predict_blind(majority, r) == _normalise_answer(r["answer"]) for r in test_annotations)
    return correct / len(test_annotations)
