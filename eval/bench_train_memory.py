"""Peak memory (and, on a GPU, time and MFU) of ONE tokenizer training step of the full presets at 256 px.

A step is exactly the training loop's own: a `TokenizerTrainer` is built from the preset's training file
(random weights in the preset's architecture, no download) and its micro-step runs on one batch of
procedural shapes images with queries: generator + token decoder + VQ decoder forward, MSE + LPIPS
reconstruction, length control, the adversarial terms (the discriminator is on, as in the later part of
a run: `adversarial_start_step` is set to 0 here) and both optimiser steps. LPIPS runs over random VGG16
weights: the memory and FLOPs are those of the real network, the loss values mean nothing.

CPU: each (preset, batch, checkpointing) setting runs in a fresh process (so no allocator cache from an
earlier setting hides memory); the figure is the resident-set high-water mark of the step minus the
resident set just before it, and the total peak. Activations are linear in the batch, so the per-image
cost is the difference between batch 2 and batch 1; the rest (weights, gradients, AdamW state, the
runtime) is the batch-1 peak minus one image; the largest batch that fits a budget (80 GiB) follows.

GPU: one process per preset; `torch.cuda.max_memory_allocated` over the timed steps (after warm-up),
the mean synchronised step time, images/s, and MFU: the model FLOPs of a step counted with
`torch.utils.flop_counter.FlopCounterMode` (at batch 1 without checkpointing, times the batch: the
recompute is not useful work) over the dense bf16 peak (989 TFLOP/s, H100/H200 SXM; `--peak-tflops`).
A batch that runs out of memory is recorded as such and larger ones are skipped. `--device cpu --in-process`
runs that same sweep on the CPU, as a quick check of the code path.

    python eval/bench_train_memory.py --device cpu --batch-sizes 1 2 --json cpu.json
    python eval/bench_train_memory.py --device cuda --dtype bf16 --batch-sizes 8 16 32 64 128 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

FULL_PRESETS = ("dove-pythia14m-amused256", "dove-pythia70m-amused256")
GIB = 2**30


# The /proc readers of bench_vlm_training / bench_train_tokenizer, repeated: importing those modules pulls in
# llava_adapter, which a GPU machine carrying only the tokenizer's dependencies does not have.
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current resident set


def prepare_data(workdir: Path, n_images: int = 8) -> Path:
    """Procedural shapes at 256 px with questions and boxes (Q-DOVE batches), made once per workdir."""
    from dove_vlm.shapes import make_shapes

    data = workdir / f"shapes-256-{n_images}"
    if not (data / "train" / "annotations.json").is_file():
        make_shapes(data, n=n_images, seed=0, image_size=256, progress=False)
    return data


def random_vgg16(workdir: Path) -> Path:
    """A VGG16 `features` state dict with torchvision's random initialisation: the real network's cost."""
    path = workdir / "vgg16-random.safetensors"
    if not path.is_file():
        import torchvision
        from safetensors.torch import save_file

        torch.manual_seed(0)
        features = torchvision.models.vgg16(weights=None).features.state_dict()
        save_file({k: v.contiguous() for k, v in features.items()}, str(path))
    return path


def build_trainer(preset: str, dtype: str, checkpointing: bool, workdir: Path, vgg: Path, data: Path) -> Any:
    """The training loop's trainer for a preset's own training file, on random weights of its architecture."""
    from tokenizer.training.config import ModelSpec, load_training_file
    from tokenizer.training.loop import TokenizerTrainer
    from tokenizer.training.recipes import recipe_path

    overrides = {
        "mixed_precision": {"fp32": "no", "bf16": "bf16"}[dtype], "gradient_checkpointing": checkpointing,
        "perceptual_weights": str(vgg), "adversarial_start_step": 0, "num_workers": 0, "tracker": "none",
        "checkpoint_every": 0, "grid_every": 0, "codebook_init_images": 0,
    }  # fmt: skip
    setup = load_training_file(recipe_path(preset), overrides=overrides)
    setup.model = ModelSpec(preset=setup.model.preset)  # the architecture, without the hub components
    out = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    annotations = data / "train" / "annotations.json"
    return TokenizerTrainer(setup, data / "images", out, annotations=annotations, progress=False)


def make_batch(trainer: Any, batch: int) -> dict[str, Any]:
    from tokenizer.training.data import collate_examples

    return collate_examples([trainer.dataset[i % len(trainer.dataset)] for i in range(batch)])


def training_step(trainer: Any, batch: dict[str, Any]) -> dict[str, float]:
    """One optimiser step exactly as `TokenizerTrainer.train` runs it (gradient accumulation 1)."""
    logs = trainer._micro_step(batch)
    if not all(math.isfinite(v) for k, v in logs.items() if k.startswith("loss/")):
        raise RuntimeError(f"non-finite loss in the benchmark step: {logs}")
    return logs


# ---------------------------------------------------------------------------------------------- CPU


def cpu_one(preset: str, batch: int, checkpointing: bool, dtype: str, workdir: Path) -> dict[str, Any]:
    """One setting, in this (fresh) process: resident-set growth of one step."""
    data, vgg = prepare_data(workdir), random_vgg16(workdir)
    trainer = build_trainer(preset, dtype, checkpointing, workdir, vgg, data)
    inputs = make_batch(trainer, batch)
    before = _status_kib("VmRSS") * 1024
    _reset_rss_peak()
    started = time.perf_counter()
    training_step(trainer, inputs)
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024
    return {
        "preset": preset, "batch": batch, "checkpointing": checkpointing, "dtype": dtype, "device": "cpu",
        "rss_before_gib": before / GIB, "peak_gib": peak / GIB, "step_gib": (peak - before) / GIB,
        "step_s": seconds,
    }  # fmt: skip


def cpu_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for preset in args.presets:
        for checkpointing in args.checkpointing:
            for batch in args.batch_sizes:
                command = [
                    sys.executable, __file__, "--device", "cpu", "--dtype", args.dtype, "--workdir", str(args.workdir),
                    "--one", preset, str(batch), str(int(checkpointing)),
                ]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise RuntimeError(f"{preset} batch {batch}: the step failed:\n{result.stderr[-3000:]}")
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- GPU


def count_step_flops(trainer: Any, batch: dict[str, Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        training_step(trainer, batch)
    return counter.get_total_flops()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_rss_peak()


def _peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024


def in_process_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setting of a preset in one process: the GPU sweep (on the CPU only with --in-process, as a quick
    check of the same code; its resident-set peaks carry the earlier settings' allocator cache)."""
    rows = []
    device = args.device
    data, vgg = prepare_data(args.workdir), random_vgg16(args.workdir)
    for preset in args.presets:
        trainer = build_trainer(preset, args.dtype, False, args.workdir, vgg, data)
        tokenizer = trainer.tokenizer
        training_step(trainer, make_batch(trainer, 1))  # optimiser state and kernels, before counting
        flops_per_image = count_step_flops(trainer, make_batch(trainer, 1))
        for checkpointing in args.checkpointing:
            tokenizer.set_gradient_checkpointing(checkpointing)
            for batch in args.batch_sizes:
                name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
                row = {"preset": preset, "batch": batch, "checkpointing": checkpointing, "dtype": args.dtype,
                       "device": name}  # fmt: skip
                inputs = make_batch(trainer, batch)
                out_of_memory = False
                try:
                    for _ in range(args.warmup_steps):
                        training_step(trainer, inputs)
                    _sync(device)
                    _reset_peak(device)
                    started = time.perf_counter()
                    for _ in range(args.steps):
                        training_step(trainer, inputs)
                    _sync(device)
                    seconds = (time.perf_counter() - started) / args.steps
                except torch.OutOfMemoryError:
                    out_of_memory = True
                if out_of_memory:  # outside the handler, so the failed step's tensors are already released
                    trainer.gen_optimizer.zero_grad(set_to_none=True)
                    trainer.disc_optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    rows.append({**row, "oom": True})
                    print(json.dumps(rows[-1]), flush=True)
                    break  # a larger batch runs out too
                model_flops = flops_per_image * batch
                row.update({
                    "oom": False, "peak_gib": _peak_bytes(device) / GIB, "step_s": seconds,
                    "images_per_s": batch / seconds, "model_tflop_per_step": model_flops / 1e12,
                    "mfu": model_flops / seconds / (args.peak_tflops * 1e12),
                })  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        del trainer, tokenizer
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- summary


def fits(rows: list[dict[str, Any]], budget_gib: float) -> list[dict[str, Any]]:
    """Per preset and checkpointing: the per-image cost from the two largest measured batches, the rest
    (weights, gradients, optimiser state, runtime), and the largest batch within the budget."""
    out = []
    for key in sorted({(r["preset"], r["checkpointing"]) for r in rows}):
        measured = sorted((r["batch"], r["peak_gib"]) for r in rows if (r["preset"], r["checkpointing"]) == key
                          and not r.get("oom"))  # fmt: skip
        if len(measured) < 2:
            continue
        (b1, p1), (b2, p2) = measured[-2], measured[-1]
        per_image = (p2 - p1) / (b2 - b1)
        fixed = p2 - per_image * b2
        largest = math.floor((budget_gib - fixed) / per_image) if per_image > 0 else None
        out.append({"preset": key[0], "checkpointing": key[1], "per_image_gib": per_image, "fixed_gib": fixed,
                    f"largest_batch_{budget_gib:g}gib": largest})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="autocast dtype (the VQ stays fp32)")
    parser.add_argument("--presets", nargs="+", default=list(FULL_PRESETS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 1 2 on the CPU, 8 16 32 64 128 on a GPU")
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--warmup-steps", type=int, default=2, help="GPU: untimed steps per setting")
    parser.add_argument("--steps", type=int, default=3, help="GPU: timed steps per setting")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak for MFU (H100/H200 SXM bf16)")
    parser.add_argument("--budget-gib", type=float, default=80.0, help="memory the largest batch must fit in")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "bench_train_memory")
    parser.add_argument("--json", type=Path, help="write the rows and the derived figures here")
    parser.add_argument(
        "--in-process", action="store_true", help="CPU: every setting in this process, timed as on a GPU (a check)"
    )
    parser.add_argument("--one", nargs=3, metavar=("PRESET", "BATCH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.one:  # a child of the CPU sweep
        preset, batch, checkpointing = args.one[0], int(args.one[1]), bool(int(args.one[2]))
        print(json.dumps(cpu_one(preset, batch, checkpointing, args.dtype, args.workdir)))
        return
    args.checkpointing = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    if args.batch_sizes is None:
        args.batch_sizes = [1, 2] if args.device == "cpu" else [8, 16, 32, 64, 128]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    started = time.perf_counter()
    rows = cpu_sweep(args) if args.device == "cpu" and not args.in_process else in_process_sweep(args)
    derived = fits(rows, args.budget_gib)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"\n{'preset':<26} {'ckpt':>4} {'batch':>5} {'peak GiB':>9} {'step s':>7} {'img/s':>7} {'MFU':>6}")
    for r in rows:
        if r.get("oom"):
            print(f"{r['preset']:<26} {'on' if r['checkpointing'] else 'off':>4} {r['batch']:>5} {'OOM':>9}")
            continue
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        ips = f"{r['images_per_s']:.1f}" if "images_per_s" in r else "-"
        print(f"{r['preset']:<26} {'on' if r['checkpointing'] else 'off':>4} {r['batch']:>5} {r['peak_gib']:>9.2f} "
              f"{r['step_s']:>7.2f} {ips:>7} {mfu:>6}")  # fmt: skip
    print()
    for d in derived:
        print(json.dumps(d))
    print(f"\nmachine: {machine}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{time.perf_counter() - started:.0f} s")  # fmt: skip
    if args.json:
        meta = {"device": args.device, "dtype": args.dtype, "machine": machine, "torch": torch.__version__,
                "peak_tflops": args.peak_tflops, "budget_gib": args.budget_gib}  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "derived": derived}, indent=2) + "\n")


if __name__ == "__main__":
    main()
