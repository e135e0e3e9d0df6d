"""The demo's report: report.md and its PNG figures, from what the demo's steps wrote.

Everything shown is measured here or read from the steps' own outputs (the tokenizer's metrics log, the
fine-tuning logs, lmms-eval's results and samples); the report states the numbers whatever they are,
and the accuracy check says plainly whether the margin over the blind baseline was reached.

Figures (in DIR/figures):
    reconstructions.png          held-out scenes of growing complexity, decoded at fixed budgets and at the
                                 automatic length the EOS head chose
    length_vs_complexity.png     automatic length (no query) against object count and Laplacian variance,
                                 with Spearman correlations
    accuracy_vs_tokens.png       lmms-eval accuracy against mean visual tokens per answer, query on and off,
                                 automatic and fixed budgets, with the blind baseline
    accuracy_by_type.png         accuracy per question type, the VLM against the blind baseline
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .demo import DemoPaths, DemoRecipe, DemoStep

REQUIRED_MARGIN = 0.30  # accuracy points over the blind baseline the demo must show
FIGURES = {
    "reconstructions": "reconstructions.png",
    "length": "length_vs_complexity.png",
    "accuracy": "accuracy_vs_tokens.png",
    "by_type": "accuracy_by_type.png",
}
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


# ---------------------------------------------------------------------------------------------- measurements


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
    """PSNR of held-out reconstructions per budget, and at the automatic length."""

    budgets: list[int]
    psnr: dict[str, float]
    mean_auto_length: float
    n_images: int


def _psnr(mse: float) -> float:
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def study_tokenizer(
    paths: DemoPaths, recipe: DemoRecipe, figure_dir: Path, batch_size: int = 64
) -> tuple[LengthStudy, ReconstructionStudy]:
    """Encode the held-out images without a query: lengths vs complexity, quality per budget, the grid."""
    import torch
    from scipy.stats import spearmanr

    from tokenizer import DoveTokenizer
    from tokenizer.evaluation.visualize import save_reconstruction_grid
    from tokenizer.modeling.image_processing import load_image

    scenes = [s for s in _read_json(paths.data / "scenes.json", "data") if s["split"] == "test"]
    if len(scenes) < 3:
        raise ValueError(f"{paths.data}/scenes.json has {len(scenes)} test scenes; the report needs at least 3")
    model = DoveTokenizer.from_pretrained(_need(paths.tokenizer, "tokenizer")).eval()
    budgets = sorted({b for b in recipe.report_budgets if b <= model.max_tokens} | {model.max_tokens})
    lengths: list[int] = []
    squared: dict[str, float] = defaultdict(float)
    pixels_seen = 0
    with torch.no_grad():
        for start in range(0, len(scenes), batch_size):
            chunk = scenes[start : start + batch_size]
            images = [load_image(paths.images / f"{s['image_id']}.png") for s in chunk]
            result = model.reconstruct(images, budgets=budgets)
            lengths += [int(n) for n in result.auto_lengths]
            for budget, recon in result.by_budget.items():
                squared[str(budget)] += float(((recon - result.inputs) ** 2).sum())
            squared["auto"] += float(((result.auto - result.inputs) ** 2).sum())
            pixels_seen += result.inputs.numel()
    n_objects = [int(s["n_objects"]) for s in scenes]
    laplacian = [float(s["laplacian_var"]) for s in scenes]
    rho_objects, p_objects = _spearman(spearmanr, lengths, n_objects)
    rho_laplacian, p_laplacian = _spearman(spearmanr, lengths, laplacian)
    length_study = LengthStudy(lengths, n_objects, laplacian, rho_objects, rho_laplacian, p_objects, p_laplacian)
    recon_study = ReconstructionStudy(
        budgets=budgets,
        psnr={key: _psnr(value / pixels_seen) for key, value in squared.items()},
        mean_auto_length=statistics.fmean(lengths),
        n_images=len(scenes),
    )

    examples = _examples_by_complexity(scenes, recipe.report_examples)
    images = [load_image(paths.images / f"{s['image_id']}.png") for s in examples]
    with torch.no_grad():
        grid = model.reconstruct(images, budgets=[b for b in budgets if b != model.max_tokens] + [model.max_tokens])
    save_reconstruction_grid(grid, figure_dir / FIGURES["reconstructions"], cell=96)
    return length_study, recon_study


def _spearman(spearmanr: Any, a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its p-value; NaN when either side is constant (no ranking to correlate)."""
    if len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan, math.nan
    result = spearmanr(a, b)
    return float(result.statistic), float(result.pvalue)


def _examples_by_complexity(scenes: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
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


def read_eval_rows(eval_dir: Path) -> tuple[list[EvalRow], EvalRow | None]:
    """The shapes task's rows of `eval-vqa`'s results.csv, and its blind-baseline row."""
    path = _need(eval_dir / "results.csv", "eval")
    rows, blind = [], None
    with open(path, newline="", encoding="utf-8") as handle:
        for raw in csv.DictReader(handle):
            if raw["task"] != "dove_shapes_vqa":
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
            )
            if row.setting == "blind":
                blind = row
            else:
                rows.append(row)
    if not rows:
        raise ValueError(f"{path} has no dove_shapes_vqa rows")
    return rows, blind


def _float(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def per_type_accuracy(eval_dir: Path, data_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Accuracy per question type for each evaluated setting, from lmms-eval's samples logs.

    Returns ({setting: {type: accuracy}}, {type: number of questions}) with the blind baseline as the
    setting 'blind', computed on exactly the questions the first setting evaluated.
    """
    import pyarrow.parquet as pq

    from .shapes import QUESTION_TYPES, blind_baseline_accuracy

    test = {str(r["question_id"]): r for r in _read_json(data_dir / "test" / "annotations.json", "data")}
    train = _read_json(data_dir / "train" / "annotations.json", "data")
    # lmms-eval's samples log names each question by its row in the task's parquet (`doc_id`)
    parquet = _need(data_dir / "test" / "vqa.parquet", "data")
    row_ids = [str(q) for q in pq.read_table(parquet, columns=["question_id"]).column("question_id").to_pylist()]
    accuracy: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    evaluated: list[str] | None = None
    for run_dir in sorted(p for p in (_need(eval_dir / "runs", "eval")).iterdir() if p.is_dir()):
        logs = sorted(run_dir.rglob("*samples_dove_shapes_vqa.jsonl"))
        if not logs:
            continue
        outcomes: dict[str, list[float]] = defaultdict(list)
        ids = []
        with open(logs[-1], encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                sample = json.loads(line)
                question_id = row_ids[int(sample["doc_id"])]
                ids.append(question_id)
                outcomes[test[question_id]["question_type"]].append(float(sample["exact_match"]))
        accuracy[run_dir.name] = {t: statistics.fmean(v) for t, v in outcomes.items()}
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
    return accuracy, counts


def setting_name(query: str, budget: str) -> str:
    """eval-vqa's run directory name for one setting."""
    return f"query-{query}_budget-{budget}"


# ---------------------------------------------------------------------------------------------- figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_length_vs_complexity(study: LengthStudy, path: Path) -> Path:
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    counts = sorted(set(study.n_objects))
    groups = [[n for n, c in zip(study.lengths, study.n_objects) if c == count] for count in counts]
    left.boxplot(groups, positions=counts, widths=0.6)
    left.plot(counts, [statistics.fmean(g) for g in groups], "o-", color="tab:red", label="mean")
    left.set(xlabel="objects in the scene", ylabel="automatic length (tokens)",
             title=f"Spearman rho = {_rho(study.spearman_objects)}")  # fmt: skip
    left.legend(fontsize=8)
    right.scatter(study.laplacian, study.lengths, s=8, alpha=0.5)
    right.set_xscale("log")
    right.set(xlabel="Laplacian variance of the image (log scale)", ylabel="automatic length (tokens)",
              title=f"Spearman rho = {_rho(study.spearman_laplacian)}")  # fmt: skip
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.suptitle("Held-out scenes, no query: tokens the EOS head spends against scene complexity")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _rho(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def plot_accuracy_vs_tokens(rows: Sequence[EvalRow], blind: EvalRow | None, path: Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for query, style, colour in (("on", "o-", "tab:blue"), ("off", "s--", "tab:orange")):
        points = sorted((r.mean_tokens, r.accuracy, r.budget) for r in rows if r.query == query)
        points = [p for p in points if not math.isnan(p[0])]
        if not points:
            continue
        fixed = [p for p in points if p[2] != "auto"]
        if fixed:
            axis.plot([p[0] for p in fixed], [p[1] for p in fixed], style, color=colour,
                      label=f"query {query}, fixed budgets")  # fmt: skip
        for x, y, budget in points:
            if budget == "auto":
                axis.plot([x], [y], marker="*", markersize=14, color=colour, linestyle="none",
                          label=f"query {query}, automatic length")  # fmt: skip
            axis.annotate(budget, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if blind is not None:
        axis.axhline(blind.accuracy, color="grey", linestyle=":", label="blind baseline (question only)")
        axis.axhline(blind.accuracy + REQUIRED_MARGIN, color="tab:red", linestyle=":", alpha=0.6,
                     label=f"blind + {REQUIRED_MARGIN * 100:.0f} points")  # fmt: skip
    axis.set(xlabel="mean visual tokens per answer", ylabel="exact-match accuracy (held-out scenes)",
             title="Shapes VQA through lmms-eval")  # fmt: skip
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_accuracy_by_type(accuracy: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    plt = _pyplot()
    series = [("blind", "blind baseline"), (setting_name("on", "auto"), "query on, auto length"),
              (setting_name("off", "auto"), "query off, auto length")]  # fmt: skip
    series = [(key, label) for key, label in series if key in accuracy]
    types = [t for t in accuracy.get("blind", {})] or sorted({t for v in accuracy.values() for t in v})
    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(series))
    for offset, (key, label) in enumerate(series):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(types))]
        axis.bar(xs, [accuracy[key].get(t, math.nan) for t in types], width=width, label=label)
    axis.set_xticks(range(len(types)), types)
    axis.set(ylabel="exact-match accuracy", ylim=(0, 1), title="Accuracy per question type (held-out scenes)")
    axis.grid(alpha=0.3, axis="y")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------- markdown


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _num(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _finetune_summary(stage_dir: Path) -> dict[str, Any] | None:
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


def _tokenizer_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def write_report(
    paths: DemoPaths,
    recipe: DemoRecipe,
    steps: Sequence[DemoStep],
    timings: Mapping[str, Mapping[str, Any]],
    started: float | None = None,
    progress: bool = True,
) -> Path:
    """Measure what needs measuring, draw the figures and write DIR/report.md; returns its path."""
    from tqdm.auto import tqdm

    from .demo import machine_description

    started = time.perf_counter() if started is None else started
    figures = paths.figures
    figures.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=4, desc="report", unit="part", disable=not progress)
    length_study, recon_study = study_tokenizer(paths, recipe, figures)
    bar.update(1)
    plot_length_vs_complexity(length_study, figures / FIGURES["length"])
    bar.update(1)
    rows, blind = read_eval_rows(paths.eval)
    plot_accuracy_vs_tokens(rows, blind, figures / FIGURES["accuracy"])
    by_type, type_counts = per_type_accuracy(paths.eval, paths.data)
    plot_accuracy_by_type(by_type, figures / FIGURES["by_type"])
    bar.update(1)
    check = accuracy_check(rows, blind)

    all_timings = dict(timings)
    all_timings["report"] = {"seconds": time.perf_counter() - started}
    text = render_markdown(paths, recipe, steps, all_timings, length_study, recon_study, rows, blind, by_type,
                           type_counts, check, machine_description())  # fmt: skip
    paths.report.write_text(text, encoding="utf-8")
    bar.update(1)
    bar.close()
    return paths.report


def render_markdown(
    paths: DemoPaths,
    recipe: DemoRecipe,
    steps: Sequence[DemoStep],
    timings: Mapping[str, Mapping[str, Any]],
    length_study: LengthStudy,
    recon_study: ReconstructionStudy,
    rows: Sequence[EvalRow],
    blind: EvalRow | None,
    by_type: Mapping[str, Mapping[str, float]],
    type_counts: Mapping[str, int],
    check: AccuracyCheck | None,
    machine: Mapping[str, Any],
) -> str:
    summary = _read_json(paths.data / "scenes.json", "data")
    n_test = sum(1 for s in summary if s["split"] == "test")
    n_train = len(summary) - n_test
    train_questions = len(_read_json(paths.split_file("train", "annotations.json"), "data"))
    test_questions = len(_read_json(paths.split_file("test", "annotations.json"), "data"))
    total = sum(float(t.get("seconds", 0.0)) for t in timings.values())
    lines = [
        f"# dove-vlm demo report ({recipe.name})",
        "",
        (
            "Shapes-VQA data -> a Q-DOVE tokenizer trained from scratch -> a tiny LLaMA-style VLM fine-tuned in "
            "LLaVA's two stages with DeepSpeed ZeRO-2 on the CPU -> lmms-eval scores with the visual tokens each "
            f"answer cost. Everything below was measured by this run ({_num(total / 60, 1)} minutes in all, on "
            f"{machine.get('cpu_count')} CPU cores; {machine.get('platform')})."
        ),
        "",
        "## The accuracy check",
        "",
    ]
    if check is None:
        lines.append("No check: the evaluation has no query-on automatic-length row or no blind baseline.")
    else:
        verdict = "PASSED" if check.passed else "NOT REACHED"
        lines += [
            (
                f"VQA accuracy on {check.n} held-out questions (scenes never seen in training), query on, automatic "
                f"length: **{_pct(check.accuracy)}**. Blind baseline on the same questions (the majority training "
                f"answer for each question's wording, no image): **{_pct(check.blind)}**. Margin: "
                f"**{100 * check.margin:+.1f} points** against the {100 * REQUIRED_MARGIN:.0f} required: "
                f"**{verdict}**."
            ),
        ]
    lines += [
        "",
        "## Data",
        "",
        (
            f"`dove-vlm make-shapes`: {len(summary)} scenes of 1 to {recipe.max_objects} shapes at 64 px"
            + (f", object sizes x{recipe.object_scale:g}" if recipe.object_scale != 1.0 else "")
            + f" ({n_train} train, {n_test} held out), {recipe.questions_per_image} questions per scene "
            f"({', '.join(recipe.question_types) if recipe.question_types else 'every type'}): "
            f"{train_questions} training and {test_questions} held-out questions."
        ),
        "",
    ]
    lines += _tokenizer_section(paths, recipe, recon_study, length_study, rows)
    lines += _vlm_section(paths, recipe)
    lines += _eval_section(rows, blind, by_type, type_counts)
    lines += [
        "## Time per step",
        "",
        *_table(
            ["step", "what", "seconds"],
            [[s.name, s.title, _num(float(timings.get(s.name, {}).get("seconds", math.nan)), 0)] for s in steps]
            + [["total", "", _num(total, 0)]],
        ),
        "",
        (
            f"Machine: {machine.get('processor')}, {machine.get('cpu_count')} cores, torch {machine.get('torch')} "
            f"with {machine.get('torch_threads')} threads, Python {machine.get('python')}, "
            f"{'CUDA available' if machine.get('cuda') else 'no GPU used'}."
        ),
        "",
        "## Re-running one step",
        "",
        (
            "Each step is one command; run any of them alone (the demo ran exactly these, in this order). "
            f"`dove-vlm demo --out {paths.root} --steps NAME[,NAME...]` re-runs named steps with the same recipe."
        ),
        "",
    ]
    for step in steps:
        lines += [f"{step.name}: {step.title}", "", "```bash", step.command_line, "```", ""]
    return "\n".join(lines)


def _tokenizer_section(
    paths: DemoPaths,
    recipe: DemoRecipe,
    recon: ReconstructionStudy,
    lengths: LengthStudy,
    rows: Sequence[EvalRow],
) -> list[str]:
    from tokenizer import DoveConfig

    config = DoveConfig.load(paths.tokenizer)
    metrics = _tokenizer_metrics(paths.tokenizer_run)
    first, last = (metrics[0], metrics[-1]) if metrics else ({}, {})
    train = recipe.tokenizer_train
    lines = [
        "## The tokenizer",
        "",
        (
            f"`{recipe.tokenizer_name}` ({config.image_size} px, {config.grid_size}x{config.grid_size} latent grid, at "
            f"most {config.max_tokens} tokens of {config.token_dim} dimensions) trained from scratch with Q-DOVE "
            f"annotations for {train.get('max_steps')} steps of {train.get('batch_size')} images, the first "
            f"{train.get('vq_warmup_steps', 0)} of them the autoencoder alone "
            f"(training config: `{paths.tokenizer_config}`). Reconstruction loss (pixel MSE, region-weighted) "
            f"{_num(first.get('loss/reconstruction', math.nan), 4)} at step {first.get('step', '-')} -> "
            f"{_num(last.get('loss/reconstruction', math.nan), 4)} at step {last.get('step', '-')}."
        ),
        "",
        f"![reconstructions](figures/{FIGURES['reconstructions']})",
        "",
        (
            "Held-out scenes (rows, simplest first) decoded from the first k tokens (columns), and from the length the "
            "EOS head chose (last column)."
        ),
        "",
        f"Reconstruction quality on the {recon.n_images} held-out images (PSNR, dB; higher is better):",
        "",
        *_table(
            [*(f"{b} tokens" for b in recon.budgets), f"automatic (mean {recon.mean_auto_length:.1f} tokens)"],
            [[*(_num(recon.psnr[str(b)], 2) for b in recon.budgets), _num(recon.psnr["auto"], 2)]],
        ),
        "",
        f"![length vs complexity](figures/{FIGURES['length']})",
        "",
        (
            f"Automatic length against scene complexity on the {len(lengths.lengths)} held-out images (no query): "
            f"Spearman rho = {_rho(lengths.spearman_objects)} with the object count (p = {_num(lengths.p_objects, 3)}), "
            f"{_rho(lengths.spearman_laplacian)} with the Laplacian variance (p = {_num(lengths.p_laplacian, 3)})."
        ),
        "",
        *_table(
            ["objects", "images", "mean automatic length", "min", "max"],
            [
                [str(count), str(len(group)), _num(statistics.fmean(group), 2), str(min(group)), str(max(group))]
                for count in sorted(set(lengths.n_objects))
                for group in [[n for n, c in zip(lengths.lengths, lengths.n_objects) if c == count]]
            ],
        ),
        "",
    ]
    on = next((r for r in rows if (r.query, r.budget) == ("on", "auto")), None)
    off = next((r for r in rows if (r.query, r.budget) == ("off", "auto")), None)
    if on is not None and off is not None:
        lines += [
            (
                f"Q-DOVE: over the {on.n} held-out questions the tower spent {_num(on.mean_tokens, 2)} tokens per image "
                f"on average with the question as its query, and {_num(off.mean_tokens, 2)} without it."
            ),
            "",
        ]
    return lines


def _vlm_section(paths: DemoPaths, recipe: DemoRecipe) -> list[str]:
    stage1, stage2 = _finetune_summary(paths.stage1), _finetune_summary(paths.stage2)
    stage2_kind = "LoRA adapters on the LLM" if recipe.stage2_lora else "the whole LLM"
    lines = [
        "## The VLM",
        "",
        f"A LLaMA-style LLM built from config (hidden {recipe.llm_hidden}, {recipe.llm_layers} layers, "
        f"{recipe.llm_heads} heads, random weights) with a byte-level BPE tokenizer of {recipe.llm_vocab_size} "
        "entries trained on the training conversations (`dove-vlm make-tiny-llm`). The DOVE tower stays frozen"
        + (f" except its {recipe.tower_trainable}" if recipe.tower_trainable != "none" else "")
        + "; an `mlp2x_gelu` projector maps its tokens to the LLM. Stage 1 trains the projector alone "
        f"({recipe.stage1_epochs:g} epoch(s), lr {recipe.stage1_lr:g}, `plain` template); stage 2 trains "
        f"{stage2_kind} and the projector ({recipe.stage2_epochs:g} epochs, lr {recipe.stage2_lr:g}, the "
        "tokenizer's chat template), both through the Hugging Face Trainer with DeepSpeed ZeRO-2 on the CPU. "
        "The LLM starts random, so stage 2 trains all of it: LoRA would leave nearly every weight random "
        "(with a pretrained LLM, add `--lora` to the stage-2 command).",
        "",
    ]
    table = []
    for name, record in (("stage 1", stage1), ("stage 2", stage2)):
        if record is None:
            continue
        trainable = record["trainable"]
        table.append([
            name, f"{trainable:,}" if trainable else "-", f"{record['total']:,}" if record["total"] else "-",
            _num(record["first"], 3), _num(record["last"], 3), str(len(record["losses"])),
        ])  # fmt: skip
    if table:
        lines += [*_table(["stage", "trainable parameters", "all parameters", "first logged loss",
                           "last logged loss", "logged losses"], table), ""]  # fmt: skip
    return lines


def _eval_section(
    rows: Sequence[EvalRow],
    blind: EvalRow | None,
    by_type: Mapping[str, Mapping[str, float]],
    type_counts: Mapping[str, int],
) -> list[str]:
    lines = [
        "## Evaluation (lmms-eval, `dove_shapes_vqa`, held-out scenes)",
        "",
        (
            "Exact match after lmms-eval's VQA answer normalisation. `auto`: the EOS head picks each image's "
            "length; a number forces that many tokens. Query on: the tower reads the question (Q-DOVE)."
        ),
        "",
    ]
    table = [
        [r.query, r.budget, _pct(r.accuracy), _num(r.mean_tokens, 2), _num(r.median_tokens, 1),
         _num(r.max_tokens, 0), _num(r.answers_per_s, 1), str(r.n)]
        for r in rows
    ]  # fmt: skip
    if blind is not None:
        table.append(["blind baseline (question only)", "-", _pct(blind.accuracy), "0", "0", "0", "-", str(blind.n)])
    lines += [
        *_table(["query", "budget", "accuracy", "mean visual tokens", "median", "max", "answers/s", "questions"],
                table),
        "",
        f"![accuracy vs tokens](figures/{FIGURES['accuracy']})",
        "",
    ]  # fmt: skip
    if by_type:
        types = list(by_type.get("blind", {})) or sorted({t for v in by_type.values() for t in v})
        settings = [k for k in by_type if k != "blind"] + (["blind"] if "blind" in by_type else [])
        lines += [
            "Accuracy per question type:",
            "",
            *_table(
                ["setting", *(f"{t} ({type_counts.get(t, '-')})" for t in types)],
                [
                    [s if s != "blind" else "blind baseline", *(_pct(by_type[s].get(t, math.nan)) for t in types)]
                    for s in settings
                ],
            ),
            "",
            f"![accuracy by type](figures/{FIGURES['by_type']})",
            "",
        ]
    return lines
