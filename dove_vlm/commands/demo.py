"""`dove-vlm demo`: the offline end-to-end demo on the CPU, from generated data to report.md."""

from __future__ import annotations

import argparse

from ._args import output_dir

STEP_HELP = "data, tokenizer, llm, stage1, stage2, eval, report"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the offline end-to-end demo (data -> tokenizer -> VLM -> lmms-eval -> report.md) on the CPU",
        description="Generate shapes-VQA data, train the dove-tiny Q-DOVE tokenizer, fine-tune a tiny VLM "
        "(stage 1 projector, stage 2 full LLM) with DeepSpeed ZeRO-2 on the CPU, score it through lmms-eval "
        "with query on and off and at fixed budgets, and write OUT/report.md with its figures. Each step "
        "runs its own dove-vlm command, listed in the report.",
    )
    parser.add_argument(
        "--out", type=output_dir, default="outputs/demo", help="output directory (default outputs/demo)"
    )
    parser.add_argument("--fast", action="store_true", help="a smaller configuration that runs in a few minutes (CI)")
    parser.add_argument(
        "--steps",
        default=None,
        help=f"re-run only these steps, comma separated, with the recipe the directory was made with ({STEP_HELP})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of every step (default: the recipe's, 0; re-running steps keeps the directory's seed)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..demo import DemoStepError, parse_steps, run_demo

    steps = parse_steps(args.steps)
    try:
        summary = run_demo(args.out, fast=args.fast, steps=steps, progress=not args.no_progress, seed=args.seed)
    except DemoStepError as err:
        print(f"dove-vlm demo: {err}")
        return 1
    total = sum(t.seconds for t in summary.timings)
    print(f"\ndove-vlm demo ({summary.recipe.name}): {len(summary.timings)} steps, {total / 60:.1f} min in all")
    for timing in summary.timings:
        print(f"  {timing.name:<10} {timing.seconds:7.1f} s")
    if summary.report is not None:
        print(f"report: {summary.report}")
    return 0
