"""Three ways of choosing each image's length, on the same data and the same VLM: accuracy against mean
visual tokens (a Pareto plot and a markdown table).

  * fixed budgets: every image gets exactly b tokens, b = 1 .. N;
  * DOVE's EOS head as the tokenizer was trained (reconstruction; `budget=auto`);
  * the same EOS head tuned by the answer loss at a token price beta (`AnswerLengthObjective`:
    E_L[answer loss(L)] + beta * E[L]), one tuned head per price, then `budget=auto`.

The VLM is the offline demo's (`dove-vlm demo`: shapes-VQA data, a Q-DOVE tokenizer trained from scratch, a
tiny LLaMA, stages 1 and 2); the benchmark builds it with the demo's recipe (`--recipe full`, 8 minutes on 2
CPU cores; `fast` is the CI one, whose VLM barely learns) unless --demo-dir points at a finished demo. The head is tuned ALONE here (LLM, projector and the rest of the tower
frozen; Adam on the head's weights, from the reconstruction-trained head, on the training split), so the
three methods share every weight but the head's and differ only in the lengths they choose. (`dove-vlm
finetune --tower-trainable eos_head --token-price` trains the LLM or its LoRA with it.) Every answer is greedy,
on the held-out questions, the question as the tower's query when the model was trained with one; scoring
is the `dove_shapes_vqa` task's (EvalAI normalisation, exact match).

    python eval/bench_answer_length.py --demo-dir outputs/demo --prices 0 0.002 0.01 0.05   # ~1 min more
    python eval/bench_answer_length.py --prices 0 0.001 0.002 0.005 0.01 0.02 0.05 --head-steps 400 --limit 0
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from dove_vlm.lmms_tasks.dove_shapes_vqa.utils import process_short_answer
from llava_adapter.conversation import require_question
from llava_adapter.data import LlavaCollator, LlavaConversationDataset, pad_token_id
from llava_adapter.inference import answer_questions, load_pretrained_model
from llava_adapter.length_objective import AnswerLengthObjective, sampled_answer_length_objective
from llava_adapter.modeling import DoveLlavaForCausalLM
from tokenizer import load_image

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."  # the lmms-eval task's prompt


def build_model(demo_dir: Path, recipe: str) -> Path:
    """The demo's stage-2 VLM, trained here (data to stage 2, no evaluation) when the directory lacks one."""
    stage2 = demo_dir / "vlm-stage2"
    if not (stage2 / "config.json").is_file():
        from dove_vlm.demo import run_demo

        run_demo(
            demo_dir, fast=recipe == "fast", steps=["data", "tokenizer", "llm", "stage1", "stage2"], progress=False
        )
    return stage2


def test_questions(demo_dir: Path, limit: int | None) -> list[dict]:
    records = json.loads((demo_dir / "data" / "test" / "annotations.json").read_text())
    return records[:limit] if limit else records


def evaluate(model: DoveLlavaForCausalLM, tokenizer, records: list[dict], images: Path, budget: int | None,
             batch_size: int) -> tuple[list[bool], list[int]]:  # fmt: skip
    """Greedy answers at `budget` (None: the EOS head chooses): correct or not, and the visual tokens used."""
    prompts = [r["question"] + SHORT_ANSWER_SUFFIX for r in records]
    answers = answer_questions(
        model,
        tokenizer,
        [load_image(images / f"{r['image_id']}.png") for r in records],
        prompts,
        use_query=bool(model.config.use_query),
        budget=budget,
        max_new_tokens=16,
        batch_size=batch_size,
        queries=[require_question(p) for p in prompts] if model.config.use_query else None,
    )
    correct = [process_short_answer(r, [a.text])["exact_match"] == 1.0 for a, r in zip(answers, records)]
    return correct, [int(a.visual_tokens) for a in answers]


def head_only(model: DoveLlavaForCausalLM) -> DoveLlavaForCausalLM:
    """A copy of `model` in which only the tower's EOS head trains (eval mode: no dropout)."""
    tuned = copy.deepcopy(model)
    tuned.requires_grad_(False)
    tuned.vision_tower.set_trainable("eos_head")
    tuned.eval()
    return tuned


def train_loader(model: DoveLlavaForCausalLM, tokenizer, demo_dir: Path, batch: int, seed: int):
    dataset = LlavaConversationDataset(
        demo_dir / "data" / "train" / "llava.json",
        tokenizer,
        model.vision_tower.image_processor,
        demo_dir / "data" / "images",
        template=model.config.conversation_template,
        use_query=bool(model.config.use_query),
        cache_items=True,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        collate_fn=LlavaCollator(pad_token_id(tokenizer)),
        generator=torch.Generator().manual_seed(seed),
    )


def compare_estimators(model: DoveLlavaForCausalLM, tokenizer, demo_dir: Path, batches: int, batch: int,
                       candidates: int, repeats: int, seed: int) -> dict[str, float]:  # fmt: skip
    """The head's gradient of E_L[answer loss(L)] (price 0, where the estimators differ in everything) from K
    interpolated candidates and from the score-function estimator at the same K LLM passes (K - 1 samples
    and the greedy baseline), against the exact gradient (every length a candidate): mean relative error
    and cosine over `batches` training batches, the sampled one averaged over `repeats` draws each."""
    tuned = head_only(model)
    head = list(tuned.vision_tower.tokenizer.generator.eos_head.parameters())
    max_tokens = tuned.vision_tower.num_patches

    def gradient(objective, inputs) -> torch.Tensor:
        for param in head:
            param.grad = None
        objective(tuned, tuned, inputs).loss.backward()
        return torch.cat([param.grad.flatten() for param in head]).double()

    def compare(estimate: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
        error = float((estimate - exact).norm() / exact.norm())
        return error, float(torch.nn.functional.cosine_similarity(estimate, exact, dim=0))

    def sampled_objective(model, vlm, inputs):
        return sampled_answer_length_objective(model, vlm, inputs, 0.0, samples=candidates - 1)

    interpolated, sampled = [], []
    torch.manual_seed(seed)
    for index, inputs in enumerate(train_loader(tuned, tokenizer, demo_dir, batch, seed)):
        if index >= batches:
            break
        exact = gradient(AnswerLengthObjective(0.0, candidates=max_tokens), inputs)
        interpolated.append(compare(gradient(AnswerLengthObjective(0.0, candidates=candidates), inputs), exact))
        sampled += [compare(gradient(sampled_objective, inputs), exact) for _ in range(repeats)]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    return {
        "interpolated_error": mean([e for e, _ in interpolated]),
        "interpolated_cosine": mean([c for _, c in interpolated]),
        "sampled_error": mean([e for e, _ in sampled]),
        "sampled_cosine": mean([c for _, c in sampled]),
        "batches": batches,
        "repeats": repeats,
        "llm_passes": candidates,
        "exact_llm_passes": max_tokens,
    }


def tune_head(model: DoveLlavaForCausalLM, tokenizer, demo_dir: Path, price: float, steps: int, batch: int,
              lr: float, candidates: int, seed: int) -> tuple[DoveLlavaForCausalLM, list[dict]]:  # fmt: skip
    """A copy of `model` whose EOS head alone is trained on the answer-length objective at `price`."""
    tuned = head_only(model)
    head = tuned.vision_tower.tokenizer.generator.eos_head
    loader = train_loader(tuned, tokenizer, demo_dir, batch, seed)
    objective = AnswerLengthObjective(price, candidates=candidates)
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    log, step = [], 0
    while step < steps:
        for inputs in loader:
            result = objective(tuned, tuned, inputs)
            optimizer.zero_grad()
            result.loss.backward()
            optimizer.step()
            log.append({"step": step, "objective": result.objective, "answer_loss": result.answer_loss,
                        "expected_length": result.expected_length, "threshold_length": result.threshold_length})  # fmt: skip
            step += 1
            if step >= steps:
                break
    tuned.vision_tower.set_trainable("none")
    return tuned, log


def frontier_accuracy(fixed: list[dict], tokens: float) -> float:
    """The fixed budgets' accuracy at `tokens` mean tokens, linear between the two budgets around it."""
    points = sorted((r["mean_tokens"], r["accuracy"]) for r in fixed)
    if tokens <= points[0][0]:
        return points[0][1]
    for (t0, a0), (t1, a1) in itertools.pairwise(points):
        if tokens <= t1:
            return a0 + (a1 - a0) * (tokens - t0) / (t1 - t0)
    return points[-1][1]


def stderr(accuracy: float, n: int) -> float:
    return math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)


def write_table(rows: list[dict], fixed: list[dict], n: int, path: Path) -> str:
    lines = [
        "| method | price | accuracy | ± s.e. | mean visual tokens | fixed budgets' accuracy at these tokens |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        price = "" if r["price"] is None else f"{r['price']:g}"
        at = "" if r["method"] == "fixed budget" else f"{frontier_accuracy(fixed, r['mean_tokens']):.1%}"
        name = r["method"] + (f" {r['budget']}" if r["method"] == "fixed budget" else "")
        lines.append(
            f"| {name} | {price} | {r['accuracy']:.1%} | {stderr(r['accuracy'], n):.1%} | {r['mean_tokens']:.2f} | {at} |"
        )
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    fixed = sorted((r for r in rows if r["method"] == "fixed budget"), key=lambda r: r["mean_tokens"])
    ax.plot([r["mean_tokens"] for r in fixed], [r["accuracy"] for r in fixed], "o-", color="0.45",
            label="fixed budget")  # fmt: skip
    for r in fixed:
        ax.annotate(str(r["budget"]), (r["mean_tokens"], r["accuracy"]), textcoords="offset points", xytext=(3, -10),
                    fontsize=7, color="0.45")  # fmt: skip
    recon = [r for r in rows if r["method"] == "reconstruction EOS"]
    ax.plot([r["mean_tokens"] for r in recon], [r["accuracy"] for r in recon], "s", color="tab:blue", markersize=8,
            label="EOS head, reconstruction-trained (DOVE)")  # fmt: skip
    tuned = sorted((r for r in rows if r["method"] == "answer-trained EOS"), key=lambda r: r["mean_tokens"])
    ax.plot([r["mean_tokens"] for r in tuned], [r["accuracy"] for r in tuned], "^-", color="tab:red",
            label="EOS head, answer-trained at price β")  # fmt: skip
    for r in tuned:
        ax.annotate(f"β={r['price']:g}", (r["mean_tokens"], r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7, color="tab:red")  # fmt: skip
    ax.set_xlabel("mean visual tokens per image")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dove_bench_answer_length"))
    parser.add_argument("--recipe", choices=("fast", "full"), default="full", help="the demo recipe to build")
    parser.add_argument("--demo-dir", type=Path, default=None, help="a finished demo (default WORKDIR/demo-RECIPE)")
    parser.add_argument("--prices", nargs="+", type=float, default=[0.0, 0.01, 0.05])
    parser.add_argument("--head-steps", type=int, default=100)
    parser.add_argument("--head-batch", type=int, default=32)
    parser.add_argument("--head-lr", type=float, default=1e-2)
    parser.add_argument("--candidates", type=int, default=4, help="lengths the answer loss is computed at per step")
    parser.add_argument("--estimator-batches", type=int, default=4, help="batches to compare estimators on (0: skip)")
    parser.add_argument("--estimator-repeats", type=int, default=5)
    parser.add_argument("--limit", type=int, default=600, help="held-out questions (0: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(args.seed)
    args.workdir.mkdir(parents=True, exist_ok=True)
    demo_dir = (args.demo_dir or args.workdir / f"demo-{args.recipe}").resolve()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}",
        flush=True,
    )
    started = time.perf_counter()
    stage2 = build_model(demo_dir, args.recipe)
    print(f"model: {stage2} ({time.perf_counter() - started:.0f} s)", flush=True)
    tokenizer, model, _, _ = load_pretrained_model(stage2)
    records = test_questions(demo_dir, args.limit or None)
    images = demo_dir / "data" / "images"
    n, max_tokens = len(records), model.vision_tower.num_patches
    rows: list[dict] = []

    t0 = time.perf_counter()
    for budget in range(1, max_tokens + 1):
        correct, _ = evaluate(model, tokenizer, records, images, budget, args.batch_size)
        rows.append({"method": "fixed budget", "budget": budget, "price": None,
                     "accuracy": sum(correct) / n, "mean_tokens": float(budget)})  # fmt: skip
    correct, tokens = evaluate(model, tokenizer, records, images, None, args.batch_size)
    rows.append({"method": "reconstruction EOS", "budget": "auto", "price": None,
                 "accuracy": sum(correct) / n, "mean_tokens": sum(tokens) / n})  # fmt: skip
    print(f"fixed budgets 1..{max_tokens} and the reconstruction head: {time.perf_counter() - t0:.0f} s", flush=True)

    estimators = None
    if args.estimator_batches:
        t0 = time.perf_counter()
        estimators = compare_estimators(model, tokenizer, demo_dir, args.estimator_batches, args.head_batch,
                                        args.candidates, args.estimator_repeats, args.seed)  # fmt: skip
        print(f"head gradient against the exact one ({time.perf_counter() - t0:.0f} s): {estimators}", flush=True)

    logs = {}
    for price in args.prices:
        t0 = time.perf_counter()
        tuned, log = tune_head(model, tokenizer, demo_dir, price, args.head_steps, args.head_batch, args.head_lr,
                               args.candidates, args.seed)  # fmt: skip
        correct, tokens = evaluate(tuned, tokenizer, records, images, None, args.batch_size)
        rows.append({"method": "answer-trained EOS", "budget": "auto", "price": price,
                     "accuracy": sum(correct) / n, "mean_tokens": sum(tokens) / n})  # fmt: skip
        logs[str(price)] = log
        last = log[-10:]
        print(
            f"price {price:g}: {time.perf_counter() - t0:.0f} s; last 10 steps: objective "
            f"{sum(e['objective'] for e in last) / len(last):.4f}, E[L] "
            f"{sum(e['expected_length'] for e in last) / len(last):.2f}; held-out accuracy {rows[-1]['accuracy']:.1%} "
            f"at {rows[-1]['mean_tokens']:.2f} tokens",
            flush=True,
        )

    fixed = [r for r in rows if r["method"] == "fixed budget"]
    table = write_table(rows, fixed, n, args.workdir / "answer_length.md")
    (args.workdir / "answer_length.json").write_text(
        json.dumps({"rows": rows, "n": n, "estimators": estimators, "logs": logs}, indent=1)
    )
    plot(rows, args.workdir / "answer_length.png", f"{n} held-out shapes questions, {demo_dir.name}")
    print(f"\n{n} held-out questions, N = {max_tokens}; total {time.perf_counter() - started:.0f} s\n")
    print(table)
    print(f"wrote {args.workdir / 'answer_length.md'}, {args.workdir / 'answer_length.png'}")


if __name__ == "__main__":
    main()
