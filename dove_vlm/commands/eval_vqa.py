"""`dove-vlm eval-vqa`: accuracy against the visual tokens it cost, with and without query conditioning.

    dove-vlm eval-vqa --model DIR --tasks dove_shapes_vqa --budgets auto,4,8,16,32 --query both --output OUT

Runs lmms-eval (`simple_evaluate`, the `dove_llava` model) once per setting: query on/off x each budget
(`auto` = the EOS head decides per image). One model instance serves every setting, so the weights load
once. Writes:
    OUT/runs/<setting>/...              lmms-eval's own results JSON and samples log for that setting
    OUT/results.csv, OUT/results.md     one row per (setting, task): accuracy (the task's first metric),
                                        mean / median / max visual tokens, answers per second; the csv also
                                        names the samples log the row was computed from (relative to OUT)
    OUT/accuracy_vs_visual_tokens.png   accuracy against mean visual tokens, query on and off as two curves
For the shapes tasks the table also has a `blind` row: the accuracy of answering from the question alone
(the majority training answer), on the same questions, so a reader sees how much the image is used.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._args import add_dtype_argument, output_dir

SHAPES_TASK_PREFIX = "dove_shapes_vqa"
SHAPES_DIR_ENV = "DOVE_SHAPES_DIR"
PLOT_NAME = "accuracy_vs_visual_tokens.png"
COLUMNS = (
    "setting", "task", "query", "budget", "metric", "accuracy", "n", "mean_visual_tokens",
    "median_visual_tokens", "max_visual_tokens", "answers_per_s", "errors", "samples_log",
)  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-vqa", help="lmms-eval VQA accuracy against visual tokens, per budget, query on and off"
    )
    parser.add_argument("--model", required=True, help="directory (or hub id) written by save_pretrained")
    parser.add_argument("--tasks", default="dove_shapes_vqa", help="lmms-eval task names, comma separated")
    parser.add_argument("--budgets", type=_budget_list, default=["auto"], help="e.g. auto,8,16,32 (default: auto)")
    parser.add_argument("--query", choices=("both", "on", "off"), default="both", help="query conditioning")
    parser.add_argument("--threshold", type=float, default=None, help="EOS threshold for auto (default: model's)")
    parser.add_argument(
        "--output", type=output_dir, required=True, help="directory for the runs, the table and the plot"
    )
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each task (for quick checks)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    add_dtype_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override every task's answer length")
    parser.add_argument(
        "--include-path",
        action="append",
        default=None,
        help="lmms-eval task folder (repeatable; default: the dove tasks shipped with dove-vlm)",
    )
    parser.add_argument(
        "--shapes-dir", default=None, help=f"make-shapes output for the shapes tasks (default: ${SHAPES_DIR_ENV})"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: name at least one lmms-eval task")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    include_paths = args.include_path or [str(_default_task_dir())]
    for path in include_paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include-path: {path} is not a directory")
    shapes_dir = _shapes_dir(args.shapes_dir) if any(t.startswith(SHAPES_TASK_PREFIX) for t in tasks) else None
    if shapes_dir is not None:
        os.environ[SHAPES_DIR_ENV] = str(shapes_dir)  # the task reads its data location from here
    queries = {"both": [True, False], "on": [True], "off": [False]}[args.query]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)

    from lmms_eval.tasks import TaskManager

    from llava_adapter.lmms_model import DoveLlava

    model = DoveLlava(
        pretrained=args.model,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        threshold=args.threshold,
        max_new_tokens=args.max_new_tokens,
        release_on_clean=False,
    )
    # lmms-eval's built-in tasks are indexed only when asked for: indexing them all takes seconds.
    task_manager = TaskManager("WARNING", include_path=include_paths, include_defaults=False)
    if not set(tasks) <= set(task_manager.all_tasks):
        task_manager = TaskManager("WARNING", include_path=include_paths)
    rows: list[dict[str, Any]] = []
    evaluated_ids: dict[str, list[str]] = {}
    for use_query in queries:
        for budget in args.budgets:
            model.configure(query=use_query, budget=budget)
            setting = f"query-{'on' if use_query else 'off'}_budget-{budget}"
            print(f"eval-vqa: {setting}", flush=True)
            _warm_up(model, args, tasks, task_manager)
            results, logs = _evaluate(model, args, tasks, task_manager, output / "runs" / setting)
            for task, summary in _summarise(results).items():
                log = logs.get(task)
                rows.append({"setting": setting, "task": task, "query": "on" if use_query else "off",
                             "budget": str(budget), **summary,
                             "samples_log": log.relative_to(output).as_posix() if log else ""})  # fmt: skip
                evaluated_ids.setdefault(task, _question_ids(results["samples"][task]))
    if shapes_dir is not None:
        rows += _blind_rows(shapes_dir, evaluated_ids)
    _write_table(rows, output)
    _plot(rows, output / PLOT_NAME)
    print((output / "results.md").read_text())
    print(f"eval-vqa: wrote {output / 'results.csv'}, {output / 'results.md'} and {output / PLOT_NAME}")
    return 0


# ---------------------------------------------------------------------------------------------- running


def _warm_up(model: Any, args: argparse.Namespace, tasks: list[str], task_manager: Any) -> None:
    """Answer one batch of the current setting and discard it, so that every setting's answers/s is timed after
    the same warm-up: the first passes through a model (and through a new token budget) pay one-off costs
    that would otherwise land on whichever setting runs first."""
    from lmms_eval.evaluator import simple_evaluate

    settings = model.settings
    simple_evaluate(
        model=model,
        model_args=f"pretrained={args.model},query={str(settings['query']).lower()},budget={settings['budget']}",
        tasks=tasks,
        limit=min(args.batch_size, args.limit or args.batch_size),
        log_samples=False,
        task_manager=task_manager,
        verbosity="WARNING",
    )


def _evaluate(
    model: Any, args: argparse.Namespace, tasks: list[str], task_manager: Any, out_dir: Path
) -> tuple[dict, dict[str, Path]]:
    """One lmms-eval run, saved the way its CLI saves one (results JSON + samples JSONL per task); returns the
    results and each task's samples log of this run. lmms-eval never removes earlier runs' logs from
    `out_dir`, so the table names the one it was computed from."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers.evaluation_tracker import EvaluationTracker
    from lmms_eval.utils import get_datetime_str

    settings = model.settings
    model_args = f"pretrained={args.model},query={str(settings['query']).lower()},budget={settings['budget']}"
    tracker = EvaluationTracker(output_path=str(out_dir))
    datetime_str = get_datetime_str()
    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        limit=args.limit,
        log_samples=True,
        evaluation_tracker=tracker,
        task_manager=task_manager,
        verbosity="WARNING",
        datetime_str=datetime_str,
    )
    # The tracker edits the sample records it writes (drops `doc`, unwraps responses): give it copies.
    samples = {task: [dict(sample) for sample in records] for task, records in results["samples"].items()}
    saved = {key: value for key, value in results.items() if key != "samples"}
    tracker.save_results_aggregated(results=saved, samples=samples, datetime_str=datetime_str)
    logs = {}
    for task in saved["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
        written = sorted(out_dir.rglob(f"{tracker.date_id}_samples_{task}.jsonl"))
        if len(written) == 1:
            logs[task] = written[0]
    return results, logs


def _summarise(results: dict) -> dict[str, dict[str, Any]]:
    """Per task: its first metric as the accuracy, visual token statistics from the samples, answers/s."""
    latency = (results.get("throughput") or {}).get("avg_latency")
    answers_per_s = 1.0 / latency if latency else math.nan
    summaries = {}
    for task, samples in results["samples"].items():
        metric, accuracy = _primary_metric(results, task)
        records = [s["token_counts"][0] if s.get("token_counts") and s["token_counts"][0] else {} for s in samples]
        counts = [r["visual_tokens"] for r in records if isinstance(r.get("visual_tokens"), int)]
        summaries[task] = {
            "metric": metric,
            "accuracy": accuracy,
            "n": len(samples),
            "mean_visual_tokens": statistics.fmean(counts) if counts else math.nan,
            "median_visual_tokens": float(statistics.median(counts)) if counts else math.nan,
            "max_visual_tokens": max(counts) if counts else math.nan,
            "answers_per_s": answers_per_s,
            "errors": sum(1 for r in records if r.get("error")),
        }
    return summaries


def _primary_metric(results: dict, task: str) -> tuple[str, float]:
    """The first metric of the task's metric_list that has a number (lmms-eval keys it 'metric,filter')."""
    values = results["results"].get(task, {})
    for entry in results["configs"].get(task, {}).get("metric_list") or []:
        name = entry.get("metric")
        for key, value in values.items():
            if key.split(",")[0] == name and isinstance(value, (int, float)) and "_stderr" not in key:
                return str(name), float(value)
    raise ValueError(f"task {task}: no numeric metric in its results ({sorted(values)})")


def _question_ids(samples: Sequence[dict]) -> list[str]:
    return [str(s["doc"]["question_id"]) for s in samples if "question_id" in s.get("doc", {})]


def _blind_rows(shapes_dir: Path, evaluated_ids: dict[str, list[str]]) -> list[dict[str, Any]]:
    """The question-only majority baseline, learnt from the training annotations, on the evaluated questions."""
    from dove_vlm.shapes import blind_baseline_accuracy

    train = _read_annotations(shapes_dir / "train" / "annotations.json")
    test = {str(r["question_id"]): r for r in _read_annotations(shapes_dir / "test" / "annotations.json")}
    rows = []
    for task, ids in evaluated_ids.items():
        if not task.startswith(SHAPES_TASK_PREFIX):
            continue
        missing = [i for i in ids if i not in test]
        if missing:
            raise ValueError(f"{shapes_dir}/test/annotations.json lacks evaluated question ids, e.g. {missing[0]}")
        accuracy = blind_baseline_accuracy(train, [test[i] for i in ids])
        rows.append({"setting": "blind", "task": task, "query": "", "budget": "", "metric": "majority answer",
                     "accuracy": accuracy, "n": len(ids), "mean_visual_tokens": 0.0, "median_visual_tokens": 0.0,
                     "max_visual_tokens": 0.0, "answers_per_s": math.nan, "errors": 0, "samples_log": ""})  # fmt: skip
    return rows


def _read_annotations(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the blind baseline needs the make-shapes annotations)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


# ---------------------------------------------------------------------------------------------- outputs


def _write_table(rows: list[dict[str, Any]], output: Path) -> None:
    with open(output / "results.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row[k]) for k in COLUMNS})
    header = ("task", "query", "budget", "accuracy", "mean tokens", "median", "max", "answers/s", "n", "errors")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        query = "blind (question only)" if row["setting"] == "blind" else row["query"]
        cells = (row["task"], query, row["budget"], _fmt(row["accuracy"], 4), _fmt(row["mean_visual_tokens"], 2),
                 _fmt(row["median_visual_tokens"], 1), _fmt(row["max_visual_tokens"], 0),
                 _fmt(row["answers_per_s"], 2), str(row["n"]), str(row["errors"]))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    (output / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        for query, style in (("on", "o-"), ("off", "s--")):
            points = sorted(
                (r["mean_visual_tokens"], r["accuracy"], r["budget"])
                for r in task_rows
                if r["query"] == query and not math.isnan(r["mean_visual_tokens"])
            )
            if not points:
                continue
            xs, ys, _ = zip(*points)
            axis.plot(xs, ys, style, label=f"query {query}")
            for x, y, label in points:
                axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for blind in (r for r in task_rows if r["setting"] == "blind"):
            axis.axhline(blind["accuracy"], color="grey", linestyle=":", label="blind (question only)")
        metric = task_rows[0]["metric"] if task_rows else "accuracy"
        axis.set(title=task, xlabel="mean visual tokens per answer", ylabel=metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------- helpers


def _budget_list(text: str) -> list[str | int]:
    """'auto,8,16' -> ['auto', 8, 16], with an argparse error naming a bad item."""
    budgets: list[str | int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "auto":
            budgets.append("auto")
            continue
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is neither 'auto' nor an integer (e.g. auto,8,16)") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"budget {value} must be at least 1")
        budgets.append(value)
    if not budgets:
        raise argparse.ArgumentTypeError("expected at least one budget, like auto,8,16")
    return list(dict.fromkeys(budgets))


def _default_task_dir() -> Path:
    """The task folders shipped inside the package (`dove_vlm.lmms_tasks`), found wherever it is installed."""
    from dove_vlm.lmms_tasks import TASKS_DIR

    if not any(TASKS_DIR.glob("*/*.yaml")):
        raise FileNotFoundError(f"no lmms-eval task folders in {TASKS_DIR} (a broken install?); pass --include-path")
    return TASKS_DIR


def _shapes_dir(value: str | None) -> Path:
    value = value or os.environ.get(SHAPES_DIR_ENV)
    if not value:
        raise ValueError(f"the shapes tasks need --shapes-dir DIR or ${SHAPES_DIR_ENV} (a make-shapes output)")
    path = Path(value).expanduser()
    if not (path / "test" / "vqa.parquet").is_file():
        raise FileNotFoundError(f"--shapes-dir: {path}/test/vqa.parquet does not exist (run dove-vlm make-shapes)")
    return path


def _csv_value(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)
