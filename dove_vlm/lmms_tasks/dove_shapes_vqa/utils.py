"""lmms-eval task code for the shapes VQA data (`dove_shapes_vqa`, `dove_shapes_vqa_mc`).

Where the data comes from: `$DOVE_SHAPES_DIR/test/vqa.parquet`, the layout `dove-vlm make-shapes --out DIR`
writes. An environment variable rather than a path in the YAML, because the YAML ships with the code
while the data lives wherever the user generated it (lmms-eval's own `vstat` task reads its data location
the same way).

Scoring: lmms-eval's VQA answer normalisation (`EvalAIAnswerProcessor`: case, punctuation, number words,
articles) on both sides, then exact match against the single ground-truth answer.

Token accounting: the `dove_llava` model attaches each request's visual token count (and any per-sample
error) to its output as lmms-eval `TokenCounts`; the evaluator stores them on the request instances. The
task class reads them back after filtering and adds them to each sample's metrics, so the results JSON
carries `visual_tokens_mean/median/max` next to the accuracy and the samples log carries each count.
A model that reports no visual tokens (any other lmms-eval model) gets `null` counts, never made-up ones.
"""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from lmms_eval.api.task import ConfigurableTask
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from loguru import logger as eval_logger
from PIL import Image

from dove_vlm.shapes import COLOURS, MAX_OBJECTS_LIMIT, SHAPES
from tokenizer.modeling.image_processing import ImageLoadError, load_image, to_rgb

SHAPES_DIR_ENV = "DOVE_SHAPES_DIR"
PARQUET_NAME = "vqa.parquet"
IMAGES_DIR = "images"

_normalise = EvalAIAnswerProcessor()


# ----------------------------------------------------------------------------------------------- data


def shapes_dir() -> Path:
    """The make-shapes output directory named by $DOVE_SHAPES_DIR; a clear error when it is unusable."""
    value = os.environ.get(SHAPES_DIR_ENV, "").strip()
    if not value:
        raise FileNotFoundError(
            f"${SHAPES_DIR_ENV} is not set: point it at a `dove-vlm make-shapes --out DIR` directory "
            f"(the task reads DIR/test/{PARQUET_NAME})"
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"${SHAPES_DIR_ENV}={value} is not a directory")
    return root


def read_split(root: Path, split: str) -> datasets.Dataset:
    """One split's parquet as an in-memory dataset whose images stay undecoded ({bytes, path}).

    Undecoded, so that one unreadable image fails only its own sample (in `doc_to_visual`) rather than the
    whole dataset load; relative image paths are made absolute against DIR/images so a row needs nothing
    else to be found.
    """
    path = root / split / PARQUET_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {split} split: {path} does not exist (${SHAPES_DIR_ENV}={root})")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path} is not a readable parquet file: {err}") from err
    missing = {"question_id", "image", "question", "answer"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path} lacks the column(s) {sorted(missing)}")
    table = _absolute_image_paths(table, root / IMAGES_DIR)
    dataset = datasets.Dataset(table)
    return dataset.cast_column("image", datasets.Image(decode=False))


def _absolute_image_paths(table: pa.Table, images_dir: Path) -> pa.Table:
    column = table.column("image").combine_chunks()
    paths = column.field("path")
    prefix = pa.scalar(f"{images_dir}{os.sep}")
    relative = pc.invert(pc.or_kleene(pc.starts_with(paths, os.sep), pc.is_null(paths)))
    joined = pc.if_else(relative, pc.binary_join_element_wise(prefix, paths, ""), paths)
    rebuilt = pa.StructArray.from_arrays(
        [column.field("bytes"), joined], names=["bytes", "path"], mask=column.is_null()
    )
    return table.set_column(table.column_names.index("image"), "image", rebuilt)


class DoveShapesVQATask(ConfigurableTask):
    """The YAML task plus two things YAML cannot say: where the data is, and how each sample's visual
    token count reaches its metrics."""

    def __init__(self, *args: Any, config: dict | None = None, **kwargs: Any) -> None:
        if config is not None:
            config = {key: value for key, value in config.items() if key != "class"}
        self._token_records: dict[int, dict] = {}
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        root = shapes_dir()
        splits = {self.config.test_split}
        if self.config.training_split:
            splits.add(self.config.training_split)
        self.dataset = datasets.DatasetDict({split: read_split(root, split) for split in sorted(splits)})
        # Images are an (undecoded) Image feature, so lmms-eval keeps them out of the samples log.
        self.dataset_no_image = datasets.DatasetDict(
            {split: ds.remove_columns("image") for split, ds in self.dataset.items()}
        )
        eval_logger.info(f"{self.config.task}: {len(self.dataset[self.config.test_split])} questions from {root}")

    def apply_filters(self) -> None:
        super().apply_filters()
        question_ids = self.eval_docs["question_id"]
        records: dict[int, dict] = {}
        for instance in self.instances:
            counts = instance.token_counts[0] if instance.token_counts else None
            record = counts.to_dict() if counts is not None else {}
            # Several requests per document (multiple choice): the image and question are the same for all
            # of them, so the first is representative; an error in any of them is kept.
            kept = records.setdefault(int(instance.doc_id), dict(record))
            if "error" in record and "error" not in kept:
                kept["error"] = record["error"]
        self._token_records = {question_ids[doc_id]: record for doc_id, record in records.items()}

    def process_results(self, doc: Mapping, results: Sequence, full_docs: Any = None) -> dict:
        metrics = dict(super().process_results(doc, results, full_docs=full_docs))
        record = self._token_records.get(doc["question_id"], {})
        visual_tokens = record.get("visual_tokens")
        for name in ("visual_tokens_mean", "visual_tokens_median", "visual_tokens_max"):
            metrics[name] = visual_tokens
        if record.get("error"):
            metrics["error"] = record["error"]
        return metrics


# -------------------------------------------------------------------------------------------- prompts


def doc_to_visual(doc: Mapping) -> list[Image.Image]:
    """The sample's image, decoded now; an `ImageLoadError` naming the question when it cannot be."""
    image = doc.get("image")
    question_id = doc.get("question_id", "?")
    if isinstance(image, Image.Image):
        return [to_rgb(image)]
    if not isinstance(image, Mapping):
        raise ImageLoadError(f"question {question_id}: no image")
    data, path = image.get("bytes"), image.get("path")
    if data:
        return [load_image(data, f"question {question_id}: image {path or '(embedded)'}")]
    if path:
        try:
            return [load_image(path)]
        except ImageLoadError as err:
            raise ImageLoadError(f"question {question_id}: {err}") from err
    raise ImageLoadError(f"question {question_id}: the image has neither bytes nor a path")


def doc_to_text(doc: Mapping, lmms_eval_specific_kwargs: Mapping | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    question = str(doc.get("question") or "").strip()
    return f"{kwargs.get('pre_prompt', '')}{question}{kwargs.get('post_prompt', '')}"


# ------------------------------------------------------------------------------------------- scoring


def normalise_answer(text: str) -> str:
    """lmms-eval's VQA normalisation (the EvalAI rules VQAv2 and TextVQA are scored with)."""
    return _normalise(str(text))


def process_short_answer(doc: Mapping, results: Sequence[str]) -> dict:
    prediction = results[0] if results else ""
    return {"exact_match": float(normalise_answer(prediction) == normalise_answer(doc["answer"]))}


_CHOICES_BY_TYPE = {
    "colour": list(COLOURS),
    "shape": list(SHAPES),
    "count": [str(n) for n in range(MAX_OBJECTS_LIMIT + 1)],
    "presence": ["yes", "no"],
    "position": ["yes", "no"],
}


def doc_to_choice(doc: Mapping) -> list[str]:
    """Every answer the generator can give for this question type (an unknown type: yes/no + the answer)."""
    choices = _CHOICES_BY_TYPE.get(str(doc.get("question_type")), ["yes", "no"])
    answer = normalise_answer(doc["answer"])
    return choices if answer in choices else [*choices, answer]


def doc_to_choice_index(doc: Mapping) -> int:
    return doc_to_choice(doc).index(normalise_answer(doc["answer"]))


def process_multiple_choice(doc: Mapping, results: Sequence) -> dict:
    """Accuracy of the most likely choice. lmms-eval's multiple-choice convention: each result is
    (score, is_greedy) where a LOWER score is more likely (models return a loss), so the pick is argmin."""
    scores = [float(result[0]) for result in results]
    if not scores or all(math.isinf(s) for s in scores):
        return {"acc": 0.0}
    return {"acc": float(int(np.argmin(scores)) == doc_to_choice_index(doc))}


# -------------------------------------------------------------------------------------- aggregations


def _counted(items: Sequence) -> list[float]:
    """The samples that have a count: a failed sample (no image, too long...) spent no tokens to report."""
    return [float(x) for x in items if isinstance(x, (int, float)) and not isinstance(x, bool)]


def mean_visual_tokens(items: Sequence) -> float:
    values = _counted(items)
    return statistics.fmean(values) if values else math.nan


def median_visual_tokens(items: Sequence) -> float:
    values = _counted(items)
    return float(statistics.median(values)) if values else math.nan


def max_visual_tokens(items: Sequence) -> float:
    values = _counted(items)
    return max(values) if values else math.nan
