"""LLaVA conversation JSON + image folder -> samples, the collator, and the errors bad records raise."""

from __future__ import annotations

import json

import pytest
import torch
from llava_workspace import build_workspace
from transformers import AutoTokenizer

from llava_adapter import IGNORE_INDEX, DoveLlavaForCausalLM, add_image_token
from llava_adapter.conversation import tower_query
from llava_adapter.data import LlavaCollator, LlavaConversationDataset, LlavaDataError, pad_token_id
from tokenizer import DoveImageProcessor


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("llava_data"), n_images=6)


@pytest.fixture(scope="module")
def tokenizer(workspace):
    tok = AutoTokenizer.from_pretrained(workspace.llm_dir)
    add_image_token(tok)
    return tok


@pytest.fixture(scope="module")
def processor():
    return DoveImageProcessor(64)


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def mixed_records(workspace):
    """The shapes records plus one text-only conversation in the middle."""
    records = workspace.records()[:5]
    text_only = {
        "id": "text_only_0",
        "conversations": [
            {"from": "human", "value": "Which colour do you get by mixing blue and yellow?"},
            {"from": "gpt", "value": "green"},
        ],
    }
    return records[:2] + [text_only] + records[2:]


def test_items_hold_ids_labels_pixels_and_the_question_as_query(workspace, tokenizer, processor):
    dataset = LlavaConversationDataset(workspace.train_json, tokenizer, processor, workspace.images, template="auto")
    records = workspace.records()
    assert len(dataset) == len(records)
    for index in (0, len(records) - 1):
        item, record = dataset[index], records[index]
        human, answer = (turn["value"] for turn in record["conversations"])
        assert item["id"] == record["id"]
        assert item["input_ids"].shape == item["labels"].shape
        targets = item["labels"][item["labels"] != IGNORE_INDEX]
        assert tokenizer.decode(targets, skip_special_tokens=True).strip() == answer
        assert item["pixel_values"].shape == (3, 64, 64)
        assert 0.0 <= item["pixel_values"].min() and item["pixel_values"].max() <= 1.0
        # The query is the human turn's question (no placeholder, no answer-format instruction), never the answer.
        assert item["query"] == tower_query(human)
        assert "<image>" not in item["query"] and item["query"] in " ".join(human.split())
        assert "single word" not in item["query"]


def test_a_cached_dataset_serves_the_same_items_without_reading_the_files_again(
    workspace, tokenizer, processor, tmp_path
):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(workspace.images, images)
    cached = LlavaConversationDataset(workspace.train_json, tokenizer, processor, images, cache_items=True)
    plain = LlavaConversationDataset(workspace.train_json, tokenizer, processor, images)
    first = cached[0]
    for path in images.iterdir():
        path.unlink()
    again = cached[0]
    assert torch.equal(again["input_ids"], first["input_ids"]) and torch.equal(again["labels"], first["labels"])
    assert torch.equal(again["pixel_values"], first["pixel_values"]) and again["query"] == first["query"]
    with pytest.raises(LlavaDataError, match=first["id"]):
        plain[0]


def test_plain_template_keeps_only_image_and_answer(workspace, tokenizer, processor):
    dataset = LlavaConversationDataset(workspace.train_json, tokenizer, processor, workspace.images, template="plain")
    item = dataset[0]
    answer = workspace.records()[0]["conversations"][1]["value"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (item["input_ids"] == image_id).sum() == 1
    prompt = item["input_ids"][item["labels"] == IGNORE_INDEX]
    assert set(prompt.tolist()) <= {image_id, tokenizer.bos_token_id}
    targets = tokenizer.decode(item["labels"][item["labels"] != IGNORE_INDEX], skip_special_tokens=True)
    assert targets == answer + "\n"  # LLaVA's plain separator ends the answer
    assert item["query"]  # the tower still reads the question, though the LLM does not see it


def test_jsonl_gives_the_same_samples(workspace, tokenizer, processor, tmp_path):
    records = workspace.records()[:4]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    from_list = LlavaConversationDataset(
        write_json(tmp_path / "data.json", records), tokenizer, processor, workspace.images
    )
    from_lines = LlavaConversationDataset(jsonl, tokenizer, processor, workspace.images)
    for a, b in zip(from_list, from_lines):
        assert a["id"] == b["id"] and torch.equal(a["input_ids"], b["input_ids"])


def test_collator_pads_right_and_aligns_images_with_image_samples(workspace, tokenizer, processor, tmp_path):
    data = write_json(tmp_path / "mixed.json", mixed_records(workspace))
    dataset = LlavaConversationDataset(data, tokenizer, processor, workspace.images)
    items = [dataset[i] for i in range(len(dataset))]
    assert items[2]["pixel_values"] is None and items[2]["query"] is None
    batch = LlavaCollator(pad_token_id(tokenizer))(items)
    lengths = [item["input_ids"].shape[0] for item in items]
    assert batch["input_ids"].shape == (len(items), max(lengths))
    for row, item in enumerate(items):
        n = lengths[row]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    with_image = [item for item in items if item["pixel_values"] is not None]
    assert batch["images"].shape == (len(with_image), 3, 64, 64)
    assert batch["queries"] == [item["query"] for item in with_image]
    assert batch["sample_ids"] == [item["id"] for item in items]
    for k, item in enumerate(with_image):
        assert torch.equal(batch["images"][k], item["pixel_values"])


def test_a_mixed_batch_trains_through_the_model(workspace, tokenizer, processor, tmp_path):
    """Text-only and image samples in one batch: the model pairs images with placeholders, and the only
    targets it trains on are the answer tokens the collator marked."""
    data = write_json(tmp_path / "mixed.json", mixed_records(workspace))
    dataset = LlavaConversationDataset(data, tokenizer, processor, workspace.images)
    batch = LlavaCollator(pad_token_id(tokenizer))([dataset[i] for i in range(len(dataset))])
    model = DoveLlavaForCausalLM.from_components(workspace.llm_dir, workspace.tower_dir, tokenizer=tokenizer).eval()
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)
    assert len(out.visual_lengths) == batch["images"].shape[0]
    assert (out.labels != IGNORE_INDEX).sum(dim=1).tolist() == (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    assert out.attention_mask.sum().item() == batch["attention_mask"].sum().item() + sum(
        n - 1 for n in out.visual_lengths
    )


def broken(workspace, field, value, index=1):
    records = workspace.records()[:3]
    record = dict(records[index])
    if field == "conversations.0":
        record["conversations"] = [dict(record["conversations"][0], value=value), record["conversations"][1]]
    else:
        record[field] = value
    records[index] = record
    return records, record["id"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image", "no_such_image.png", "image file not found"),
        ("conversations.0", "What shape is the red object?", "no <image> placeholder"),
        ("conversations.0", "<image>\n<image>\nWhat is it?", "2 <image> placeholders but only one image"),
        ("conversations", [], "empty conversation"),
        ("image", ["a.png", "b.png"], "must be one relative file name"),
    ],
    ids=["missing-image", "no-placeholder", "too-many-placeholders", "empty-conversation", "image-list"],
)
def test_bad_records_are_refused_with_their_id(workspace, tokenizer, processor, tmp_path, field, value, message):
    records, sample_id = broken(workspace, field, value)
    data = write_json(tmp_path / "bad.json", records)
    with pytest.raises(LlavaDataError) as info:
        LlavaConversationDataset(data, tokenizer, processor, workspace.images)
    assert message in str(info.value)
    assert repr(sample_id) in str(info.value) and str(data) in str(info.value)


def test_a_placeholder_in_a_text_only_sample_is_refused(workspace, tokenizer, processor, tmp_path):
    records, sample_id = broken(workspace, "image", None)
    data = write_json(tmp_path / "bad.json", records)
    with pytest.raises(LlavaDataError, match=f"{sample_id!r}.*placeholder.*no image"):
        LlavaConversationDataset(data, tokenizer, processor, workspace.images)


def test_duplicate_ids_and_malformed_files_are_named(workspace, tokenizer, processor, tmp_path):
    records = workspace.records()[:2]
    duplicate = write_json(tmp_path / "dup.json", [records[0], records[0]])
    with pytest.raises(LlavaDataError, match=f"{records[0]['id']!r} is used by records 0 and 1"):
        LlavaConversationDataset(duplicate, tokenizer, processor, workspace.images)
    malformed = tmp_path / "malformed.json"
    malformed.write_text('[{"id": "a", ')
    with pytest.raises(LlavaDataError, match="malformed.json: not valid JSON"):
        LlavaConversationDataset(malformed, tokenizer, processor, workspace.images)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        LlavaConversationDataset(tmp_path / "missing.json", tokenizer, processor, workspace.images)


def test_an_unreadable_image_names_the_sample_when_loaded(workspace, tokenizer, processor, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    record = workspace.records()[0]
    (folder / record["image"]).write_bytes(b"not a png")
    dataset = LlavaConversationDataset(write_json(tmp_path / "d.json", [record]), tokenizer, processor, folder)
    with pytest.raises(LlavaDataError, match=f"{record['id']!r}.*not an image file"):
        dataset[0]


@pytest.mark.parametrize("climb", [True, False])
def test_an_image_outside_the_image_folder_is_refused_unless_allowed(workspace, tokenizer, processor, tmp_path, climb):
    import shutil

    folder = tmp_path / "images"
    folder.mkdir()
    records = workspace.records()[:2]
    shutil.copy(workspace.images / records[0]["image"], folder / records[0]["image"])
    shutil.copy(workspace.images / records[1]["image"], tmp_path / "elsewhere.png")
    outside = "../elsewhere.png" if climb else str(tmp_path / "elsewhere.png")
    records[1] = dict(records[1], image=outside)
    data = write_json(tmp_path / "d.json", records)
    with pytest.raises(LlavaDataError, match=rf"record 1 \(sample {records[1]['id']!r}\): image {outside!r}.*outside"):
        LlavaConversationDataset(data, tokenizer, processor, folder)
    dataset = LlavaConversationDataset(data, tokenizer, processor, folder, allow_outside_root=True)
    assert dataset[1]["pixel_values"].shape == (3, 64, 64)
