"""DOVE against LLaVA-1.5's CLIP tower in front of the same LLM: tower images/s and end-to-end answers/s,
side by side in one run.

The comparison a LLaVA user asks first. Both towers and the LLM have real shapes and random weights:
  * CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): the penultimate layer's 576 patch tokens, as LLaVA reads them;
  * the `dove-pythia70m-amused256` tower at forced budgets (32, 64, 82 = Q-DOVE's reported 32% of 256, 256);
  * an LLM of Qwen2.5-0.5B's shape, fed through LLaVA's `mlp2x_gelu` projector.
An answer is one image: tower, projector, the visual tokens spliced between a 32-token prompt prefix and a
16-token suffix, then greedy decoding of 8 new tokens with the LLM's KV cache. Every configuration uses the
same splice and decoding code, so only the tower and its token count differ. Budgets are forced because
random weights make the automatic length meaningless. On a GPU the towers' transformers and the LLM run
in bf16 (DOVE's VQ stays fp32 by design); on the CPU everything is fp32.

    python eval/bench_tower_vs_clip.py --device cuda --batch-size 16
    python eval/bench_tower_vs_clip.py --device cpu --batch-size 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from llava_adapter.projectors import build_projector
from llava_adapter.vision_tower import DoveVisionTower

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune_throughput import LLM_SHAPES  # the same Qwen2.5-0.5B shape the fine-tuning benchmark uses

CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
}


def clip_features(model: CLIPVisionModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """LLaVA-1.5's reading of CLIP: the penultimate layer, CLS token dropped -> [B, 576, 1024]."""

    def run(pixels: torch.Tensor) -> torch.Tensor:
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        return hidden[:, 1:]

    return run


def dove_features(tower: DoveVisionTower, budget: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.stack(tower(pixels, budget=budget))  # equal lengths: one [B, budget, D] tensor

    return run


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def answer(
    features: Callable[[torch.Tensor], torch.Tensor],
    projector: torch.nn.Module,
    llm: torch.nn.Module,
    pixels: torch.Tensor,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    new_tokens: int,
) -> torch.Tensor:
    embed = llm.get_input_embeddings()
    visual = projector(features(pixels).to(next(projector.parameters()).dtype))
    inputs = torch.cat([embed(prefix), visual.to(llm.dtype), embed(suffix)], dim=1)
    mask = torch.ones(inputs.shape[:2], dtype=torch.long, device=inputs.device)
    return llm.generate(
        inputs_embeds=inputs,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budgets", nargs="+", type=int, default=[32, 64, 82, 256])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(LLM_SHAPES["qwen2.5-0.5b"](), dtype=dtype).to(device).eval()
    clip = CLIPVisionModel(CLIPVisionConfig(**CLIP_L_336)).to(device=device, dtype=dtype).eval()
    dove = DoveVisionTower("dove-pythia70m-amused256")
    dove.tokenizer.to(device=device, dtype=dtype)  # the VQ keeps fp32 whatever is asked
    dove.eval()
    batch = args.batch_size
    prefix = torch.randint(0, 1000, (batch, 32), device=device)
    suffix = torch.randint(0, 1000, (batch, 16), device=device)
    clip_pixels = torch.rand(batch, 3, 336, 336, device=device, dtype=dtype)
    settings = [("CLIP ViT-L/14-336", 576, clip_features(clip), clip_pixels)]
    dove_pixels = torch.rand(batch, 3, 256, 256, device=device)
    settings += [(f"DOVE 70M, budget {b}", b, dove_features(dove, b), dove_pixels) for b in args.budgets]

    rows = []
    for name, tokens, features, pixels in settings:
        width = features(pixels[:1]).shape[-1]
        projector = build_projector("mlp2x_gelu", width, llm.config.hidden_size).to(device=device, dtype=dtype)
        with torch.no_grad():
            tower_s = timed(lambda f=features, p=pixels: f(p), args.repeats, device)
        answer_s = timed(
            lambda f=features, m=projector, p=pixels: answer(f, m, llm, p, prefix, suffix, args.new_tokens),
            args.repeats,
            device,
        )
        row = {
            "tower": name,
            "visual_tokens": tokens,
            "tower_images_per_s": batch / tower_s,
            "answers_per_s": batch / answer_s,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    clip_row = rows[0]
    print(f"\nbatch {batch}, {args.new_tokens} new tokens per answer, {dtype}, {platform.node()}")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device))
    print(f"{'tower':24} {'tokens':>6} {'tower img/s':>12} {'x CLIP':>7} {'answers/s':>10} {'x CLIP':>7}")
    for row in rows:
        print(
            f"{row['tower']:24} {row['visual_tokens']:>6} {row['tower_images_per_s']:>12.1f} "
            f"{row['tower_images_per_s'] / clip_row['tower_images_per_s']:>7.2f} {row['answers_per_s']:>10.1f} "
            f"{row['answers_per_s'] / clip_row['answers_per_s']:>7.2f}"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
