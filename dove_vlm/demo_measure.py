"""The demo's measurements: everything its report states, measured here or read from the steps' own outputs
(the tokenizer's metrics log, the fine-tuning logs, lmms-eval's results and samples).

This module runs the trained tokenizer on the held-out scenes and computes numbers; it draws nothing and
writes nothing (`dove_vlm.report` renders). PSNR is `tokenizer.evaluation.metrics.psnr` averaged over
images, the same number `eval-recon` reports, so the two never disagree under one name.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .demo_recipe import SHAPES_TASK, DemoPaths, DemoRecipe

REQUIRED_MARGIN = 0.30  # accuracy points over the blind baseline the demo must show
HEADLINE_SETTING = ("on", "auto")  # query on, automatic length: what Q-DOVE is for


class ReportInputError(FileNotFoundError):
    """A file the report reads is missing: the message names it and the step that writes it."""


def _need(path: Path, step: str) -> Path:
    if not path.exists():
        raise ReportInputError(f"{path} does not exist; run the demo's '{step}' step first")
    return path


def _read_json(path: Path, step: str) -> Any:
    try:
        return json.loads(_need(path, step).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def machine_description() -> dict[str, Any]:
    """What can make the same seed give other numbers on another machine: CPU, thread count, library versions."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "blas": _blas(torch.__config__.show()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }


def _blas(config: str) -> str:
    """The BLAS torch was built with, from `torch.__config__.show()` ("unknown" if it does not say)."""
    for line in config.splitlines():
        if "BLAS_INFO=" in line:
            return line.split("BLAS_INFO=", 1)[1].split(",", 1)[0].strip() or "unknown"
    return "unknown"


# ---------------------------------------------------------------------------------------------- the tokenizer


@dataclass
class LengthStudy:
    """Automatic lengths of held-out images (no query) against their complexity."""

    lengths: list[int]
    n_objects: list[int]
    laplacian: list[float]
    spearman_objects: float
    spearman_laplacian: float
    p_objects: float
    p_laplacian: float


@dataclass
class ReconstructionStudy:
    """Mean per-image PSNR (dB) of held-out reconstructions per budget, and at the automatic length; and the
    share of objects whose shape `shapes.classify_shape` reads correctly (keys as for PSNR, plus "input")."""

    budgets: list[int]
    psnr: dict[str, float]
    mean_auto_length: float
    n_images: int
    shape_accuracy: dict[str, float] = field(default_factory=dict)
    n_objects: int = 0


@dataclass
class TokenizerSummary:
    """The trained tokenizer's architecture and its training loss, first and last logged."""

    image_size: int
    grid_size: int
    max_tokens: int
    token_dim: int
    metrics: list[dict[str, Any]]


def study_tokenizer(
    paths: DemoPaths, recipe: DemoRecipe, batch_size: int = 64
) -> tuple[LengthStudy, ReconstructionStudy, Any]:
    """Encode the held-out images without a query: lengths vs complexity, PSNR per budget, and the
    reconstructions of a few scenes of rising complexity (a `ReconstructionResult`) for the report's grid."""
    import torch
    from scipy.stats import spearmanr

    from tokenizer import DoveTokenizer
    from tokenizer.evaluation.metrics import psnr
    from tokenizer.modeling.image_processing import load_image

    scenes = [s for s in _read_json(paths.data / "scenes.json", "data") if s["split"] == "test"]
    if len(scenes) < 3:
        raise ValueError(f"{paths.data}/scenes.json has {len(scenes)} test scenes; the report needs at least 3")
    model = DoveTokenizer.from_pretrained(_need(paths.tokenizer, "tokenizer")).eval()
    budgets = sorted({b for b in recipe.report_budgets if b <= model.max_tokens} | {model.max_tokens})
    lengths: list[int] = []
    per_image: dict[str, list[float]] = defaultdict(list)
    shapes_read: dict[str, list[bool]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            images = [load_image(paths.images / f"{s['image_id']}.png") for s in chunk]
            result = model.reconstruct(images, budgets=budgets)
            lengths += [int(n) for n in result.auto_lengths]
            decoded = {"input": result.inputs, "auto": result.auto}
            for budget, recon in result.by_budget.items():
                per_image[str(budget)] += psnr(recon, result.inputs).tolist()
                decoded[str(budget)] = recon
            per_image["auto"] += psnr(result.auto, result.inputs).tolist()
            for key, batch in decoded.items():
                shapes_read[key] += _shapes_read(batch, chunk, [image.width for image in images])
    n_objects = [int(s["n_objects"]) for s in scenes]
    laplacian = [float(s["laplacian_var"]) for s in scenes]
    rho_objects, p_objects = spearman(spearmanr, lengths, n_objects)
    rho_laplacian, p_laplacian = spearman(spearmanr, lengths, laplacian)
    length_study = LengthStudy(lengths, n_objects, laplacian, rho_objects, rho_laplacian, p_objects, p_laplacian)
    recon_study = ReconstructionStudy(
        budgets=budgets,
        psnr={key: statistics.fmean(values) for key, values in per_image.items()},
        mean_auto_length=statistics.fmean(lengths),
        n_images=len(scenes),
        shape_accuracy={key: statistics.fmean(read) for key, read in shapes_read.items() if read},
        n_objects=len(shapes_read["input"]),
    )

    examples = examples_by_complexity(scenes, recipe.report_examples)
    images = [load_image(paths.images / f"{s['image_id']}.png") for s in examples]
    with torch.no_grad():
        grid = model.reconstruct(images, budgets=[b for b in budgets if b != model.max_tokens] + [model.max_tokens])
    return length_study, recon_study, grid


def _shapes_read(images: Any, scenes: Sequence[Mapping[str, Any]], scene_sizes: Sequence[int]) -> list[bool]:
    """For every object of every scene: does `classify_shape` read its true shape from `images` ([B, 3, H, W])?
    `scene_sizes` are the scenes' own sides in pixels, the frame their object boxes are given in."""
    from .shapes import classify_shape

    arrays = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [
        classify_shape(array, obj["colour"], obj["box"], size) == obj["shape"]
        for array, scene, size in zip(arrays, scenes, scene_sizes, strict=True)
        for obj in scene["objects"]
    ]


def spearman(spearmanr: Any, a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its p-value; NaN when either side is constant (no ranking to correlate)."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan, math.nan
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def examples_by_complexity(scenes: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """Up to `count` scenes, spread over the object counts (plain before textured), in rising complexity."""
    by_count: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for scene in scenes:
        by_count[int(scene["n_objects"])].append(scene)
    chosen: list[Mapping[str, Any]] = []
    rounds = 0
    while len(chosen) < count and rounds < len(scenes):
        for n in sorted(by_count):
            pool = sorted(by_count[n], key=lambda s: (s["background"] != "plain", s["image_id"]))
            if rounds < len(pool) and len(chosen) < count:
                chosen.append(pool[rounds])
        rounds += 1
    return sorted(chosen, key=lambda s: (int(s["n_objects"]), float(s["laplacian_var"])))


def summarise_tokenizer(paths: DemoPaths) -> TokenizerSummary:
    from tokenizer import DoveConfig

    config = DoveConfig.load(paths.tokenizer)
    path = paths.tokenizer_run / "logs" / "metrics.jsonl"
    metrics = []
    if path.is_file():
        metrics = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return TokenizerSummary(config.image_size, config.grid_size, config.max_tokens, config.token_dim, metrics)


# ---------------------------------------------------------------------------------------------- data and training


@dataclass
class DataSummary:
    n_scenes: int
    n_train: int
    n_test: int
    train_questions: int
    test_questions: int


def summarise_data(paths: DemoPaths) -> DataSummary:
    scenes = _read_json(paths.data / "scenes.json", "data")
    n_test = sum(1 for s in scenes if s["split"] == "test")
    return DataSummary(
        n_scenes=len(scenes),
        n_train=len(scenes) - n_test,
        n_test=n_test,
        train_questions=len(_read_json(paths.split_file("train", "annotations.json"), "data")),
        test_questions=len(_read_json(paths.split_file("test", "annotations.json"), "data")),
    )


def finetune_summary(stage_dir: Path) -> dict[str, Any] | None:
    """A fine-tuning stage's logged losses and parameter counts, from its finetune_log.json (None if absent)."""
    path = stage_dir / "finetune_log.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    losses = record.get("losses") or []
    return {
        "losses": losses,
        "first": losses[0] if losses else math.nan,
        "last": losses[-1] if losses else math.nan,
        "trainable": (record.get("parameters") or {}).get("trainable"),
        "total": (record.get("parameters") or {}).get("total"),
        "template": record.get("template"),
    }


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalRow:
    setting: str
    query: str
    budget: str
    accuracy: float
    n: int
    mean_tokens: float
    median_tokens: float
    max_tokens: float
    answers_per_s: float
    samples_log: str = ""  # relative to the eval directory: the lmms-eval log this row was computed from


def read_eval_rows(eval_dir: Path) -> tuple[list[EvalRow], EvalRow | None]:
    """The shapes task's rows of `eval-vqa`'s results.csv, and its blind-baseline row."""
    path = _need(eval_dir / "results.csv", "eval")
    rows, blind = [], None
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            if raw["task"] != SHAPES_TASK:
                continue
            row = EvalRow(
                setting=raw["setting"],
                query=raw["query"],
                budget=raw["budget"],
                accuracy=_float(raw["accuracy"]),
                n=int(raw["n"] or 0),
                mean_tokens=_float(raw["mean_visual_tokens"]),
                median_tokens=_float(raw["median_visual_tokens"]),
                max_tokens=_float(raw["max_visual_tokens"]),
                answers_per_s=_float(raw["answers_per_s"]),
                samples_log=raw.get("samples_log") or "",
            )
            if row.setting == "blind":
                blind = row
            else:
                rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no {SHAPES_TASK} rows")
    return rows, blind


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class TypeResults:
    """Per question type and evaluated setting: accuracy and mean visual tokens, with the blind baseline as the
    setting 'blind' (computed on exactly the questions the first setting evaluated) and the question counts."""

    accuracy: dict[str, dict[str, float]]
    mean_tokens: dict[str, dict[str, float]]
    counts: dict[str, int]


def per_type_results(eval_dir: Path, data_dir: Path, rows: Sequence[EvalRow]) -> TypeResults:
    """Accuracy and visual tokens per question type for each setting of `rows` (those of results.csv, the
    evaluation these numbers must agree with), from the lmms-eval samples log each row names. Earlier
    evaluations of the same directory leave their logs beside it, so no other log is read."""
    import pyarrow.parquet as pq

    from .shapes import QUESTION_TYPES, blind_baseline_accuracy

    test = {str(r["question_id"]): r for r in _read_json(data_dir / "test" / "annotations.json", "data")}
    train = _read_json(data_dir / "train" / "annotations.json", "data")
    # lmms-eval's samples log names each question by its row in the task's parquet (`doc_id`)
    parquet = _need(data_dir / "test" / "vqa.parquet", "data")
    row_ids = [str(q) for q in pq.read_table(parquet, columns=["question_id"]).column("question_id").to_pylist()]
    accuracy: dict[str, dict[str, float]] = {}
    tokens: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    evaluated: list[str] | None = None
    for row in rows:
        setting = row.setting
        if not row.samples_log:
            raise ValueError(
                f"{eval_dir}/results.csv names no samples log for the setting {setting!r} (an eval-vqa older than "
                "that column, or lmms-eval wrote no single samples log for the run); re-run the demo's eval step"
            )
        log = (eval_dir / row.samples_log).resolve()
        if not log.is_relative_to(eval_dir.resolve()) or not log.is_file():
            raise FileNotFoundError(
                f"{eval_dir}/results.csv names {row.samples_log!r} as the samples log of the setting {setting!r}, "
                f"but no such file lies under {eval_dir}; re-run the demo's eval step"
            )
        outcomes: dict[str, list[float]] = defaultdict(list)
        visual: dict[str, list[int]] = defaultdict(list)
        ids = []
        with open(log, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                sample = json.loads(line)
                question_id = row_ids[int(sample["doc_id"])]
                ids.append(question_id)
                question_type = test[question_id]["question_type"]
                outcomes[question_type].append(float(sample["exact_match"]))
                record = (sample.get("token_counts") or [{}])[0] or {}
                if isinstance(record.get("visual_tokens"), int):
                    visual[question_type].append(record["visual_tokens"])
        accuracy[setting] = {t: statistics.fmean(v) for t, v in outcomes.items()}
        tokens[setting] = {t: statistics.fmean(v) for t, v in visual.items()}
        if evaluated is None:
            evaluated = ids
    if evaluated is not None:
        blind: dict[str, float] = {}
        for question_type in QUESTION_TYPES:
            subset = [test[i] for i in evaluated if test[i]["question_type"] == question_type]
            if subset:
                blind[question_type] = blind_baseline_accuracy(train, subset)
                counts[question_type] = len(subset)
        accuracy["blind"] = blind
    return TypeResults(accuracy, tokens, counts)


def setting_name(query: str, budget: str) -> str:
    """eval-vqa's run directory name for one setting."""
    return f"query-{query}_budget-{budget}"


@dataclass
class AccuracyCheck:
    accuracy: float
    blind: float
    n: int
    margin: float
    passed: bool
    setting: str


def accuracy_check(rows: Sequence[EvalRow], blind: EvalRow | None) -> AccuracyCheck | None:
    """Query on, automatic length against the blind baseline on the same evaluated questions."""
    if blind is None:
        return None
    headline = next((r for r in rows if (r.query, r.budget) == HEADLINE_SETTING), None)
    if headline is None:
        return None
    if headline.n != blind.n:
        raise ValueError(
            f"the blind baseline covers {blind.n} questions but the evaluation {headline.n}: not the same split"
        )
    margin = headline.accuracy - blind.accuracy
    return AccuracyCheck(headline.accuracy, blind.accuracy, headline.n, margin, margin >= REQUIRED_MARGIN,
                         headline.setting)  # fmt: skip


def verdict(check: AccuracyCheck) -> str:
    """The check's one word, from its own numbers."""
    return "PASSED" if check.passed else "NOT REACHED"


# What variable length should buy (the demo's aims beside the check; they do not change the verdict).
NEEDS_TOKENS_GAIN = 0.15  # full budget over one token on a question type that needs more than the gist
AUTO_ACCURACY_SLACK = 0.02  # the automatic length within 2 points of the full budget...
AUTO_TOKEN_SHARE = 0.60  # ...at no more than 60% of its tokens
LENGTH_SPEARMAN = 0.5  # automatic length against object count on the held-out scenes
QUERY_TOKEN_CUT = 0.30  # the question as the query saves at least 30% of the tokens...
QUERY_ACCURACY_SLACK = 0.02  # ...at accuracy within 2 points of query-off
HEADROOM_MARGIN = 0.35  # the check's 30 points plus 5 of headroom for other machines
SHAPES_KEPT = 0.90  # the shape probe on full-budget reconstructions, as a share of its accuracy on the inputs


@dataclass
class Finding:
    """One aim, what it asks, what this run measured, and whether it holds (None: not measured)."""

    aim: str
    target: str
    measured: str
    met: bool | None


def full_budget_of(rows: Sequence[EvalRow]) -> str | None:
    """The largest fixed budget evaluated with the query on (as eval-vqa names budgets), or None."""
    fixed = [int(r.budget) for r in rows if r.query == "on" and r.budget.isdigit()]
    return str(max(fixed)) if fixed else None


def type_gains(by_type: Mapping[str, Mapping[str, float]], rows: Sequence[EvalRow]) -> dict[str, float]:
    """Per question type: accuracy at the full budget minus accuracy at one token, query on."""
    full = full_budget_of(rows)
    one, top = by_type.get(setting_name("on", "1"), {}), by_type.get(setting_name("on", full or ""), {})
    if full is None or full == "1":
        return {}
    return {t: top[t] - one[t] for t in top if t in one}


def variable_length_findings(
    rows: Sequence[EvalRow],
    by_type: Mapping[str, Mapping[str, float]],
    spearman_objects: float,
    check: AccuracyCheck | None,
    shape_accuracy: Mapping[str, float] | None = None,
) -> list[Finding]:
    """What variable length bought in this run, each aim against its target; a pure function of the numbers.

    `shape_accuracy` is `ReconstructionStudy.shape_accuracy` ("input" and one key per budget); without it the
    last aim, that the tokens keep each object's shape, is not judged."""
    by_setting = {(r.query, r.budget): r for r in rows}
    full = full_budget_of(rows)
    findings = []

    gains = type_gains(by_type, rows)
    if gains:
        best = max(gains, key=lambda t: gains[t])
        measured = ", ".join(f"{t} {100 * g:+.1f}" for t, g in gains.items())
        findings.append(Finding(f"more tokens buy accuracy where the question needs them (1 -> {full} tokens)",
                                f"some type >= +{100 * NEEDS_TOKENS_GAIN:.0f} points", measured + " points",
                                gains[best] >= NEEDS_TOKENS_GAIN))  # fmt: skip
    else:
        findings.append(Finding("more tokens buy accuracy where the question needs them",
                                f"some type >= +{100 * NEEDS_TOKENS_GAIN:.0f} points", "not evaluated", None))  # fmt: skip

    auto, top = by_setting.get(("on", "auto")), by_setting.get(("on", full or ""))
    if auto is not None and top is not None:
        share = auto.mean_tokens / top.mean_tokens
        gap = top.accuracy - auto.accuracy
        findings.append(Finding(
            f"the automatic length is worth it (query on, against {full} tokens)",
            f"within {100 * AUTO_ACCURACY_SLACK:.0f} points at <= {100 * AUTO_TOKEN_SHARE:.0f}% of the tokens",
            f"{100 * (auto.accuracy - top.accuracy):+.1f} points at {100 * share:.0f}% of the tokens",
            gap <= AUTO_ACCURACY_SLACK and share <= AUTO_TOKEN_SHARE,
        ))  # fmt: skip
    else:
        findings.append(Finding("the automatic length is worth it", "", "not evaluated", None))

    findings.append(Finding(
        "busier scenes get more tokens (held-out scenes, no query)",
        f"Spearman with the object count >= {LENGTH_SPEARMAN:.1f}",
        "n/a" if math.isnan(spearman_objects) else f"{spearman_objects:.2f}",
        None if math.isnan(spearman_objects) else spearman_objects >= LENGTH_SPEARMAN,
    ))  # fmt: skip

    on, off = by_setting.get(("on", "auto")), by_setting.get(("off", "auto"))
    if on is not None and off is not None and off.mean_tokens > 0:
        cut = 1.0 - on.mean_tokens / off.mean_tokens
        findings.append(Finding(
            "the query helps (automatic length, query on against off)",
            f">= {100 * QUERY_TOKEN_CUT:.0f}% fewer tokens, accuracy within {100 * QUERY_ACCURACY_SLACK:.0f} points",
            f"{100 * cut:.0f}% fewer tokens, {100 * (on.accuracy - off.accuracy):+.1f} points",
            cut >= QUERY_TOKEN_CUT and on.accuracy >= off.accuracy - QUERY_ACCURACY_SLACK,
        ))  # fmt: skip
    else:
        findings.append(Finding("the query helps", "", "not evaluated", None))

    findings.append(Finding(
        "the check with headroom for other machines",
        f"margin >= +{100 * HEADROOM_MARGIN:.0f} points",
        "not evaluated" if check is None else f"{100 * check.margin:+.1f} points",
        None if check is None else check.margin >= HEADROOM_MARGIN,
    ))  # fmt: skip

    if shape_accuracy and "input" in shape_accuracy:
        top_key = str(max(int(k) for k in shape_accuracy if k.isdigit()))
        kept, ceiling = shape_accuracy[top_key], shape_accuracy["input"]
        findings.append(Finding(
            f"the tokens keep each object's shape (shape probe, {top_key} tokens against the input)",
            f">= {100 * SHAPES_KEPT:.0f}% of the input's {100 * ceiling:.1f}%",
            f"{100 * kept:.1f}% ({100 * shape_accuracy.get('1', math.nan):.1f}% at one token)",
            kept >= SHAPES_KEPT * ceiling,
        ))  # fmt: skip
    return findings


# ---------------------------------------------------------------------------------------------- all of it


@dataclass
class DemoMeasurements:
    """Everything the report states, so that rendering it runs no model and reads no file."""

    data: DataSummary
    tokenizer: TokenizerSummary
    lengths: LengthStudy
    reconstruction: ReconstructionStudy
    grid: Any  # tokenizer.ReconstructionResult of the example scenes
    stages: dict[str, dict[str, Any] | None]
    rows: list[EvalRow]
    blind: EvalRow | None
    by_type: dict[str, dict[str, float]]
    type_tokens: dict[str, dict[str, float]]
    type_counts: dict[str, int]
    check: AccuracyCheck | None
    findings: list[Finding]
    machine: dict[str, Any] = field(default_factory=dict)


def measure_demo(paths: DemoPaths, recipe: DemoRecipe) -> DemoMeasurements:
    """Measure what the report states from the files the demo's steps wrote under `paths`."""
    length_study, recon_study, grid = study_tokenizer(paths, recipe)
    rows, blind = read_eval_rows(paths.eval)
    types = per_type_results(paths.eval, paths.data, rows)
    check = accuracy_check(rows, blind)
    return DemoMeasurements(
        data=summarise_data(paths),
        tokenizer=summarise_tokenizer(paths),
        lengths=length_study,
        reconstruction=recon_study,
        grid=grid,
        stages={"stage 1": finetune_summary(paths.stage1), "stage 2": finetune_summary(paths.stage2)},
        rows=rows,
        blind=blind,
        by_type=types.accuracy,
        type_tokens=types.mean_tokens,
        type_counts=types.counts,
        check=check,
        findings=variable_length_findings(
            rows, types.accuracy, length_study.spearman_objects, check, recon_study.shape_accuracy
        ),
        machine=machine_description(),
    )
