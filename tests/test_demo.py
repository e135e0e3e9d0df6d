"""The offline demo: its plan of commands, the report's accuracy check, the tiny-LLM command, and (slow) the whole
`dove-vlm demo --fast` run with every figure and table of its report."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dove_vlm.cli import main as cli_main
from dove_vlm.demo import FAST, FULL, STEP_NAMES, DemoPaths, build_steps, parse_steps, write_tokenizer_config
from dove_vlm.demo_measure import REQUIRED_MARGIN, EvalRow, accuracy_check, variable_length_findings
from dove_vlm.report import FIGURES, render_check
from tokenizer.training.config import load_training_file

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("recipe", [FULL, FAST], ids=["full", "fast"])
def test_every_step_is_a_dove_vlm_command_writing_under_the_output_dir(recipe, tmp_path):
    paths = DemoPaths(tmp_path / "demo")
    steps = build_steps(recipe, paths)
    assert [s.name for s in steps] == list(STEP_NAMES)
    for step in steps:
        line = step.command_line
        assert line.startswith(("dove-vlm ", "deepspeed ")), line
        if step.argv is not None:
            assert str(tmp_path / "demo") in line
    by_name = {s.name: s for s in steps}
    for stage in ("stage1", "stage2"):
        line = by_name[stage].command_line
        assert "--module dove_vlm.cli finetune" in line and "--deepspeed zero2" in line, line
    assert "--stage 2 --model " + str(paths.stage1) in by_name["stage2"].command_line
    assert ("--lora" in by_name["stage2"].display) == recipe.stage2_lora
    evaluation = by_name["eval"].display
    assert evaluation[evaluation.index("--query") + 1] == "both"
    budgets = evaluation[evaluation.index("--budgets") + 1].split(",")
    assert budgets[0] == "auto" and len(budgets) >= 3


def test_the_fast_recipe_plans_a_smaller_run_than_the_full_one(tmp_path):
    """What the fast demo actually runs (its make-shapes command, its tokenizer training file) is smaller."""

    def planned(recipe, name):
        steps = {s.name: s for s in build_steps(recipe, DemoPaths(tmp_path / name))}
        shapes = steps["data"].display
        config = load_training_file(write_tokenizer_config(recipe, tmp_path / f"{name}.yaml"))
        return int(shapes[shapes.index("--n") + 1]), config.train.max_steps

    fast_images, fast_steps = planned(FAST, "fast")
    full_images, full_steps = planned(FULL, "full")
    assert (fast_images, fast_steps) == (FAST.n_images, FAST.tokenizer_train["max_steps"])
    assert (full_images, full_steps) == (FULL.n_images, FULL.tokenizer_train["max_steps"])
    assert fast_images < full_images and fast_steps < full_steps


def test_steps_are_parsed_in_pipeline_order_and_unknown_names_are_refused():
    assert parse_steps(None) == list(STEP_NAMES)
    assert parse_steps("report,eval") == ["eval", "report"]
    with pytest.raises(ValueError, match="unknown step"):
        parse_steps("eval,plot")


def test_the_tokenizer_config_is_a_training_file_train_tokenizer_accepts(tmp_path):

    setup = load_training_file(write_tokenizer_config(FULL, tmp_path / "tokenizer.yaml"))
    assert setup.model.preset == FULL.tokenizer_model["preset"]
    assert setup.model.overrides["image_size"] == FULL.tokenizer_model["overrides"]["image_size"]
    assert setup.train.max_steps == FULL.tokenizer_train["max_steps"]


def test_re_running_steps_refuses_a_directory_made_with_the_other_recipe(tmp_path):
    from dove_vlm.demo import run_demo, save_state

    paths = DemoPaths(tmp_path)
    save_state(paths, FULL, {})
    with pytest.raises(ValueError, match="'full' demo"):
        run_demo(tmp_path, fast=True, steps=["report"], progress=False)


def test_a_seed_reaches_every_seeded_step_and_re_runs_keep_the_directorys_seed(tmp_path, monkeypatch):
    import dataclasses

    from dove_vlm import demo

    seeded = build_steps(dataclasses.replace(FULL, seed=3), DemoPaths(tmp_path))
    for name in ("data", "llm", "stage1", "stage2"):
        [step] = [s for s in seeded if s.name == name]
        assert step.argv[step.argv.index("--seed") + 1] == "3", name
    config = write_tokenizer_config(dataclasses.replace(FULL, seed=3), tmp_path / "tokenizer.yaml")
    assert load_training_file(config).train.seed == 3
    demo.save_state(DemoPaths(tmp_path), dataclasses.replace(FULL, seed=3), {})
    with pytest.raises(ValueError, match="made with --seed 3"):
        demo.run_demo(tmp_path, steps=["report"], progress=False, seed=4)
    planned = []
    monkeypatch.setattr(demo, "build_steps", lambda recipe, paths, progress=True: planned.append(recipe.seed) or [])
    demo.run_demo(tmp_path, steps=["report"], progress=False)
    assert planned == [3]


def _imported_modules(module: str) -> set[str]:
    """The dove_vlm modules a dove_vlm module imports (at any depth of its code, lazily or not)."""
    import ast

    tree = ast.parse((REPO / "dove_vlm" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dove_vlm."):
            found.add(node.module.split(".", 1)[1])
    return found


def test_the_demo_modules_import_one_way_recipe_then_measurements_then_report_then_runner():
    assert _imported_modules("demo_recipe") == set()
    assert _imported_modules("demo_measure") <= {"demo_recipe", "shapes"}
    assert _imported_modules("report") <= {"demo_recipe", "demo_measure"}
    assert "report" in _imported_modules("demo")


# ---------------------------------------------------------------------------------------------- the check


def _row(query: str, budget: str, accuracy: float, n: int) -> EvalRow:
    setting = "blind" if not query else f"query-{query}_budget-{budget}"
    return EvalRow(setting, query, budget, accuracy, n, 8.0, 8.0, 12.0, 10.0)


def test_the_accuracy_check_uses_query_on_automatic_length_against_the_blind_row():
    rows = [_row("on", "auto", 0.80, 100), _row("off", "auto", 0.95, 100), _row("on", "4", 0.99, 100)]
    check = accuracy_check(rows, _row("", "", 0.40, 100))
    assert check.accuracy == 0.80 and check.blind == 0.40
    assert math.isclose(check.margin, 0.40) and check.passed
    failing = accuracy_check([_row("on", "auto", 0.40 + REQUIRED_MARGIN - 0.01, 100)], _row("", "", 0.40, 100))
    assert not failing.passed


def test_the_accuracy_check_refuses_a_blind_baseline_from_other_questions():
    with pytest.raises(ValueError, match="not the same split"):
        accuracy_check([_row("on", "auto", 0.8, 100)], _row("", "", 0.4, 90))


def test_the_report_says_not_reached_for_results_below_the_line_and_passed_above_it():
    blind = _row("", "", 0.40, 100)
    below = "\n".join(render_check(accuracy_check([_row("on", "auto", 0.40 + REQUIRED_MARGIN - 0.001, 100)], blind)))
    assert "**NOT REACHED**" in below and "PASSED" not in below
    assert "+29.9 points" in below
    above = "\n".join(render_check(accuracy_check([_row("on", "auto", 0.40 + REQUIRED_MARGIN + 0.001, 100)], blind)))
    assert "**PASSED**" in above and "NOT REACHED" not in above


def _tokens_row(query: str, budget: str, accuracy: float, tokens: float) -> EvalRow:
    return EvalRow(f"query-{query}_budget-{budget}", query, budget, accuracy, 100, tokens, tokens, tokens, 10.0)


def test_what_variable_length_bought_is_judged_from_the_numbers_alone():
    rows = [_tokens_row("on", "1", 0.60, 1), _tokens_row("on", "8", 0.80, 8), _tokens_row("on", "auto", 0.79, 3),
            _tokens_row("off", "auto", 0.80, 5)]  # fmt: skip
    by_type = {"query-on_budget-1": {"colour": 0.9, "count": 0.3}, "query-on_budget-8": {"colour": 0.9, "count": 0.7}}
    check = accuracy_check(rows, _row("", "", 0.40, 100))
    met = [f.met for f in variable_length_findings(rows, by_type, 0.6, check)]
    assert met == [True, True, True, True, True]  # +40 on count; 37.5% of the tokens; rho 0.6; 40% fewer; +39
    flat = {"query-on_budget-1": {"colour": 0.9, "count": 0.7}, "query-on_budget-8": {"colour": 0.9, "count": 0.8}}
    costly = [*rows[:2], _tokens_row("on", "auto", 0.70, 6), _tokens_row("off", "auto", 0.80, 7)]
    findings = variable_length_findings(costly, flat, float("nan"), accuracy_check(costly, _row("", "", 0.40, 100)))
    assert [f.met for f in findings] == [False, False, None, False, False]
    assert "count +10.0" in findings[0].measured
    # the sixth aim, judged only when the shape probe ran: the full budget keeps 90% of the input's reading
    kept = variable_length_findings(rows, by_type, 0.6, check, {"input": 0.96, "1": 0.30, "8": 0.90})
    lost = variable_length_findings(rows, by_type, 0.6, check, {"input": 0.96, "1": 0.30, "8": 0.80})
    assert (len(kept), kept[-1].met, lost[-1].met) == (6, True, False)
    assert "90.0% (30.0% at one token)" in kept[-1].measured


# ---------------------------------------------------------------------------------------------- make-tiny-llm


def test_make_tiny_llm_writes_a_model_and_tokenizer_that_load_back(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dove_vlm.shapes import make_shapes

    summary = make_shapes(tmp_path / "shapes", n=6, seed=0, test_fraction=0.0, progress=False)
    out = tmp_path / "llm"
    code = cli_main(["make-tiny-llm", "--data", str(summary.llava["train"]), "--output", str(out),
                     "--hidden", "32", "--layers", "1", "--heads", "2", "--vocab-size", "300"])  # fmt: skip
    assert code == 0
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert "<image>" in tokenizer.get_vocab() and tokenizer.chat_template


def test_make_tiny_llm_names_a_bad_argument(tmp_path, capsys):
    assert cli_main(["make-tiny-llm", "--data", str(tmp_path / "missing.json"), "--output", str(tmp_path)]) == 2
    assert "missing.json" in capsys.readouterr().err
    data = tmp_path / "data.json"
    data.write_text("[]")
    assert cli_main(["make-tiny-llm", "--data", str(data), "--output", str(tmp_path / "o"), "--hidden", "30"]) == 2


# ---------------------------------------------------------------------------------------------- the demo


def _table_after(text: str, heading: str) -> list[list[str]]:
    """The first markdown table after `heading`, as rows of cells (header first, separator dropped)."""
    section = text.split(heading, 1)[1]
    rows = []
    for line in section.splitlines():
        if line.startswith("|"):
            if set(line) <= {"|", "-"}:
                continue
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def _held_out_length_spearman(out: Path) -> str:
    """Spearman's rho between the trained tokenizer's automatic lengths (no query) and the object counts of
    the held-out scenes, computed here from the demo's files, as the report prints it ("n/a" when either
    side is constant, so no ranking exists)."""
    import torch
    from scipy.stats import spearmanr

    from tokenizer import DoveTokenizer

    paths = DemoPaths(out)
    scenes = [s for s in json.loads((paths.data / "scenes.json").read_text()) if s["split"] == "test"]
    model = DoveTokenizer.from_pretrained(paths.tokenizer).eval()
    lengths = []
    with torch.no_grad():
        for start in range(0, len(scenes), 64):
            chunk = [str(paths.images / f"{s['image_id']}.png") for s in scenes[start : start + 64]]
            lengths += model.encode(chunk).lengths.tolist()
    counts = [s["n_objects"] for s in scenes]
    if len(set(lengths)) < 2 or len(set(counts)) < 2:
        return "n/a"
    return f"{spearmanr(lengths, counts).statistic:.2f}"


def _run_fast_demo(out: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dove_vlm.cli", "demo", "--fast", "--no-progress", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500, check=False)  # fmt: skip
    assert done.returncode == 0, f"demo failed:\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    return (out / "report.md").read_text()


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fast-demo") / "demo"
    _run_fast_demo(out)
    return out


def _accuracy_tables(report: str) -> list[list[list[str]]]:
    """The report's accuracy tables, without the answers/s column (a timing, not a result)."""
    evaluation = _table_after(report, "## Evaluation")
    speed = evaluation[0].index("answers/s")
    return [
        [row[:speed] + row[speed + 1 :] for row in evaluation],
        _table_after(report, "Accuracy per question type:"),
        _table_after(report, "Accuracy per question type against the budget"),
    ]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_accuracy_tables(fast_demo, tmp_path):
    first = (fast_demo / "report.md").read_text()
    second = _run_fast_demo(tmp_path / "again")
    assert _accuracy_tables(second) == _accuracy_tables(first)
    assert all(len(table) > 1 for table in _accuracy_tables(first))


@pytest.mark.slow
def test_the_fast_demo_runs_and_its_report_holds_every_figure_and_table(fast_demo):
    out = fast_demo
    report = (out / "report.md").read_text()

    for name in FIGURES.values():
        figure = out / "figures" / name
        assert f"(figures/{name})" in report
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # the loss curves the three training commands drew, shown where they lie
    for curve in ("tokenizer/logs/loss_curve.png", "vlm-stage1/loss_curve.png", "vlm-stage2/loss_curve.png"):
        assert f"]({curve})" in report and (out / curve).read_bytes()[:4] == b"\x89PNG", curve
    for heading in ("Reconstruction quality", "Shapes kept", "mean automatic length", "## Evaluation",
                    "Accuracy per question type",
                    "Accuracy per question type against the budget", "What variable length bought",
                    "## Time per step"):  # fmt: skip
        assert heading in report, heading
    [reported] = re.findall(r"Spearman rho = (-?\d\.\d\d|n/a) with the object count", report)
    assert reported == _held_out_length_spearman(out), "the report's Spearman figure is not the tokenizer's"

    # every step's command is listed, in order
    commands = re.findall(r"```bash\n(.+?)\n```", report)
    assert [c.split()[1] if c.startswith("dove-vlm") else "finetune" for c in commands] == [
        "make-shapes", "train-tokenizer", "make-tiny-llm", "finetune", "finetune", "eval-vqa", "demo",
    ]  # fmt: skip

    # the evaluation table: query on and off, automatic and fixed budgets, and the blind baseline
    table = _table_after(report, "## Evaluation")
    settings = {(row[0], row[1]) for row in table[1:]}
    for query in ("on", "off"):
        assert (query, "auto") in settings
        assert {(query, str(b)) for b in FAST.eval_budgets} <= settings
    assert any(row[0].startswith("blind") for row in table)

    # the accuracy check compares with the blind baseline recomputed here on the very questions evaluated
    from dove_vlm.shapes import blind_baseline_accuracy

    with open(out / "eval" / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    headline = next(r for r in rows if r["query"] == "on" and r["budget"] == "auto")
    blind = next(r for r in rows if r["setting"] == "blind")
    train = json.loads((out / "data" / "train" / "annotations.json").read_text())
    test = json.loads((out / "data" / "test" / "annotations.json").read_text())
    assert int(headline["n"]) == int(blind["n"]) == len(test)
    expected_blind = blind_baseline_accuracy(train, test)
    assert math.isclose(float(blind["accuracy"]), expected_blind)
    check = re.search(r"query on, automatic length: \*\*([\d.]+)%\*\*.*?same questions.*?\*\*([\d.]+)%\*\*", report,
                      re.DOTALL)  # fmt: skip
    assert check, "the report states the accuracy check"
    assert math.isclose(float(check.group(1)), 100 * float(headline["accuracy"]), abs_tol=0.05)
    assert math.isclose(float(check.group(2)), 100 * expected_blind, abs_tol=0.05)

    state = json.loads((out / "demo.json").read_text())
    assert set(state["timings"]) == set(STEP_NAMES)


def _write_samples_log(path: Path, outcomes: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"doc_id": i, "exact_match": hit, "token_counts": [{"visual_tokens": 1}]})
             for i, hit in enumerate(outcomes)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def test_per_type_accuracy_reads_the_samples_log_each_row_of_results_csv_names(tmp_path):
    from dove_vlm.demo_measure import EvalRow, per_type_results
    from dove_vlm.shapes import make_shapes

    data = tmp_path / "data"
    make_shapes(data, n=10, seed=0, progress=False)
    n_test = len(json.loads((data / "test" / "annotations.json").read_text()))
    eval_dir = tmp_path / "eval"
    setting = eval_dir / "runs" / "query-on_budget-1"
    this_run = "runs/query-on_budget-1/a__vlm-stage2/20260102_000000_samples_dove_shapes_vqa.jsonl"
    _write_samples_log(eval_dir / this_run, [1.0] * n_test)
    # an earlier evaluation of the same directory, newer on disk and sorting last by path
    _write_samples_log(setting / "z__vlm-stage2" / "20260101_000000_samples_dove_shapes_vqa.jsonl", [0.0] * n_test)
    # a setting of the earlier evaluation that this one did not run
    _write_samples_log(eval_dir / "runs" / "query-on_budget-16" / "m" / "samples_dove_shapes_vqa.jsonl", [0.0] * n_test)

    def row(setting_name: str, log: str) -> EvalRow:
        return EvalRow(setting_name, "on", "1", 1.0, n_test, 1.0, 1.0, 1.0, 10.0, samples_log=log)

    results = per_type_results(eval_dir, data, [row("query-on_budget-1", this_run)])
    assert set(results.accuracy) == {"query-on_budget-1", "blind"}
    fresh = results.accuracy["query-on_budget-1"]
    assert fresh and all(value == 1.0 for value in fresh.values())
    with pytest.raises(FileNotFoundError, match="query-off_budget-1"):
        per_type_results(eval_dir, data, [row("query-off_budget-1", "runs/query-off_budget-1/x_samples.jsonl")])
    with pytest.raises(FileNotFoundError, match="no such file lies under"):
        per_type_results(eval_dir, data, [row("query-on_budget-1", "../../outside_samples.jsonl")])
    with pytest.raises(ValueError, match="re-run the demo's eval step"):
        per_type_results(eval_dir, data, [row("query-on_budget-1", "")])
