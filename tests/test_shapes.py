"""The shapes-VQA generator: byte-stable output, answers that agree with the scenes, files other stages read."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dove_vlm.cli import main
from dove_vlm.shapes import (
    COLOUR_JITTER,
    COLOURS,
    QUESTION_TYPES,
    SHAPES,
    SHORT_ANSWER_PROMPT,
    ShapeObject,
    blind_baseline_accuracy,
    classify_shape,
    make_shapes,
    predict_blind,
    question_only_majority,
    render_scene,
    template_key,
)

SIZE = 64
SHAPE_OF_PLURAL = {
    "circles": "circle",
    "squares": "square",
    "triangles": "triangle",
    "diamonds": "diamond",
    "crosses": "cross",
}


def _load(path: Path):
    return json.loads(path.read_text())


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "data"
    summary = make_shapes(out, n=80, seed=7, image_size=SIZE, progress=False)
    scenes = {s["image_id"]: s for s in _load(out / "scenes.json")}
    annotations = {split: _load(out / split / "annotations.json") for split in ("train", "test")}
    return out, summary, scenes, annotations


def _boxes(records):
    return sorted(tuple(b) for b in records)


def _expected(question: str, objects: list[dict]) -> tuple[str, list[tuple]]:
    """The answer and boxes recomputed from the scene by parsing the question text (independent of the generator)."""
    by_pair = {(o["colour"], o["shape"]): o for o in objects}
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        matches = [o for o in objects if o["shape"] == m[1]]
        assert len(matches) == 1, f"{question!r} asked about a shape that is not unique"
        return matches[0]["colour"], [tuple(matches[0]["box"])]
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        matches = [o for o in objects if o["colour"] == m[1]]
        assert len(matches) == 1, f"{question!r} asked about a colour that is not unique"
        return matches[0]["shape"], [tuple(matches[0]["box"])]
    if question == "How many objects are there?":
        counted = objects
    elif m := re.fullmatch(r"How many (\w+) objects are there\?", question):
        assert m[1] in COLOURS
        counted = [o for o in objects if o["colour"] == m[1]]
    elif m := re.fullmatch(r"How many (\w+) are there\?", question):
        counted = [o for o in objects if o["shape"] == SHAPE_OF_PLURAL[m[1]]]
    elif m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        obj = by_pair.get((m[1], m[2]))
        return ("yes", [tuple(obj["box"])]) if obj else ("no", [])
    elif m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        a, b = by_pair[(m[1], m[2])], by_pair[(m[4], m[5])]
        axis = 0 if m[3] in ("left of", "right of") else 1
        a_first = a["box"][axis] + a["box"][axis + 2] <= b["box"][axis]
        b_first = b["box"][axis] + b["box"][axis + 2] <= a["box"][axis]
        assert a_first != b_first, f"{question!r}: the boxes overlap along that axis, the answer is unclear"
        holds = a_first if m[3] in ("left of", "above") else b_first
        return ("yes" if holds else "no"), [tuple(a["box"]), tuple(b["box"])]
    else:
        raise AssertionError(f"unrecognised question {question!r}")
    return str(len(counted)), [tuple(o["box"]) for o in counted]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    kwargs = {"n": 25, "image_size": 48, "progress": False}
    first = _all_files(make_shapes(tmp_path / "a", seed=11, **kwargs).out_dir)
    second = _all_files(make_shapes(tmp_path / "b", seed=11, **kwargs).out_dir)
    assert list(first) == list(second)
    for name in ("scenes.json", "train/annotations.json", "train/llava.json", "train/vqa.parquet", "test/vqa.parquet"):
        assert name in first
    assert first == second
    other = _all_files(make_shapes(tmp_path / "c", seed=12, **kwargs).out_dir)
    assert other["scenes.json"] != first["scenes.json"]
    assert other["train/vqa.parquet"] != first["train/vqa.parquet"]
    assert sum(other[f"images/shapes_{i:06d}.png"] != first[f"images/shapes_{i:06d}.png"] for i in range(25)) >= 20


def test_a_scene_does_not_depend_on_n(tmp_path):
    small = make_shapes(tmp_path / "small", n=6, seed=5, progress=False)
    large = make_shapes(tmp_path / "large", n=15, seed=5, progress=False)
    for i in range(6):
        name = f"shapes_{i:06d}.png"
        assert (small.images_dir / name).read_bytes() == (large.images_dir / name).read_bytes()


def test_scenes_are_well_formed_and_match_their_images(dataset):
    out, summary, scenes, _ = dataset
    assert len(scenes) == summary.n_images == 80
    for image_id, scene in scenes.items():
        objects = scene["objects"]
        assert scene["n_objects"] == len(objects) >= 1
        assert len({(o["colour"], o["shape"]) for o in objects}) == len(objects), "(colour, shape) must be unique"
        image = Image.open(out / "images" / f"{image_id}.png")
        assert image.size == (SIZE, SIZE) and image.mode == "RGB"
        gray = np.asarray(image.convert("L"), dtype=np.float64)
        assert scene["laplacian_var"] == pytest.approx(ndimage.laplace(gray).var(), abs=1e-3)
        pixels = np.asarray(image).astype(int)
        for k, obj in enumerate(objects):
            x, y, w, h = obj["box"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SIZE and y + h <= SIZE
            cy = y + (2 * h) // 3 if obj["shape"] == "triangle" else y + h // 2  # a point inside every shape
            centre = pixels[cy, x + w // 2]
            assert np.abs(centre - np.array(COLOURS[obj["colour"]])).max() <= COLOUR_JITTER, (image_id, obj)
            for other in objects[k + 1 :]:
                ox, oy, ow, oh = other["box"]
                assert x + w <= ox or ox + ow <= x or y + h <= oy or oy + oh <= y, "objects overlap"


def test_the_shape_probe_reads_the_drawn_shape_not_the_record(dataset):
    out, _, scenes, _ = dataset
    read = {SIZE: [], 32: []}  # the scenes' own size, and the demo tokenizer's
    for size, results in read.items():
        for image_id, scene in scenes.items():
            image = Image.open(out / "images" / f"{image_id}.png").resize((size, size), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float64) / 255.0
            results += [classify_shape(array, o["colour"], o["box"], SIZE) == o["shape"] for o in scene["objects"]]
    # every object at full size; at 32 px a 5 px circle and diamond are a pixel apart (2 of 276 misread here)
    assert all(read[SIZE]) and np.mean(read[32]) >= 0.97, (np.mean(read[SIZE]), np.mean(read[32]))
    # the probe looks at pixels: an object painted over with the background is gone, a blob is no triangle
    image_id, scene = next(iter(scenes.items()))
    obj = scene["objects"][0]
    x, y, w, h = obj["box"]
    array = np.asarray(Image.open(out / "images" / f"{image_id}.png"), dtype=np.float64) / 255.0
    erased = array.copy()
    erased[y : y + h, x : x + w] = array[0, 0]
    assert classify_shape(erased, obj["colour"], obj["box"], SIZE) is None
    rng = np.random.default_rng(0)
    for shape in SHAPES:  # the same box and colour, each shape drawn in turn: the probe follows the drawing
        drawn = render_scene([ShapeObject(shape, obj["colour"], obj["size"], (x, y, w, h))], "plain", SIZE, rng)
        assert classify_shape(np.asarray(drawn) / 255.0, obj["colour"], obj["box"], SIZE) == shape


def test_answers_and_boxes_agree_with_the_scene(dataset):
    _, _, scenes, annotations = dataset
    seen_types = Counter()
    for split, records in annotations.items():
        assert records
        for record in records:
            scene = scenes[record["image_id"]]
            assert scene["split"] == split
            assert set(record) == {"image_id", "question", "answer", "bounding_box", "question_id", "question_type"}
            answer, boxes = _expected(record["question"], scene["objects"])
            assert record["answer"] == answer, record
            assert _boxes(record["bounding_box"]) == sorted(boxes), record
            object_boxes = {tuple(o["box"]) for o in scene["objects"]}
            assert all(tuple(b) in object_boxes for b in record["bounding_box"])
            assert record["answer"] == record["answer"].lower() and " " not in record["answer"]
            seen_types[record["question_type"]] += 1
    assert set(seen_types) == set(QUESTION_TYPES)
    ids = [r["question_id"] for rs in annotations.values() for r in rs]
    assert len(ids) == len(set(ids))


def test_splits_are_disjoint_by_image(dataset):
    _, summary, scenes, annotations = dataset
    train = {r["image_id"] for r in annotations["train"]}
    test = {r["image_id"] for r in annotations["test"]}
    assert not train & test
    assert {i for i, s in scenes.items() if s["split"] == "test"} >= test
    assert summary.n_test_images == sum(s["split"] == "test" for s in scenes.values()) == 16


def test_llava_json_mirrors_the_annotations(dataset):
    out, _, _, annotations = dataset
    for split, records in annotations.items():
        samples = _load(out / split / "llava.json")
        assert [s["id"] for s in samples] == [r["question_id"] for r in records]
        for sample, record in zip(samples, records):
            human, gpt = sample["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"] == f"<image>\n{record['question']}\n{SHORT_ANSWER_PROMPT}"
            assert gpt["value"] == record["answer"]
            assert sample["image"] == f"{record['image_id']}.png"
            assert (out / "images" / sample["image"]).is_file()


def test_parquet_loads_with_datasets_and_decodes_images(dataset):
    import datasets

    out, _, scenes, annotations = dataset
    for split, records in annotations.items():
        table = datasets.Dataset.from_parquet(str(out / split / "vqa.parquet"))
        assert isinstance(table.features["image"], datasets.Image)  # the schema metadata says so already
        table = table.cast_column("image", datasets.Image())
        assert len(table) == len(records)
        assert table.features["n_objects"].dtype == "int64"
        assert table.features["question_id"].dtype == "string"
        for row, record in zip(table, records):
            assert row["question_id"] == record["question_id"] and row["question"] == record["question"]
            assert row["answer"] == record["answer"] and row["question_type"] == record["question_type"]
            assert row["n_objects"] == scenes[record["image_id"]]["n_objects"]
        for row_index in (0, len(table) - 1):
            row, record = table[row_index], records[row_index]
            on_disk = Image.open(out / "images" / f"{record['image_id']}.png")
            assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(on_disk))
        raw = table.cast_column("image", datasets.Image(decode=False))[0]["image"]
        assert raw["path"] == f"{records[0]['image_id']}.png"
        assert Image.open(io.BytesIO(raw["bytes"])).size == (SIZE, SIZE)


def test_answers_are_balanced_and_the_blind_baseline_is_weak(tmp_path):
    summary = make_shapes(tmp_path / "d", n=400, seed=1, image_size=32, progress=False)
    train, test = _load(summary.annotations["train"]), _load(summary.annotations["test"])
    answers = {t: Counter(r["answer"] for r in train if r["question_type"] == t) for t in QUESTION_TYPES}
    for yes_no in ("presence", "position"):
        assert 0.4 <= answers[yes_no]["yes"] / sum(answers[yes_no].values()) <= 0.6
    assert set(answers["colour"]) == set(COLOURS)
    for kind in ("colour", "shape", "count"):
        assert max(answers[kind].values()) / sum(answers[kind].values()) < 0.4, answers[kind]
    assert blind_baseline_accuracy(train, test) < 0.45


def test_question_only_majority_and_blind_accuracy():
    train = [
        {"question_type": "presence", "question": "Is there a red circle?", "answer": "yes"},
        {"question_type": "presence", "question": "Is there a red circle?", "answer": "yes"},
        {"question_type": "presence", "question": "Is there a red  circle?", "answer": "No"},
        {"question_type": "presence", "question": "Is there a blue square?", "answer": "no"},
        {"question_type": "colour", "question": "What colour is the circle?", "answer": "red"},
        {"question_type": "colour", "question": "What colour is the circle?", "answer": "blue"},
    ]
    majority = question_only_majority(train)
    assert majority[template_key(train[0])] == "yes"  # 2 yes against 1 no (text is whitespace-normalised)
    assert majority["presence|*"] == "no"  # 2 yes, 2 no: a tie goes to the alphabetically first answer
    assert majority[template_key(train[4])] == "blue"  # tie again
    assert majority["*"] == "no"
    test = [
        {"question_type": "presence", "question": "Is there a red circle?", "answer": "yes"},  # template: yes, right
        {"question_type": "presence", "question": "Is there a blue square?", "answer": "yes"},  # template: no, wrong
        {"question_type": "presence", "question": "Is there a green cross?", "answer": "no"},  # unseen: type, right
        {"question_type": "colour", "question": "What colour is the square?", "answer": "red"},  # unseen: type, wrong
    ]
    assert [predict_blind(majority, r) for r in test] == ["yes", "no", "no", "blue"]
    assert blind_baseline_accuracy(train, test) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="empty"):
        blind_baseline_accuracy(train, [])
    with pytest.raises(ValueError, match="empty"):
        question_only_majority([])
    with pytest.raises(ValueError, match=r"train_annotations\[1\]"):
        question_only_majority([train[0], {"question": "x"}])


def test_textured_fraction_and_question_types_are_obeyed(tmp_path):
    plain = _load(make_shapes(tmp_path / "p", n=20, seed=2, textured_fraction=0.0, progress=False).scenes_path)
    assert {s["background"] for s in plain} == {"plain"}
    textured = _load(make_shapes(tmp_path / "t", n=30, seed=2, textured_fraction=1.0, progress=False).scenes_path)
    assert {s["background"] for s in textured} == {"stripes", "checker", "noise"}
    summary = make_shapes(tmp_path / "q", n=20, seed=2, question_types=["presence"], progress=False)
    records = _load(summary.annotations["train"]) + _load(summary.annotations["test"])
    assert {r["question_type"] for r in records} == {"presence"}


def test_object_scale_grows_every_object_and_keeps_them_apart(tmp_path):
    def sides(scale: float) -> dict[str, float]:
        scenes = _load(make_shapes(tmp_path / str(scale), n=40, seed=4, object_scale=scale, progress=False).scenes_path)
        by_size: dict[str, list[int]] = {}
        for scene in scenes:
            assert scene["n_objects"] == len(scene["objects"]) >= 1
            for obj in scene["objects"]:
                x, y, w, h = obj["box"]
                assert 0 < x and 0 < y and x + w < SIZE and y + h < SIZE
                by_size.setdefault(obj["size"], []).append(w)
        return {name: float(np.mean(values)) for name, values in by_size.items()}

    normal, doubled = sides(1.0), sides(2.0)
    for name in set(normal) & set(doubled):
        assert doubled[name] == pytest.approx(2 * normal[name], rel=0.15)


def test_rerun_replaces_an_earlier_output_but_not_a_foreign_directory(tmp_path):
    out = tmp_path / "data"
    make_shapes(out, n=12, seed=0, progress=False)
    make_shapes(out, n=5, seed=0, progress=False)
    assert len(list((out / "images").iterdir())) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".data")]  # no staging left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="out_dir"):
        make_shapes(foreign, n=3, seed=0, progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n": 0}, "n"),
        ({"seed": -1}, "seed"),
        ({"image_size": 31}, "image_size"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 9}, "max_objects"),
        ({"questions_per_image": 0}, "questions_per_image"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"textured_fraction": -0.1}, "textured_fraction"),
        ({"test_fraction": float("nan")}, "test_fraction"),
        ({"n": 2.5}, "n"),
        ({"question_types": ["colour", "size"]}, "question_types"),
        ({"object_scale": 0.0}, "object_scale"),
        ({"object_scale": 3.0}, "object_scale"),
        ({"object_scale": "big"}, "object_scale"),
    ],
)
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    arguments = {"n": 4, "seed": 0, "progress": False} | kwargs
    with pytest.raises(ValueError, match=rf"^{name} "):
        make_shapes(tmp_path / "x", **arguments)
    assert not (tmp_path / "x").exists()


def test_cli_writes_the_dataset_and_maps_bad_arguments_to_exit_code_2(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "make-shapes",
            "--out",
            str(out),
            "--n",
            "10",
            "--seed",
            "3",
            "--image-size",
            "32",
            "--max-objects",
            "3",
            "--questions-per-image",
            "2",
            "--test-fraction",
            "0.3",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "10 images (7 train, 3 test)" in capsys.readouterr().out
    scenes = _load(out / "scenes.json")
    assert max(s["n_objects"] for s in scenes) <= 3
    assert Image.open(out / "images" / "shapes_000000.png").size == (32, 32)
    assert len(_load(out / "train" / "annotations.json")) <= 7 * 2
    assert main(["make-shapes", "--out", str(tmp_path / "bad"), "--n", "5", "--seed", "0", "--image-size", "16"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert (
        main(["make-shapes", "--out", str(tmp_path / "bad"), "--n", "5", "--seed", "0", "--textured-fraction", "2"])
        == 2
    )
    assert "--textured-fraction" in capsys.readouterr().err
