"""Tokenizer training throughput and peak memory: the real loop (`tokenizer.training.loop.train_tokenizer`) on
shapes data for a few steps, per preset and batch size.

Images/s is measured between a phase's first and last logged steps (so first-batch costs stay out);
the VQ warm-up steps (the autoencoder alone) and the DOVE steps (generator + decoder + VQ decoder +
length control) are timed apart, since they cost differently. Peak memory is the process's resident-set
high-water mark, reset at the start of each run; on a GPU, `torch.cuda.max_memory_allocated` too.

    python eval/bench_train_tokenizer.py --presets dove-tiny --batch-sizes 8 16 --steps 30
    # on a GPU, the full preset in bf16:
    python eval/bench_train_tokenizer.py --presets dove-pythia70m-amused256 --batch-sizes 16 --mixed-precision bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm_training import _status_kib  # the /proc/self/status reader the other benchmarks use


def _reset_rss_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def bench_one(preset: str, batch: int, steps: int, warmup_vq: int, log_every: int, data: Path, precision: str) -> dict:
    from tokenizer.training.config import parse_training_setup
    from tokenizer.training.loop import train_tokenizer

    train = {
        "max_steps": warmup_vq + steps, "vq_warmup_steps": warmup_vq, "batch_size": batch, "log_every": log_every,
        "checkpoint_every": 0, "grid_every": 0, "tracker": "none", "num_workers": 0, "adversarial_weight": 0.0,
        "mixed_precision": precision,
    }  # fmt: skip
    setup = parse_training_setup({"model": {"preset": preset}, "train": train}, where="benchmark")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _reset_rss_peak()
    with tempfile.TemporaryDirectory() as out:
        summary = train_tokenizer(
            setup, data / "images", Path(out) / "run", annotations=data / "train" / "annotations.json", progress=False
        )
    # The loop logs images/s since the start of the run; the time at a logged step is images so far / that
    # rate, and a phase's rate runs from its first logged step to its last (the first steps are left out).
    at = {r["step"]: r["step"] * batch / r["throughput/images_per_s"] for r in summary.history}

    def rate(first: int, last: int) -> float:
        if first not in at or last not in at or last <= first:
            return float("nan")
        return (last - first) * batch / (at[last] - at[first])

    logged = sorted(at)
    warm = [s for s in logged if s <= warmup_vq]
    dove = [s for s in logged if s > warmup_vq]
    row = {
        "preset": preset, "batch": batch, "precision": precision,
        "vq_warmup_img_s": rate(warm[0], warm[-1]) if warm else float("nan"),
        "dove_img_s": rate(dove[0], dove[-1]) if dove else float("nan"),
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
    }  # fmt: skip
    if torch.cuda.is_available():
        row["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["dove-tiny"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--steps", type=int, default=40, help="DOVE steps per run")
    parser.add_argument("--vq-warmup-steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10, help="as in training; a phase's rate spans its logs")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16", "fp16"))
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--workdir", default="/tmp/bench_train_tokenizer")
    args = parser.parse_args(argv)

    from dove_vlm.shapes import make_shapes

    rows = []
    for preset in args.presets:
        size = 64 if preset == "dove-tiny" else 256
        data = Path(args.workdir) / f"shapes-{size}-{args.n_images}"
        if not (data / "train" / "annotations.json").is_file():
            make_shapes(data, n=args.n_images, seed=0, image_size=size, progress=False)
        for batch in args.batch_sizes:
            rows.append(
                bench_one(preset, batch, args.steps, args.vq_warmup_steps, args.log_every, data, args.mixed_precision)
            )
            print(json.dumps(rows[-1]))
    print(f"\n{'preset':<28} {'batch':>5} {'VQ warm-up img/s':>17} {'DOVE img/s':>11} {'peak RSS MiB':>13}")
    for r in rows:
        print(f"{r['preset']:<28} {r['batch']:>5} {r['vq_warmup_img_s']:>17.1f} {r['dove_img_s']:>11.1f} "
              f"{r['peak_rss_mib']:>13.0f}")  # fmt: skip
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine()
    print(f"\nmachine: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
