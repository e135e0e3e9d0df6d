"""Where a tokenizer's token-path training step spends its time, measured side by side in one run.

After the autoencoder warm-up the VQ encoder is frozen, so its latents could be computed once per image and
cached; and the pixel decoder could be left out of some steps (latent loss only). Before building either,
this times one training step (forward, backward, AdamW) three ways on the same model and batch:
  * the full step: frozen encoder forward, generator, latent decoder, pixel decoder;
  * the same step on latents computed beforehand (what a latent cache would give);
  * on cached latents without the pixel decoder (latent loss only).
Lengths are drawn uniformly per sample, as the demo recipe trains. It prints milliseconds per step and each
variant's share of the full step.

    python eval/bench_token_path_step.py --checkpoint outputs/demo/tokenizer/final --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import platform

import torch
from bench_encode import _timed  # the median-of-repeats timer the encode benchmark uses

from tokenizer import DoveTokenizer
from tokenizer.modeling.length import mask_from_lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="dove-tiny", help="a tokenizer dir, hub id or preset")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = DoveTokenizer.from_name(args.checkpoint)
    model.train()
    model.vq.model.encoder.requires_grad_(False)
    size, n = model.config.image_size, model.max_tokens
    pixels = torch.rand(args.batch_size, 3, size, size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    with torch.no_grad():
        cached = model.vq.encode(pixels)

    def step(latents: torch.Tensor | None, pixel_decoder: bool) -> None:
        if latents is None:
            with torch.no_grad():
                latents = model.vq.encode(pixels)
        tokens, eos_logits = model.generator(latents, None, None)
        lengths = torch.randint(model.config.min_tokens, n + 1, (args.batch_size,))
        predicted = model.decode_latents(tokens, mask_from_lengths(lengths, n))
        loss = (predicted - latents).pow(2).mean() + 0.0 * eos_logits.float().mean()
        if pixel_decoder:
            loss = loss + (model.vq.decode(predicted) - pixels).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def encoder_forward() -> None:
        with torch.no_grad():
            model.vq.encode(pixels)

    for _ in range(10):  # warm-up: allocator and kernels settle before anything is timed
        step(None, True)
    timings = {
        "full step": _timed(lambda: step(None, True), args.repeats, "cpu"),
        "VQ encoder forward alone": _timed(encoder_forward, args.repeats, "cpu"),
        "step on cached latents": _timed(lambda: step(cached, True), args.repeats, "cpu"),
        "cached latents, no pixel decoder": _timed(lambda: step(cached, False), args.repeats, "cpu"),
    }
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.checkpoint}: {size} px, batch {args.batch_size}, up to {n} tokens")
    full = timings["full step"]
    for name, seconds in timings.items():
        print(f"{name:34s} {1000 * seconds:8.2f} ms  {100 * seconds / full:5.1f}% of the full step")


if __name__ == "__main__":
    main()
