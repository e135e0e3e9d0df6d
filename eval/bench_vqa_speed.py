"""VQA answering speed: automatic lengths against the same model forced to the full length, queries on
against off. All four settings run side by side in one process on the same questions, so the ratios
compare like with like.

What an answer costs is mostly the LLM's prefill over the visual tokens plus a few decoding steps; the
tower runs once per image either way. Shorter visual sequences therefore pay off in proportion to the
LLM's share of the work, which grows with the LLM: use --llm-hidden / --llm-layers to see it.

Everything is offline: shapes-VQA questions, a dove-tiny tower whose EOS head is calibrated so lengths
depend on the image and the query (`calibrate_eos_head`), and a randomly initialised LLaMA-style LLM.
Answers are not scored here (the model is untrained); `dove-vlm eval-vqa` scores trained models.

    python eval/bench_vqa_speed.py --workdir /tmp/bench_vqa --questions 64 --llm-hidden 1024 --llm-layers 8
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm_training import prepare

from llava_adapter import DoveLlavaForCausalLM, add_image_token
from llava_adapter.inference import answer_questions


def run(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    paths = prepare(workdir, args.n_images, args.llm_hidden, args.llm_layers, seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    add_image_token(tokenizer)
    model = DoveLlavaForCausalLM.from_components(paths["llm"], paths["tower"], tokenizer=tokenizer).eval()
    records = json.loads(Path(paths["data"]).read_text())[: args.questions]
    images = [str(paths["images"] / r["image"]) for r in records]
    questions = [r["conversations"][0]["value"].replace("<image>", "").strip() for r in records]
    full = model.vision_tower.tokenizer.max_tokens

    settings = [
        ("auto, query on", True, None),
        ("auto, query off", False, None),
        (f"full ({full}), query on", True, full),
        (f"full ({full}), query off", False, full),
    ]

    def answer(use_query: bool, budget: int | None, subset: slice = slice(None)) -> list:
        return answer_questions(
            model, tokenizer, images[subset], questions[subset], use_query=use_query, budget=budget,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, min_new_tokens=args.max_new_tokens,
        )  # fmt: skip

    for _, use_query, budget in settings:  # warm-up: allocator and kernels, not timed
        answer(use_query, budget, slice(0, args.batch_size))
    times: dict[str, list[float]] = {name: [] for name, _, _ in settings}
    tokens: dict[str, float] = {}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every setting alike
        for name, use_query, budget in settings:
            start = time.perf_counter()
            answers = answer(use_query, budget)
            times[name].append(time.perf_counter() - start)
            tokens[name] = statistics.mean(a.visual_tokens for a in answers)
    baseline = len(questions) / statistics.median(times[settings[2][0]])
    rows = []
    print(
        f"\n{len(questions)} questions, batch {args.batch_size}, {args.max_new_tokens} new tokens each; LLM "
        f"{args.llm_hidden}x{args.llm_layers}; {args.repeats} interleaved repeats (median)"
    )
    print(f"{'setting':<24} {'mean visual tokens':>19} {'answers/s':>10} {'vs full, query on':>18}")
    for name, _, _ in settings:
        rate = len(questions) / statistics.median(times[name])
        rows.append({"setting": name, "mean_visual_tokens": tokens[name], "answers_per_s": rate})
        print(f"{name:<24} {tokens[name]:>19.2f} {rate:>10.2f} {rate / baseline:>17.2f}x")
    print(f"\nmachine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_vqa")
    parser.add_argument("--n-images", type=int, default=100, help="shapes images to generate")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
