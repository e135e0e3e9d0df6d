"""LLaVA conversation JSON + an image folder -> training samples, and the collator that batches them.

The file is LLaVA's: a JSON list (or JSON Lines) of records

    {"id": "...", "image": "relative/path.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                 {"from": "gpt", "value": "..."}, ...]}

A record without `"image"` is a text-only sample. Every record is checked when the dataset is built
(turn structure, `<image>` placeholders against images, the image file's existence), so a bad record
stops the run before the first step, with its id in the message, instead of crashing some rank hours
in. `drop_unreadable_images` decodes every image once before training, so an undecodable file is
skipped and counted (or, strict, stops the run) up front rather than ending the run when its batch is
drawn. Tokenization and per-step image decoding stay lazy, per item.

The Q-DOVE query of an image sample is its first human turn as `conversation.tower_query` reduces it
(placeholder and answer-format instructions removed), the same rule evaluation uses: the question,
never an answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from tokenizer import DoveImageProcessor, ImageLoadError, load_image
from tokenizer.training.annotations import escapes_root
from tokenizer.training.data import SKIPPED_WARN_SHARE

from .constants import IGNORE_INDEX, IMAGE_TOKEN
from .conversation import (
    ConversationError,
    parse_turns,
    resolve_template,
    strip_image_tokens,
    tokenize_conversation,
    tower_query,
)

logger = logging.getLogger(__name__)


class LlavaDataError(ValueError):
    """A record or file the dataset cannot use; the message names the file and the sample id."""


@dataclass(frozen=True)
class LlavaRecord:
    """One validated record. `image` is the resolved path (None for text-only samples)."""

    index: int
    sample_id: str
    conversations: list[dict[str, Any]]
    image: Path | None
    query: str | None


def read_llava_json(path: str | os.PathLike) -> list[Any]:
    """The records of a LLaVA JSON list or JSON Lines file, with the file named in any parse error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LLaVA data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise LlavaDataError(f"{path}: not valid JSON ({err})") from err
        return records
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise LlavaDataError(f"{path}: line {line_number} is not valid JSON ({err})") from err
    if not records:
        raise LlavaDataError(f"{path}: no records (expected a JSON list or JSON Lines of LLaVA conversations)")
    return records


def validate_record(
    raw: Any, index: int, image_folder: Path | None, source: Path, allow_outside_root: bool = False
) -> LlavaRecord:
    """Check one raw record and resolve its image path; errors name the file and the sample id.

    An `image` that is absolute or climbs out of `image_folder` with `..` is refused unless
    `allow_outside_root`."""
    if not isinstance(raw, Mapping):
        raise LlavaDataError(f"{source}: record {index} is not an object (got {type(raw).__name__})")
    sample_id = str(raw.get("id", f"#{index}"))
    where = f"{source}: sample {sample_id!r}"
    if "conversations" not in raw:
        raise LlavaDataError(f"{where} has no 'conversations'")
    try:
        turns = parse_turns(raw["conversations"], sample_id)
    except ConversationError as err:
        raise LlavaDataError(f"{source}: {err}") from err
    placeholders = sum(turn.text.count(IMAGE_TOKEN) for turn in turns)
    if any(IMAGE_TOKEN in turn.text for turn in turns if turn.role == "assistant"):
        raise LlavaDataError(f"{where}: {IMAGE_TOKEN} appears in an answer")
    image_name = raw.get("image")
    if image_name is None:
        if placeholders:
            raise LlavaDataError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholder(s) but the sample has no image")
        return LlavaRecord(index, sample_id, list(raw["conversations"]), None, None)
    if not isinstance(image_name, str) or not image_name:
        raise LlavaDataError(
            f"{where}: 'image' must be one relative file name (a non-empty string), got {image_name!r}"
        )
    if placeholders == 0:
        raise LlavaDataError(f"{where}: an image sample whose conversation has no {IMAGE_TOKEN} placeholder")
    if placeholders > 1:
        raise LlavaDataError(f"{where}: {placeholders} {IMAGE_TOKEN} placeholders but only one image")
    if image_folder is None:
        raise LlavaDataError(f"{where} has an image but no image folder was given")
    if not allow_outside_root and escapes_root(image_name):
        raise LlavaDataError(
            f"{source}: record {index} (sample {sample_id!r}): image {image_name!r} points outside the image folder "
            f"{image_folder} (an absolute path or one climbing with '..'); pass allow_outside_root=True "
            f"(--allow-paths-outside-root) to allow it"
        )
    image_path = image_folder / image_name
    if not image_path.is_file():
        raise LlavaDataError(f"{where}: image file not found: {image_path}")
    query = tower_query(turns[0].text) or None
    return LlavaRecord(index, sample_id, list(raw["conversations"]), image_path, query)


class LlavaConversationDataset(Dataset):
    """Items: `input_ids` [T], `labels` [T] (IGNORE_INDEX but on answers), `pixel_values` [3,S,S] or None,
    `query` (str or None) and `id`.

    `template` is a name from `conversation.TEMPLATES` (`plain` for stage 1). `use_query=False` drops the
    queries (the tower would ignore them anyway; this keeps batches honest about what the tower reads).

    `cache_items=True` keeps each sample's tokenised conversation and preprocessed pixels in memory once
    made: every epoch would otherwise render the chat template, tokenise and decode the image again, which
    on small images (the CPU demo) is a third of a training step. The pixels cost 3*S*S*4 bytes a sample,
    so this is for small images and small datasets; with data-loader workers each worker keeps its own.
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: DoveImageProcessor | None,
        image_folder: str | os.PathLike | None = None,
        template: str = "auto",
        use_query: bool = True,
        allow_outside_root: bool = False,
        cache_items: bool = False,
    ) -> None:
        self.data_path = Path(data_path)
        self.cache_items = cache_items
        self._texts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pixels: dict[str, torch.Tensor] = {}
        self.image_folder = Path(image_folder) if image_folder is not None else None
        if self.image_folder is not None and not self.image_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_folder}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = resolve_template(tokenizer, template)
        self.use_query = use_query
        raw_records = read_llava_json(self.data_path)
        if not isinstance(raw_records, list) or not raw_records:
            raise LlavaDataError(f"{self.data_path}: expected a non-empty JSON list of records")
        self.records = [
            validate_record(raw, i, self.image_folder, self.data_path, allow_outside_root)
            for i, raw in enumerate(raw_records)
        ]
        seen: dict[str, int] = {}
        for record in self.records:
            if record.sample_id in seen:
                raise LlavaDataError(
                    f"{self.data_path}: sample id {record.sample_id!r} is used by records {seen[record.sample_id]} "
                    f"and {record.index}"
                )
            seen[record.sample_id] = record.index
        if any(r.image is not None for r in self.records) and image_processor is None:
            raise ValueError("the data has image samples but no image processor was given")
        self.dropped: list[LlavaRecord] = []

    def drop_unreadable_images(self, strict: bool = False, num_workers: int = 0) -> list[LlavaRecord]:
        """Decode every sample's image once and drop the samples whose image cannot be decoded.

        Returns the dropped records (each named in a warning). With `strict`, the first unreadable image
        raises `LlavaDataError` naming its sample instead. Raises when no sample is left. Run before
        training: an image that fails only when its batch is drawn would end the run there.
        """
        indices = [i for i, record in enumerate(self.records) if record.image is not None]
        loader = DataLoader(_ImageCheck(self.records, indices), batch_size=None, num_workers=num_workers)
        bad: dict[int, str] = {}
        for position, error in loader:
            if error is None:
                continue
            record = self.records[position]
            message = f"{self.data_path}: sample {record.sample_id!r} (record {record.index}): {error}"
            if strict:
                raise LlavaDataError(message)
            logger.warning("skipping %s", message)
            bad[position] = error
        if not bad:
            return []
        self.dropped = [self.records[i] for i in sorted(bad)]
        self.records = [record for i, record in enumerate(self.records) if i not in bad]
        total = len(indices)
        if not self.records:
            raise LlavaDataError(
                f"{self.data_path}: no usable sample: all {total} images under {self.image_folder} are unreadable"
            )
        share = len(bad) / total
        (logger.warning if share > SKIPPED_WARN_SHARE else logger.info)(
            "%s: skipped %d of %d image samples whose image is unreadable (%.0f%%)%s",
            self.data_path, len(bad), total, 100 * share, "; check the data" if share > SKIPPED_WARN_SHARE else "",
        )  # fmt: skip
        return self.dropped

    def __len__(self) -> int:
        return len(self.records)

    def has_image(self, index: int) -> bool:
        return self.records[index].image is not None

    def query(self, index: int) -> str | None:
        return self.records[index].query if self.use_query else None

    def load_pixels(self, index: int) -> torch.Tensor:
        """The sample's image as [3,S,S] in [0,1]; an unreadable file names the sample."""
        record = self.records[index]
        if record.sample_id in self._pixels:
            return self._pixels[record.sample_id]
        try:
            image = load_image(record.image)
        except ImageLoadError as err:
            raise LlavaDataError(f"{self.data_path}: sample {record.sample_id!r}: {err}") from err
        pixels = self.image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]
        if self.cache_items:
            self._pixels[record.sample_id] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        num_images = 1 if record.image is not None else 0
        if record.sample_id in self._texts:
            input_ids, labels = self._texts[record.sample_id]
        else:
            try:
                input_ids, labels = tokenize_conversation(
                    record.conversations, self.tokenizer, self.template, num_images=num_images,
                    sample_id=record.sample_id,
                )  # fmt: skip
            except ConversationError as err:
                raise LlavaDataError(f"{self.data_path}: {err}") from err
            if self.cache_items:
                self._texts[record.sample_id] = (input_ids, labels)
        return {
            "id": record.sample_id,
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.load_pixels(index) if num_images else None,
            "query": self.query(index) if num_images else None,
        }

    def text_length_estimates(self) -> list[int]:
        """Token counts of each sample's turn texts (placeholders excluded), in one batched tokenizer call.

        The template adds a nearly constant number of tokens per turn, so these order samples by length
        almost exactly as the rendered text would, at a fraction of the cost of rendering every sample.
        """
        texts = [
            "\n".join(strip_image_tokens(t.get("value", t.get("content", ""))) for t in r.conversations)
            for r in self.records
        ]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def fingerprint(self) -> str:
        """What the visual lengths depend on besides the tower: the data file's bytes, the image folder
        and which samples carry which queries."""
        digest = hashlib.sha256()
        with open(self.data_path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(str(self.image_folder.resolve() if self.image_folder else "").encode())
        digest.update(b"query" if self.use_query else b"no-query")
        if self.dropped:  # lengths are stored per remaining sample
            digest.update(("dropped:" + ",".join(str(r.index) for r in self.dropped)).encode())
        return digest.hexdigest()


class _ImageCheck(Dataset):
    """(position, error message or None) for each image sample: DataLoader workers decode in parallel."""

    def __init__(self, records: Sequence[LlavaRecord], indices: Sequence[int]) -> None:
        self.records = records
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[int, str | None]:
        index = self.indices[position]
        try:
            load_image(self.records[index].image)
        except ImageLoadError as err:
            return index, str(err)
        return index, None


@dataclass
class LlavaCollator:
    """Right-pads a list of dataset items into the batch `DoveLlavaForCausalLM.forward` takes.

    `images` holds only the image samples' pixels, in batch order, which is the order of their `<image>`
    placeholders; `queries` is aligned with `images`. Padding positions get `pad_token_id` in
    `input_ids`, 0 in `attention_mask` and IGNORE_INDEX in `labels`.
    """

    pad_token_id: int

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        width = max(item["input_ids"].shape[0] for item in items)
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            length = item["input_ids"].shape[0]
            input_ids[row, :length] = item["input_ids"]
            labels[row, :length] = item["labels"]
            attention_mask[row, :length] = 1
        with_image = [item for item in items if item.get("pixel_values") is not None]
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "sample_ids": [item.get("id") for item in items],
        }
        if with_image:
            batch["images"] = torch.stack([item["pixel_values"] for item in with_image])
            queries = [item.get("query") for item in with_image]
            if any(q for q in queries):
                batch["queries"] = queries
        return batch


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for right padding: the pad token, else EOS (masked out by the attention mask anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the LLM tokenizer has neither a pad nor an EOS token to pad batches with")
