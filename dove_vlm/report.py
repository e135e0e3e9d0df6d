"""The demo's report: report.md and its PNG figures, rendered from `DemoMeasurements`.

Nothing here runs a model or reads the steps' outputs (`dove_vlm.demo_measure` does): the report states
the numbers whatever they are, and the accuracy check says plainly whether the margin was reached.

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

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizer.evaluation.loss_curve import LOSS_CURVE_FILE
from tokenizer.training.loop import LOGS_DIR

from .demo_measure import (
    NEEDS_TOKENS_GAIN,
    REQUIRED_MARGIN,
    AccuracyCheck,
    DemoMeasurements,
    EvalRow,
    LengthStudy,
    ReconstructionStudy,
    full_budget_of,
    setting_name,
    type_gains,
    verdict,
)
from .demo_recipe import DemoPaths, DemoRecipe, DemoStep

FIGURES = {
    "reconstructions": "reconstructions.png",
    "length": "length_vs_complexity.png",
    "accuracy": "accuracy_vs_tokens.png",
    "by_type": "accuracy_by_type.png",
    "budget_by_type": "accuracy_vs_budget_by_type.png",
}


# ---------------------------------------------------------------------------------------------- figures


def _save_figure(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


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
    return _save_figure(plt, figure, path)


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
    return _save_figure(plt, figure, path)


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
    return _save_figure(plt, figure, path)


def plot_accuracy_vs_budget_by_type(
    rows: Sequence[EvalRow], accuracy: Mapping[str, Mapping[str, float]], path: Path
) -> Path:
    """One curve per question type: accuracy against the fixed budget (query on), its blind baseline dotted and
    its automatic-length accuracy as a star at the mean tokens it spent."""
    plt = _pyplot()
    budgets = sorted({int(r.budget) for r in rows if r.query == "on" and r.budget.isdigit()})
    auto = next((r for r in rows if (r.query, r.budget) == ("on", "auto")), None)
    types = list(accuracy.get("blind", {})) or sorted({t for v in accuracy.values() for t in v})
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, question_type in enumerate(types):
        colour = f"C{index}"
        values = [accuracy.get(setting_name("on", str(b)), {}).get(question_type, math.nan) for b in budgets]
        axis.plot(budgets, values, "o-", color=colour, label=question_type)
        if question_type in accuracy.get("blind", {}):
            axis.axhline(accuracy["blind"][question_type], color=colour, linestyle=":", alpha=0.7)
        if auto is not None:
            value = accuracy.get(setting_name("on", "auto"), {}).get(question_type, math.nan)
            axis.plot([auto.mean_tokens], [value], marker="*", markersize=13, color=colour, linestyle="none")
    axis.set_xscale("log", base=2)
    axis.set_xticks(budgets, [str(b) for b in budgets])
    axis.set(xlabel="visual tokens (fixed budget; star: automatic length, all types' mean)",
             ylabel="exact-match accuracy", ylim=(0, 1),
             title="Accuracy per question type against the budget (dotted: blind)")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    return _save_figure(plt, figure, path)


# ---------------------------------------------------------------------------------------------- markdown


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _num(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_report(
    paths: DemoPaths,
    recipe: DemoRecipe,
    steps: Sequence[DemoStep],
    timings: Mapping[str, Mapping[str, Any]],
    measured: DemoMeasurements,
    started: float | None = None,
) -> Path:
    """Draw the figures and write DIR/report.md from the measurements; returns its path."""
    from tokenizer.evaluation.visualize import save_reconstruction_grid

    started = time.perf_counter() if started is None else started
    figures = paths.figures
    figures.mkdir(parents=True, exist_ok=True)
    save_reconstruction_grid(measured.grid, figures / FIGURES["reconstructions"], cell=96)
    plot_length_vs_complexity(measured.lengths, figures / FIGURES["length"])
    plot_accuracy_vs_tokens(measured.rows, measured.blind, figures / FIGURES["accuracy"])
    plot_accuracy_by_type(measured.by_type, figures / FIGURES["by_type"])
    plot_accuracy_vs_budget_by_type(measured.rows, measured.by_type, figures / FIGURES["budget_by_type"])
    all_timings = dict(timings)
    all_timings["report"] = {"seconds": time.perf_counter() - started}
    paths.report.write_text(render_markdown(paths, recipe, steps, all_timings, measured), encoding="utf-8")
    return paths.report


def render_check(check: AccuracyCheck | None) -> list[str]:
    """The report's check paragraph: the headline accuracy, the blind baseline, the margin and its verdict."""
    if check is None:
        return ["No check: the evaluation has no query-on automatic-length row or no blind baseline.", ""]
    return [
        (
            f"VQA accuracy on {check.n} held-out questions (scenes never seen in training), query on, automatic "
            f"length: **{_pct(check.accuracy)}**. Blind baseline on the same questions (the majority training "
            f"answer for each question's wording, no image): **{_pct(check.blind)}**. Margin: "
            f"**{100 * check.margin:+.1f} points** against the {100 * REQUIRED_MARGIN:.0f} required: "
            f"**{verdict(check)}**."
        ),
        "",
    ]


def _findings_section(measured: DemoMeasurements) -> list[str]:
    def status(met: bool | None) -> str:
        return "not measured" if met is None else ("yes" if met else "**no**")

    return [
        "What variable length bought in this run (aims beside the check; they do not change its verdict):",
        "",
        *_table(
            ["aim", "target", "measured", "met"],
            [[f.aim, f.target, f.measured, status(f.met)] for f in measured.findings],
        ),
        "",
    ]


def render_markdown(
    paths: DemoPaths,
    recipe: DemoRecipe,
    steps: Sequence[DemoStep],
    timings: Mapping[str, Mapping[str, Any]],
    measured: DemoMeasurements,
) -> str:
    data, machine, check = measured.data, measured.machine, measured.check
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
    lines += render_check(check)
    lines += _findings_section(measured)
    lines += [
        "## Data",
        "",
        (
            f"`dove-vlm make-shapes`: {data.n_scenes} scenes of 1 to {recipe.max_objects} shapes at 64 px"
            + (f", object sizes x{recipe.object_scale:g}" if recipe.object_scale != 1.0 else "")
            + f" ({data.n_train} train, {data.n_test} held out), {recipe.questions_per_image} questions per scene "
            f"({', '.join(recipe.question_types) if recipe.question_types else 'every type'}): "
            f"{data.train_questions} training and {data.test_questions} held-out questions."
        ),
        "",
    ]
    lines += _tokenizer_section(paths, recipe, measured)
    lines += _vlm_section(paths, recipe, measured.stages)
    lines += _eval_section(measured.rows, measured.blind, measured.by_type, measured.type_tokens,
                           measured.type_counts)  # fmt: skip
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
            f"{'CUDA available' if machine.get('cuda') else 'no GPU used'}, BLAS {machine.get('blas', 'unknown')}. "
            f"Seed {recipe.seed} (`--seed`). The same seed on this machine gives the same accuracy tables; another "
            "machine can differ through "
            "its thread count and BLAS (the order of floating-point sums), which move training by small amounts "
            "that the count questions can amplify. Answers/s depend on the machine's load."
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


def _tokenizer_section(paths: DemoPaths, recipe: DemoRecipe, measured: DemoMeasurements) -> list[str]:
    config, recon, lengths, rows = measured.tokenizer, measured.reconstruction, measured.lengths, measured.rows
    metrics = config.metrics
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
        *_loss_curves(paths, {"tokenizer": paths.tokenizer_run / LOGS_DIR / LOSS_CURVE_FILE}),
        f"![reconstructions](figures/{FIGURES['reconstructions']})",
        "",
        (
            "Held-out scenes (rows, simplest first) decoded from the first k tokens (columns), and from the length the "
            "EOS head chose (last column)."
        ),
        "",
        (
            f"Reconstruction quality on the {recon.n_images} held-out images: mean per-image PSNR (dB, higher is "
            "better; the number `dove-vlm eval-recon` reports):"
        ),
        "",
        *_table(
            [*(f"{b} tokens" for b in recon.budgets), f"automatic (mean {recon.mean_auto_length:.1f} tokens)"],
            [[*(_num(recon.psnr[str(b)], 2) for b in recon.budgets), _num(recon.psnr["auto"], 2)]],
        ),
        "",
        *_shape_lines(recon),
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


def _vlm_section(paths: DemoPaths, recipe: DemoRecipe, stages: Mapping[str, Mapping[str, Any] | None]) -> list[str]:
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
    for name, record in stages.items():
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
    lines += _loss_curves(paths, {"stage 1": paths.stage1 / LOSS_CURVE_FILE, "stage 2": paths.stage2 / LOSS_CURVE_FILE})
    return lines


def _shape_lines(recon: ReconstructionStudy) -> list[str]:
    """Does each object keep its shape? `shapes.classify_shape` on the inputs (at the tokenizer's resolution)
    and on the reconstructions; it guesses among five shapes, so 20% is chance."""
    if not recon.shape_accuracy:
        return []
    keys = ["input", *(str(b) for b in recon.budgets), "auto"]
    return [
        (
            f"Shapes kept: the share of the {recon.n_objects} held-out objects whose shape a fixed template probe "
            "(`dove_vlm.shapes.classify_shape`: the five shapes drawn in the object's box, the best match to the "
            "object's colour wins; chance 20%) reads correctly, on the input at the tokenizer's resolution and on "
            "each reconstruction:"
        ),
        "",
        *_table(
            ["input", *(f"{b} tokens" for b in recon.budgets), "automatic"],
            [[_pct(recon.shape_accuracy[k]) if k in recon.shape_accuracy else "-" for k in keys]],
        ),
        "",
    ]


def _loss_curves(paths: DemoPaths, curves: Mapping[str, Path]) -> list[str]:
    """Links to the loss curves the training commands drew beside their outputs (those that exist)."""
    shown = [(name, path) for name, path in curves.items() if path.is_file()]
    if not shown:
        return []
    images = " ".join(f"![{name} loss]({path.relative_to(paths.root).as_posix()})" for name, path in shown)
    return [
        f"Loss curves ({', '.join(name for name, _ in shown)}), as the training commands logged them:",
        "",
        images,
        "",
    ]


def _eval_section(
    rows: Sequence[EvalRow],
    blind: EvalRow | None,
    by_type: Mapping[str, Mapping[str, float]],
    type_tokens: Mapping[str, Mapping[str, float]],
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
            *_budget_by_type_table(rows, by_type, type_tokens, type_counts),
        ]
    return lines


def _budget_by_type_table(
    rows: Sequence[EvalRow],
    by_type: Mapping[str, Mapping[str, float]],
    type_tokens: Mapping[str, Mapping[str, float]],
    type_counts: Mapping[str, int],
) -> list[str]:
    """Per question type: accuracy at each fixed budget (query on), at the automatic length with the query on and
    off (with the mean tokens it spent), the blind baseline, and whether the type needs more than one token."""
    budgets = sorted({int(r.budget) for r in rows if r.query == "on" and r.budget.isdigit()})
    full = full_budget_of(rows)
    gains = type_gains(by_type, rows)
    types = list(by_type.get("blind", {})) or sorted({t for v in by_type.values() for t in v})

    def auto(query: str, question_type: str) -> str:
        key = setting_name(query, "auto")
        accuracy = by_type.get(key, {}).get(question_type, math.nan)
        return f"{_pct(accuracy)} ({_num(type_tokens.get(key, {}).get(question_type, math.nan), 2)})"

    def needs(question_type: str) -> str:
        if question_type not in gains:
            return "-"
        return "yes" if gains[question_type] >= NEEDS_TOKENS_GAIN else "no"

    table = [
        [f"{t} ({type_counts.get(t, '-')})",
         *(_pct(by_type.get(setting_name("on", str(b)), {}).get(t, math.nan)) for b in budgets),
         auto("on", t), auto("off", t), _pct(by_type.get("blind", {}).get(t, math.nan)),
         "-" if t not in gains else f"{100 * gains[t]:+.1f}", needs(t)]
        for t in types
    ]  # fmt: skip
    header = ["question type (questions)", *(f"{b} token{'s' if b > 1 else ''}" for b in budgets),
              "auto, query on (tokens)", "auto, query off (tokens)", "blind",
              f"1 -> {full} tokens (points)", f"needs tokens (>= +{100 * NEEDS_TOKENS_GAIN:.0f})"]  # fmt: skip
    return [
        "Accuracy per question type against the budget (fixed budgets with the query on):",
        "",
        *_table(header, table),
        "",
        f"![accuracy vs budget per type](figures/{FIGURES['budget_by_type']})",
        "",
    ]
