"""Stage-2 fine-tuning throughput of a DOVE VLM: samples/s, step time, peak memory and MFU, full fine-tuning
against LoRA, at forced visual budgets, side by side in one run.

The VLM is the full `dove-pythia70m-amused256` tower (random weights, frozen, as in stage 2) in front of a
randomly initialised LLM of a real model's shape (default: Qwen2.5-0.5B's config), joined by LLaVA's
`mlp2x_gelu` projector. Each step is one training forward + backward + AdamW step through
`DoveLlavaForCausalLM.forward`, the path the Trainer takes, with bf16 autocast on a GPU. Budgets are forced
so every configuration sees the same number of visual tokens; random weights make the automatic length
meaningless here. No data is read: pixels and token ids are random, the prompt a fixed length.

FLOPs per step are counted once per configuration with `torch.utils.flop_counter.FlopCounterMode` (on a
step with eager attention, which the counter can read);
MFU = FLOPs / step time / the accelerator's dense bf16 peak (`--peak-tflops`).

    python eval/bench_finetune_throughput.py --device cuda --batch-sizes 8 16 --budgets 64 256
    python eval/bench_finetune_throughput.py --device cpu --llm tiny --tower dove-tiny --batch-sizes 2 --budgets 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from llava_adapter.lora import apply_lora
from llava_adapter.modeling import DoveLlavaForCausalLM

LLM_SHAPES: dict[str, Any] = {
    # Qwen2.5-0.5B-Instruct's published config (random weights here).
    "qwen2.5-0.5b": lambda: Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "tiny": lambda: LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
}


def build_vlm(llm_shape: str, tower: str, device: torch.device, lora: bool) -> DoveLlavaForCausalLM:
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(LLM_SHAPES[llm_shape](), dtype=torch.float32)
    image_token_id = llm.config.vocab_size  # placeholder positions are never looked up in the embedding table
    model = DoveLlavaForCausalLM.from_components(llm=llm, tower=tower, image_token_id=image_token_id)
    if lora:
        model.llm = apply_lora(model.llm)
    return model.to(device).train()


def make_batch(model: DoveLlavaForCausalLM, batch: int, text_tokens: int, device: torch.device) -> dict[str, Any]:
    vocab = model._base_llm().config.vocab_size
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, text_tokens), generator=generator)
    input_ids[:, 1] = model.config.image_token_id
    labels = input_ids.clone()
    labels[:, : text_tokens // 2] = -100  # the prompt is not scored, as in a conversation
    size = model.vision_tower.config.image_size
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device),
        "images": torch.rand(batch, 3, size, size, generator=generator).to(device),
    }


def measure(
    model: DoveLlavaForCausalLM,
    inputs: dict[str, Any],
    budget: int,
    device: torch.device,
    bf16: bool,
    steps: int,
    warmup: int,
) -> dict[str, float]:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> float:
        with autocast:
            loss = model(**inputs, budget=budget).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # The FLOP counter cannot read SDPA's grouped-query call; eager attention does the same arithmetic.
    llm = model._base_llm()
    attention = llm.config._attn_implementation
    llm.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    llm.set_attn_implementation(attention)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step() for _ in range(steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    batch = inputs["input_ids"].shape[0]
    result = {
        "step_s": seconds,
        "samples_per_s": batch / seconds,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": flops / seconds / 1e12,
        "final_loss": losses[-1],
        "trainable_params_m": sum(p.numel() for p in trainable) / 1e6,
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"non-finite loss in the timed steps: {losses}")
    del optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llm", choices=sorted(LLM_SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--tower", default="dove-pythia70m-amused256", help="tower preset or checkpoint")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--budgets", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="fp32 throughout (the CPU default)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    device = torch.device(args.device)
    bf16 = not args.no_bf16 and device.type == "cuda"
    rows = []
    for lora in (False, True):
        model = build_vlm(args.llm, args.tower, device, lora)
        for batch in args.batch_sizes:
            inputs = make_batch(model, batch, args.text_tokens, device)
            for budget in args.budgets:
                try:
                    result = measure(model, inputs, budget, device, bf16, args.steps, args.warmup)
                except torch.OutOfMemoryError:
                    result = {"error": "out of memory"}
                    torch.cuda.empty_cache()
                row = {"mode": "lora" if lora else "full", "batch": batch, "budget": budget, **result}
                if "achieved_tflops" in result and bf16:
                    row["mfu"] = result["achieved_tflops"] / args.peak_tflops
                rows.append(row)
                print(json.dumps(row), flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    header = f"{'mode':5} {'batch':>5} {'budget':>6} {'step s':>8} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}"
    print(f"\n{args.llm} LLM + {args.tower} tower, {args.text_tokens} text tokens, bf16={bf16}, {platform.node()}")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device))
    print(header)
    for row in rows:
        if "error" in row:
            print(f"{row['mode']:5} {row['batch']:>5} {row['budget']:>6} {row['error']}")
            continue
        print(
            f"{row['mode']:5} {row['batch']:>5} {row['budget']:>6} {row['step_s']:>8.3f} {row['samples_per_s']:>10.1f} "
            f"{row['achieved_tflops']:>8.1f} {row.get('mfu', float('nan')):>6.1%} {row.get('peak_gib', float('nan')):>9.1f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
