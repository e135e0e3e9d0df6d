"""Encode throughput, and what it costs to choose the length.

Two ways to decide how many tokens an image gets, on the same model and images:
  * one-pass EOS (DOVE): a single generator pass yields tokens and EOS probabilities together;
  * reconstruction search (as ALIT / ElasticTok do): encode, then decode at each of 8 budgets and keep
    the first whose reconstruction error is under a threshold.
The script prints images/s for both and their ratio, measured side by side in one run.

    python eval/bench_encode.py --presets dove-tiny dove-pythia14m-amused256 --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from tokenizer import DoveTokenizer


def _timed(fn, repeats: int, device: str) -> float:
    """Median wall time of `fn` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def search_lengths(model: DoveTokenizer, pixels: torch.Tensor, budgets: list[int], max_mse: float) -> torch.Tensor:
    """The reconstruction-threshold search: the first budget whose MSE is under `max_mse` (else the last)."""
    full = model.encode(pixels, budget=model.max_tokens)
    chosen = torch.full((pixels.shape[0],), budgets[-1], dtype=torch.long)
    done = torch.zeros(pixels.shape[0], dtype=torch.bool)
    for budget in budgets:
        recon = model.decode(full.tokens, [budget] * pixels.shape[0])
        error = (recon.float() - pixels.float()).pow(2).flatten(1).mean(1).cpu()
        newly = (~done) & (error <= max_mse)
        chosen[newly] = budget
        done |= newly
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["dove-tiny", "dove-pythia14m-amused256"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"# device: {args.device} ({where}), torch threads {torch.get_num_threads()}, dtype {args.dtype}")
    print("| preset | batch | encode img/s (one-pass EOS) | search img/s (8 decodes) | search time / EOS time |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        torch.manual_seed(0)
        model = DoveTokenizer.from_preset(preset).to(args.device).eval()
        model = model.to(dtype)
        size, n = model.config.image_size, model.max_tokens
        budgets = sorted({max(1, n * k // 8) for k in range(1, 9)})
        for batch in args.batch_sizes:
            pixels = torch.rand(batch, 3, size, size, device=args.device)
            with torch.inference_mode():
                eos_time = _timed(lambda: model.encode(pixels), args.repeats, args.device)
                search_time = _timed(lambda: search_lengths(model, pixels, budgets, 0.01), args.repeats, args.device)
            print(
                f"| {preset} | {batch} | {batch / eos_time:.1f} | {batch / search_time:.2f} | "
                f"{search_time / eos_time:.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
