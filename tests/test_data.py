"""Tokenizer training data: image folders, Q-DOVE annotations, HF datasets, corrupt files, the resumable sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from tokenizer.modeling.image_processing import DoveImageProcessor, ImageLoadError
from tokenizer.training.annotations import AnnotationError
from tokenizer.training.data import (
    HFImageDataset,
    ImageFolderDataset,
    QueryAnnotationDataset,
    ResumableSampler,
    SkippedExample,
    build_dataset,
    collate_examples,
)

SIZE = 32


def _rgb(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _truncated_png(path: Path) -> Path:
    _rgb(64, 64, seed=7).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _scene(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black image with one white filled rectangle at [x, y, w, h]."""
    image = Image.new("RGB", (width, height), (0, 0, 0))
    x, y, w, h = box
    ImageDraw.Draw(image).rectangle([x, y, x + w - 1, y + h - 1], fill=(255, 255, 255))
    return image


def _write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Images of every awkward mode, one nested, plus files that must be ignored."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / ".ipynb_checkpoints").mkdir()
    _rgb(seed=1).convert("L").save(root / "gray.png")
    rgba = _rgb(seed=2).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "rgba.png")
    _rgb(seed=3).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    Image.fromarray(np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30).save(root / "deep16.png")
    _rgb(seed=4).convert("CMYK").save(root / "sub" / "cmyk.jpg")
    _rgb(seed=5).save(root / "UPPER.JPEG")
    _rgb(seed=6).save(root / ".ipynb_checkpoints" / "hidden.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_loads_every_mode_as_rgb_in_sorted_order(folder: Path):
    dataset = ImageFolderDataset(folder, SIZE)
    names = [Path(p).relative_to(folder).as_posix() for p in dataset.paths]
    assert names == ["UPPER.JPEG", "deep16.png", "gray.png", "palette.gif", "rgba.png", "sub/cmyk.jpg"]
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["pixels"].shape == (3, SIZE, SIZE) and item["pixels"].dtype == torch.float32
        assert 0.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0
        assert item["query"] == "" and item["index"] == index
        assert torch.equal(item["relevance"], torch.ones(1, SIZE, SIZE))
        assert item["source"] == str(dataset.paths[index])
    # 16-bit is rescaled, not clipped to white: the gradient survives.
    deep = dataset[names.index("deep16.png")]["pixels"]
    assert deep.max() - deep.min() > 0.5 and deep.max() < 1.0
    # Gray input gives equal channels.
    gray = dataset[names.index("gray.png")]["pixels"]
    assert torch.allclose(gray[0], gray[1]) and torch.allclose(gray[1], gray[2])


def test_folder_matches_the_inference_processor(folder: Path):
    dataset = ImageFolderDataset(folder, SIZE)
    expected = DoveImageProcessor(SIZE)(str(dataset.paths[2]))["pixel_values"][0]
    assert torch.equal(dataset[2]["pixels"], expected)


def test_folder_errors_name_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderDataset(tmp_path / "nowhere", SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found under .*empty"):
        ImageFolderDataset(tmp_path / "empty", SIZE)


@pytest.fixture
def corrupt_folder(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    root.mkdir()
    for k in range(4):
        _rgb(seed=k).save(root / f"good{k}.png")
    _truncated_png(root / "bad_truncated.png")
    (root / "bad_text.png").write_text("this is not a png")
    return root


def test_corrupt_images_are_skipped_and_counted(corrupt_folder: Path, caplog):
    dataset = ImageFolderDataset(corrupt_folder, SIZE)
    assert len(dataset) == 6
    with caplog.at_level("WARNING", logger="tokenizer.training.data"):
        items = [dataset[i] for i in range(len(dataset))]
    skipped = [item for item in items if isinstance(item, SkippedExample)]
    assert sorted(Path(s.source).name for s in skipped) == ["bad_text.png", "bad_truncated.png"]
    assert "bad_truncated.png" in caplog.text and "bad_text.png" in caplog.text
    batch = collate_examples(items)
    assert batch["skipped"] == 2 and batch["consumed"] == 6
    assert batch["pixels"].shape == (4, 3, SIZE, SIZE)
    assert batch["relevance"].shape == (4, 1, SIZE, SIZE)
    assert batch["index"].dtype == torch.long and len(batch["queries"]) == 4
    assert all("good" in s for s in batch["sources"])


def test_strict_mode_raises_naming_the_file(corrupt_folder: Path):
    dataset = ImageFolderDataset(corrupt_folder, SIZE, strict=True)
    names = [p.name for p in dataset.paths]
    for bad in ("bad_text.png", "bad_truncated.png"):
        with pytest.raises(ImageLoadError, match=bad):
            dataset[names.index(bad)]


def test_all_corrupt_batch_is_an_empty_marker():
    batch = collate_examples([SkippedExample(0, "a.png", "bad"), None])
    assert batch["pixels"].shape[0] == 0 and batch["relevance"].shape[0] == 0
    assert batch["skipped"] == 2 and batch["queries"] == [] and batch["index"].numel() == 0
    assert batch["skipped_sources"] == ["a.png"]


def test_dataloader_workers_still_count_skips(corrupt_folder: Path):
    dataset = ImageFolderDataset(corrupt_folder, SIZE)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_examples)
    batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 2
    assert sum(b["pixels"].shape[0] for b in batches) == 4
    assert sum(b["consumed"] for b in batches) == 6


# --- Q-DOVE annotations -------------------------------------------------------------------------------


def test_box_mask_follows_the_object_through_resize_and_crop(tmp_path: Path):
    # 128x64 -> shorter side 32: resized to 64x32, then 16 px cut from the left and right.
    box = [70, 10, 30, 30]
    _scene(128, 64, tuple(box)).save(tmp_path / "wide.png")
    _write_json(
        tmp_path / "ann.json",
        [{"image_id": "wide", "question": "what is white?", "answer": "a box", "bounding_box": [box]}],
    )
    item = QueryAnnotationDataset(tmp_path / "ann.json", tmp_path, SIZE)[0]
    mask = item["relevance"][0].bool()
    bright = item["pixels"].mean(0) > 0.5
    assert item["query"] == "what is white?"
    assert bright.sum() > 50
    assert (bright & ~mask).sum() == 0, "every bright pixel must be inside the mapped box"
    assert (mask & bright).sum() >= 0.7 * mask.sum(), "the mask must sit on the object, not beside it"
    # The object starts at x = 70 * 0.5 - 16 = 19 and runs past the right edge of the crop.
    columns = mask.any(0).nonzero().flatten()
    rows = mask.any(1).nonzero().flatten()
    assert columns.min().item() == 19 and columns.max().item() == SIZE - 1
    assert rows.min().item() == 5 and rows.max().item() == 19


def test_boxes_outside_the_crop_are_clipped(tmp_path: Path):
    _scene(128, 64, (20, 0, 20, 20)).save(tmp_path / "wide.png")
    records = [
        # Resized x span [10, 20) minus the 16 px crop offset: only columns 0..3 remain.
        {"image_id": "wide.png", "question": "q", "answer": "a", "bounding_box": [[20, 0, 20, 20]]},
        # Entirely in the cropped-away strip: nothing of it is visible, so the whole image is relevant.
        {"image_id": "wide.png", "question": "q", "answer": "a", "bounding_box": [[0, 0, 20, 20]]},
    ]
    dataset = QueryAnnotationDataset(_write_json(tmp_path / "ann.json", records), tmp_path, SIZE)
    mask = dataset[0]["relevance"][0]
    assert mask[:10, :4].eq(1).all() and mask[:, 4:].eq(0).all() and mask[10:].eq(0).all()
    assert dataset[1]["relevance"].eq(1).all()


def test_empty_boxes_or_question_make_the_whole_image_relevant(tmp_path: Path):
    _rgb(64, 48).save(tmp_path / "a.jpg")
    records = [
        {"image_id": "a", "question": "anything?", "answer": "no", "bounding_box": []},
        {"image_id": "a", "question": "", "answer": "", "bounding_box": [[0, 0, 10, 10]]},
        {"image_id": "a", "question": "with box", "answer": "", "bounding_box": [[0, 0, 10, 10]]},
    ]
    dataset = QueryAnnotationDataset(_write_json(tmp_path / "ann.json", records), tmp_path, SIZE)
    assert dataset[0]["relevance"].eq(1).all() and dataset[0]["query"] == "anything?"
    assert dataset[1]["relevance"].eq(1).all() and dataset[1]["query"] == ""
    assert 0 < dataset[2]["relevance"].sum() < SIZE * SIZE


def test_image_ids_resolve_with_and_without_extension(tmp_path: Path):
    (tmp_path / "train").mkdir()
    _rgb().save(tmp_path / "train" / "0001.jpg")
    _rgb().save(tmp_path / "7.png")
    records = [
        {"image_id": "train/0001.jpg", "question": "", "bounding_box": []},
        {"image_id": "train/0001", "question": "", "bounding_box": []},
        {"image_id": 7, "question": "", "bounding_box": []},
    ]
    dataset = QueryAnnotationDataset(_write_json(tmp_path / "ann.json", records), tmp_path, SIZE)
    assert [Path(p).name for p in dataset.paths] == ["0001.jpg", "0001.jpg", "7.png"]


@pytest.mark.parametrize(
    "record, pattern",
    [
        ({"question": "q", "bounding_box": []}, r"record 1: missing field\(s\) \['image_id'\]"),
        ({"image_id": "a", "bounding_box": []}, r"record 1: missing field\(s\) \['question'\]"),
        ({"image_id": "a", "question": 3, "bounding_box": []}, r"record 1, field 'question'"),
        ({"image_id": ["a"], "question": "q", "bounding_box": []}, r"record 1, field 'image_id'"),
        ({"image_id": "a", "question": "q", "bounding_box": "box"}, r"record 1, field 'bounding_box'"),
        (
            {"image_id": "a", "question": "q", "bounding_box": [[1, 2, 3]]},
            r"record 1, field 'bounding_box'\[0\]: .*4 numbers",
        ),
        ({"image_id": "a", "question": "q", "bounding_box": [[1, 2, "3", 4]]}, r"record 1, field 'bounding_box'\[0\]"),
        (
            {"image_id": "a", "question": "q", "bounding_box": [[0, 0, 5, 5], [1, 2, -3, 4]]},
            r"record 1, field 'bounding_box'\[1\]: .*positive width and height",
        ),
        (
            {"image_id": "a", "question": "q", "bounding_box": [1, 2, 3, 4]},
            r"record 1, field 'bounding_box'.*single box",
        ),
        (
            {"image_id": "a", "question": "q", "bounding_box": [[60, 0, 10, 10]]},
            r"record 1, field 'bounding_box'\[0\]: .*outside the 64x48 image",
        ),
        (
            {"image_id": "missing", "question": "q", "bounding_box": []},
            r"record 1, field 'image_id': no image 'missing'",
        ),
        ("just a string", r"record 1: must be a JSON object"),
    ],
)
def test_bad_annotation_record_names_file_index_and_field(tmp_path: Path, record, pattern):
    _rgb(64, 48).save(tmp_path / "a.png")
    good = {"image_id": "a", "question": "q", "answer": "x", "bounding_box": [[0, 0, 8, 8]]}
    path = _write_json(tmp_path / "ann.json", [good, record])
    with pytest.raises(AnnotationError, match=pattern) as info:
        QueryAnnotationDataset(path, tmp_path, SIZE)
    assert str(path) in str(info.value)


def test_malformed_json_names_the_file_and_position(tmp_path: Path):
    path = tmp_path / "ann.json"
    path.write_text('[{"image_id": "a", "question": "q",\n "bounding_box": [}]')
    with pytest.raises(AnnotationError, match=r"ann\.json: not valid JSON \(line 2"):
        QueryAnnotationDataset(path, tmp_path, SIZE)
    path.write_text('{"image_id": "a"}')
    with pytest.raises(AnnotationError, match="top level must be a JSON list"):
        QueryAnnotationDataset(path, tmp_path, SIZE)


def test_corrupt_annotated_image_is_skipped_or_fatal(tmp_path: Path):
    _rgb().save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_text("nope")
    records = [
        {"image_id": "broken", "question": "q", "bounding_box": [[0, 0, 4, 4]]},
        {"image_id": "ok", "question": "q", "bounding_box": [[0, 0, 4, 4]]},
    ]
    path = _write_json(tmp_path / "ann.json", records)
    dataset = QueryAnnotationDataset(path, tmp_path, SIZE)
    batch = collate_examples([dataset[0], dataset[1]])
    assert batch["skipped"] == 1 and batch["queries"] == ["q"]
    with pytest.raises(ImageLoadError, match="broken.png"):
        QueryAnnotationDataset(path, tmp_path, SIZE, strict=True)


# --- Hugging Face datasets ---------------------------------------------------------------------------


def _hf_table(with_corrupt: bool = False):
    import datasets

    images = [_scene(64, 48, (8, 8, 16, 16)), _rgb(40, 40, seed=1)]
    columns = {
        "image": images,
        "question": ["where is the square?", None],
        "boxes": [[[8.0, 8.0, 16.0, 16.0]], []],
    }
    if with_corrupt:
        columns["image"] = images + [{"bytes": b"garbage bytes", "path": None}]
        columns["question"].append("q")
        columns["boxes"].append([])
    features = datasets.Features(
        image=datasets.Image(),
        question=datasets.Value("string"),
        boxes=datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
    )
    return datasets.Dataset.from_dict(columns, features=features)


def test_hf_dataset_saved_to_disk_loads(tmp_path: Path):
    import datasets

    table = _hf_table()
    table.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": table, "test": table.select([1])}).save_to_disk(str(tmp_path / "dict"))

    dataset = build_dataset(tmp_path / "single", image_size=SIZE, question_column="question", boxes_column="boxes")
    assert isinstance(dataset, HFImageDataset) and len(dataset) == 2
    first = dataset[0]
    assert first["pixels"].shape == (3, SIZE, SIZE) and first["query"] == "where is the square?"
    mask = first["relevance"][0].bool()
    bright = first["pixels"].mean(0) > 0.5
    assert bright.any() and (bright & ~mask).sum() == 0 and mask.sum() < SIZE * SIZE
    assert dataset[1]["query"] == "" and dataset[1]["relevance"].eq(1).all()

    test_split = build_dataset(tmp_path / "dict", image_size=SIZE, hf_split="test")
    assert len(test_split) == 1 and test_split[0]["query"] == ""
    with pytest.raises(ValueError, match=r"no split 'validation'.*\['test', 'train'\]"):
        build_dataset(tmp_path / "dict", image_size=SIZE, hf_split="validation")
    with pytest.raises(ValueError, match="no question column 'prompt'"):
        build_dataset(tmp_path / "single", image_size=SIZE, question_column="prompt")


def test_hf_parquet_and_corrupt_cells(tmp_path: Path):
    _hf_table(with_corrupt=True).to_parquet(str(tmp_path / "train.parquet"))
    dataset = build_dataset(
        tmp_path / "train.parquet", image_size=SIZE, question_column="question", cache_dir=tmp_path / "cache"
    )
    assert isinstance(dataset, HFImageDataset) and len(dataset) == 3
    batch = collate_examples([dataset[i] for i in range(3)])
    assert batch["skipped"] == 1 and batch["pixels"].shape[0] == 2
    assert "row 2" in batch["skipped_sources"][0]
    strict = build_dataset(tmp_path / "train.parquet", image_size=SIZE, strict=True, cache_dir=tmp_path / "cache")
    with pytest.raises(ImageLoadError, match="row 2"):
        strict[2]


def test_hf_bad_boxes_name_the_row(tmp_path: Path):
    import datasets

    table = datasets.Dataset.from_dict(
        {"image": [_rgb()], "boxes": [[[0.0, 0.0, -1.0, 4.0]]]},
        features=datasets.Features(
            image=datasets.Image(), boxes=datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
        ),
    )
    table.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(AnnotationError, match=r"row 0, column 'boxes'\[0\]: .*positive"):
        build_dataset(tmp_path / "ds", image_size=SIZE, boxes_column="boxes")


# --- build_dataset --------------------------------------------------------------------------------------


def test_build_dataset_picks_the_class_and_explains_missing_paths(tmp_path: Path, folder: Path):
    assert isinstance(build_dataset(folder, image_size=SIZE), ImageFolderDataset)
    _rgb(64, 48).save(folder / "extra.png")
    ann = _write_json(tmp_path / "ann.json", [{"image_id": "extra", "question": "q", "bounding_box": [[1, 1, 5, 5]]}])
    assert isinstance(build_dataset(folder, ann, image_size=SIZE), QueryAnnotationDataset)
    with pytest.raises(FileNotFoundError, match="data path not found: .*missing_dir.*hf://"):
        build_dataset(tmp_path / "missing_dir", image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*nope.json"):
        build_dataset(folder, tmp_path / "nope.json", image_size=SIZE)


# --- the resumable sampler ----------------------------------------------------------------------------


def test_sampler_order_is_a_fixed_function_of_seed_and_epoch():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(ResumableSampler(50, seed=4)) != first
    assert list(ResumableSampler(10, seed=3, shuffle=False)) == list(range(10))
    torch.manual_seed(123)
    np.random.seed(123)
    assert list(ResumableSampler(50, seed=3)) == first, "global RNG state must not matter"


def test_sampler_resumes_at_epoch_and_offset():
    full = ResumableSampler(23, seed=9)
    full.set_epoch(2)
    expected = list(full)
    interrupted = ResumableSampler(23, seed=9)
    interrupted.set_epoch(2)
    interrupted.advance(7)
    state = interrupted.state_dict()
    resumed = ResumableSampler(23, seed=9)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2 and len(resumed) == 16
    resumed.set_epoch(2)  # what a loop does at the top of the epoch: must keep the offset
    assert list(resumed) == expected[7:]
    resumed.set_epoch(3)
    assert len(resumed) == 23 and list(resumed) == full.indices_for_epoch(3)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(23, seed=10).load_state_dict(state)


def test_resumed_dataloader_sees_exactly_the_remaining_batches(corrupt_folder: Path):
    dataset = ImageFolderDataset(corrupt_folder, SIZE)

    def run(sampler, stop_after=None):
        seen = []
        for epoch in range(sampler.epoch, 2):
            sampler.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=2, sampler=sampler, collate_fn=collate_examples)
            for batch in loader:
                sampler.advance(batch["consumed"])
                seen.append((epoch, batch["index"].tolist(), batch["skipped"]))
                if stop_after is not None and len(seen) == stop_after:
                    return seen, sampler.state_dict()
        return seen, sampler.state_dict()

    uninterrupted, _ = run(ResumableSampler(len(dataset), seed=1))
    head, state = run(ResumableSampler(len(dataset), seed=1), stop_after=4)  # stops mid epoch 1
    resumed = ResumableSampler(len(dataset), seed=1)
    resumed.load_state_dict(state)
    tail, _ = run(resumed)
    assert head + tail == uninterrupted
    assert len(uninterrupted) == 6 and sum(s for *_, s in uninterrupted) == 4


def test_sampler_shards_by_rank_with_equal_lengths():
    shards = [ResumableSampler(10, seed=0, num_replicas=3, rank=r) for r in range(3)]
    lists = [list(s) for s in shards]
    assert all(len(x) == 4 for x in lists)
    assert set().union(*map(set, lists)) == set(range(10))
    order = shards[0].epoch_order(0)
    assert [lists[i % 3][i // 3] for i in range(12)] == order
    dropped = [list(ResumableSampler(10, seed=0, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert all(len(x) == 3 for x in dropped) and len(set().union(*map(set, dropped))) == 9
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(10, num_replicas=2, rank=2)


def test_sampler_resume_on_a_different_world_size_keeps_the_global_position():
    two = [ResumableSampler(40, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for sampler in two:
        sampler.advance(6)  # 12 examples consumed globally
    four = ResumableSampler(40, seed=5, num_replicas=4, rank=1)
    four.load_state_dict(two[0].state_dict())
    assert four.offset == 3
    assert list(four) == four.epoch_order(0)[12:][1::4]


@pytest.mark.parametrize("climb", [True, False])
def test_an_image_id_outside_the_image_folder_is_refused_unless_allowed(tmp_path: Path, climb):
    root = tmp_path / "images"
    root.mkdir()
    _rgb(seed=1).save(root / "inside.png")
    _rgb(seed=2).save(tmp_path / "secret.png")
    outside = "../secret.png" if climb else str(tmp_path / "secret.png")
    box = [[1, 1, 8, 8]]
    records = [
        {"image_id": "inside", "question": "q", "bounding_box": box},
        {"image_id": outside, "question": "q", "bounding_box": box},
    ]
    path = _write_json(tmp_path / "ann.json", records)
    with pytest.raises(AnnotationError, match=rf"ann\.json: record 1, field 'image_id'.*{outside!r}.*outside the image"):
        QueryAnnotationDataset(path, root, SIZE)
    with pytest.raises(AnnotationError, match="record 1"):
        build_dataset(root, path, image_size=SIZE)
    allowed = build_dataset(root, path, image_size=SIZE, allow_outside_root=True)
    assert allowed[1]["source"] == str(root / outside)  # an absolute id replaces the root when joined
