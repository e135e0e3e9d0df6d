"""`dove-vlm demo`: run the recipe's commands in order, each as its own process with its log, then the report.

A re-run step starts over: the training steps pass `--overwrite`, since they refuse a folder holding an
earlier run unless told to discard it (or to `--resume` it). The recipe, the measurements and the report
live in `demo_recipe`, `demo_measure` and `report`; the names below are re-exported so that
`dove_vlm.demo` stays the one place a user imports the demo from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo_measure import machine_description, measure_demo
from .demo_recipe import (
    DEEPSPEED_CONFIG,
    DEMO_TOKENIZER_MODEL,
    FAST,
    FULL,
    RECIPES,
    STEP_NAMES,
    DemoPaths,
    DemoRecipe,
    DemoStep,
    build_steps,
    deepspeed_config,
    write_tokenizer_config,
)
from .report import write_report

__all__ = [
    "DEEPSPEED_CONFIG",
    "DEMO_TOKENIZER_MODEL",
    "FAST",
    "FULL",
    "RECIPES",
    "STEP_NAMES",
    "DemoPaths",
    "DemoRecipe",
    "DemoStep",
    "DemoStepError",
    "DemoSummary",
    "StepTiming",
    "build_steps",
    "deepspeed_config",
    "load_state",
    "parse_steps",
    "run_demo",
    "save_state",
    "write_tokenizer_config",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoStepError(RuntimeError):
    """A step's command failed; the message names the step, its exit status and its log."""


@dataclass
class StepTiming:
    name: str
    title: str
    command: str
    seconds: float
    log: str | None = None


@dataclass
class DemoSummary:
    out_dir: Path
    recipe: DemoRecipe
    timings: list[StepTiming]
    report: Path | None


def run_command(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """Run one command, its output shown live (progress bars included) and kept in `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env)
        assert process.stdout is not None
        out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
        while True:
            chunk = process.stdout.read1(65536) if hasattr(process.stdout, "read1") else process.stdout.read(4096)
            if not chunk:
                break
            log.write(chunk)
            if out is not None:
                out.write(chunk)
                out.flush()
        return process.wait()


def _tail(path: Path, lines: int = 30) -> str:
    """The last non-empty lines of a log (progress-bar redraws split into lines)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    except OSError:
        return ""
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def load_state(paths: DemoPaths) -> dict[str, Any]:
    if not paths.state.is_file():
        return {}
    try:
        return json.loads(paths.state.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def save_state(paths: DemoPaths, recipe: DemoRecipe, timings: dict[str, dict[str, Any]]) -> None:
    state = {
        "recipe": recipe.to_dict(),
        "timings": timings,
        "machine": machine_description(),
    }
    paths.state.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def parse_steps(text: str | None) -> list[str]:
    if not text:
        return list(STEP_NAMES)
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [n for n in names if n not in STEP_NAMES]
    if unknown or not names:
        raise ValueError(f"--steps: unknown step(s) {unknown}; choose from {', '.join(STEP_NAMES)}")
    return [n for n in STEP_NAMES if n in names]


def run_demo(
    out_dir: str | os.PathLike,
    fast: bool = False,
    steps: Sequence[str] | None = None,
    progress: bool = True,
    seed: int | None = None,
) -> DemoSummary:
    """Run the demo's steps (all by default) into `out_dir` and write the report; returns the timings.

    `seed` seeds every step (data, tokenizer, LLM, both stages); None keeps the recipe's, or, when re-running
    some steps, the seed the directory was made with, so the steps of one directory always share one seed."""
    from tqdm.auto import tqdm

    recipe = FAST if fast else FULL
    paths = DemoPaths(Path(out_dir).expanduser().resolve())
    paths.root.mkdir(parents=True, exist_ok=True)
    selected = list(steps) if steps is not None else list(STEP_NAMES)
    state = load_state(paths)
    partial = set(selected) != set(STEP_NAMES)
    saved = state.get("recipe", {})
    if saved.get("name") not in (None, recipe.name) and partial:
        raise ValueError(
            f"{paths.root} holds a '{saved['name']}' demo; re-run its steps with the same "
            f"{'--fast' if saved['name'] == 'fast' else 'recipe (no --fast)'}, or use another --out"
        )
    if partial and "seed" in saved:
        if seed is not None and seed != saved["seed"]:
            raise ValueError(
                f"{paths.root} was made with --seed {saved['seed']}; re-run its steps with that seed, or use "
                "another --out"
            )
        seed = saved["seed"]
    if seed is not None:
        if seed < 0:
            raise ValueError(f"--seed must be >= 0, got {seed}")
        recipe = dataclasses.replace(recipe, seed=seed)
    plan = [s for s in build_steps(recipe, paths, progress=progress) if s.name in selected]
    timings: dict[str, dict[str, Any]] = dict(state.get("timings", {})) if set(selected) != set(STEP_NAMES) else {}
    bar = tqdm(plan, desc=f"dove-vlm demo ({recipe.name})", unit="step", disable=not progress, position=0)
    report_path = None
    for step in bar:
        bar.set_postfix_str(step.name)
        print(f"\n=== demo step {step.name}: {step.title}\n$ {step.command_line}\n", flush=True)
        started = time.perf_counter()
        log = None
        if step.before is not None:
            step.before()
        if step.argv is not None:
            log = paths.logs / f"{step.name}.log"
            argv = [a.replace("{port}", str(_free_port())) for a in step.argv]
            code = run_command(argv, log, env=step.env)
            if code != 0:
                save_state(paths, recipe, timings)
                raise DemoStepError(
                    f"demo step '{step.name}' failed (exit status {code}); its log is {log}\n"
                    f"command: {step.command_line}\n--- last lines ---\n{_tail(log)}"
                )
        else:
            measured = measure_demo(paths, recipe)
            report_path = write_report(paths, recipe, build_steps(recipe, paths), timings, measured, started)
        seconds = time.perf_counter() - started
        timings[step.name] = dataclasses.asdict(
            StepTiming(step.name, step.title, step.command_line, seconds, str(log) if log else None)
        )
        save_state(paths, recipe, timings)
    bar.close()
    ordered = [StepTiming(**timings[n]) for n in STEP_NAMES if n in timings]
    return DemoSummary(paths.root, recipe, ordered, report_path)
