"""Fine-tuning benchmarks: batch padding with and without visual-length grouping, and the peak memory of
LoRA + ZeRO-2 against full fine-tuning. Both measured side by side in one run, on one machine.

Padding: the share of the LLM's batch positions that are padding, for one epoch of batches drawn
  * in random order (the Trainer's default; mean of 5 shuffles),
  * grouped by text length alone (what grouping by length does without knowing visual lengths),
  * grouped by text + visual length (`VisualLengthGroupedSampler`, lengths from the tower, cached).
Lengths are exact: the tokenized conversation, minus the placeholder, plus the tower's token count.

Memory: peak resident memory of a training process from model load (before DeepSpeed starts) to the
end of training, minus what it held at model load, for stage 2 with
  * full fine-tuning (plain Trainer, no DeepSpeed), * full fine-tuning under ZeRO-2,
  * LoRA without DeepSpeed, * LoRA under ZeRO-2.
Each configuration runs in its own process (ZeRO ones under `torchrun`), so none inherits another's
allocations. On a GPU machine the same runs also report `torch.cuda.max_memory_allocated`.

Everything is offline: shapes-VQA data, a dove-tiny tower with a calibrated EOS head, and a randomly
initialised LLaMA-style LLM whose size is set by --llm-hidden / --llm-layers.

    python eval/bench_vlm_training.py --workdir /tmp/bench_vlm --n-images 100 --llm-hidden 1024 --llm-layers 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback

from llava_adapter import add_image_token
from llava_adapter.conversation import tower_query
from llava_adapter.data import LlavaConversationDataset
from llava_adapter.sampler import VisualLengthGroupedSampler, cached_visual_lengths, expanded_lengths, padding_share
from llava_adapter.vision_tower import DoveVisionTower

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- workspace


def prepare(workdir: Path, n_images: int, llm_hidden: int, llm_layers: int, seed: int = 0) -> dict[str, Path]:
    """Shapes data, a tower and an LLM, built once per settings and reused by later runs."""
    from dove_vlm.shapes import make_shapes
    from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer
    from tokenizer import DoveTokenizer
    from tokenizer.evaluation.stand_ins import calibrate_eos_head

    shapes = workdir / f"shapes-{n_images}"
    if not (shapes / "train" / "llava.json").is_file():
        make_shapes(shapes, n=n_images, seed=seed, test_fraction=0.0, progress=False)
    records = json.loads((shapes / "train" / "llava.json").read_text())
    llm_dir = workdir / f"llm-{llm_hidden}x{llm_layers}"
    if not (llm_dir / "config.json").is_file():
        tokenizer = train_tiny_tokenizer([t["value"] for r in records for t in r["conversations"]], vocab_size=512)
        torch.manual_seed(seed)
        llm = build_tiny_llm(tokenizer, "llama", hidden=llm_hidden, layers=llm_layers, heads=max(4, llm_hidden // 64))
        llm.save_pretrained(llm_dir)
        tokenizer.save_pretrained(llm_dir)
    tower_dir = workdir / "tower"
    if not (tower_dir / "config.json").is_file():
        torch.manual_seed(seed)
        tower = DoveTokenizer.from_preset("dove-tiny").eval()
        sample = records[:32]
        pixels = torch.cat(
            [tower.image_processor.preprocess(str(shapes / "images" / r["image"]))["pixel_values"] for r in sample]
        )
        # The tower's queries as training and inference build them (answer-format instructions stripped).
        queries = [tower_query(r["conversations"][0]["value"].replace("<image>", "").strip()) for r in sample]
        # Calibrated on each image with and without its query, so both uses get input-dependent lengths.
        calibrate_eos_head(tower, torch.cat([pixels, pixels]), [None] * len(queries) + queries, seed=seed)
        tower.save_pretrained(tower_dir)
    return {"data": shapes / "train" / "llava.json", "images": shapes / "images", "llm": llm_dir, "tower": tower_dir}


# ---------------------------------------------------------------------------------------------- padding


def bench_padding(paths: dict[str, Path], workdir: Path, batch_sizes: list[int]) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(paths["llm"])
    add_image_token(tokenizer)
    tower = DoveVisionTower(str(paths["tower"])).eval()
    dataset = LlavaConversationDataset(paths["data"], tokenizer, tower.image_processor, paths["images"])
    visual, _, _ = cached_visual_lengths(tower, dataset, workdir / "cache")
    text = [dataset[i]["input_ids"].shape[0] for i in range(len(dataset))]
    lengths = expanded_lengths(text, visual)
    print(
        f"\npadding: {len(dataset)} samples; visual tokens min/mean/max {min(visual)}/"
        f"{statistics.mean(visual):.1f}/{max(visual)}; text tokens mean {statistics.mean(text):.1f}"
    )
    rows = []
    for batch in batch_sizes:
        shuffled = statistics.mean(
            padding_share(
                torch.randperm(len(lengths), generator=torch.Generator().manual_seed(s)).tolist(), lengths, batch
            )
            for s in range(5)
        )
        by_text = padding_share(list(VisualLengthGroupedSampler(text, batch)), lengths, batch)
        by_visual = padding_share(list(VisualLengthGroupedSampler(lengths, batch)), lengths, batch)
        rows.append({"batch": batch, "random": shuffled, "text_grouped": by_text, "visual_grouped": by_visual})
    print(f"{'batch':>6} {'random':>9} {'by text':>9} {'by text+visual':>15} {'random / grouped':>17}")
    for row in rows:
        print(
            f"{row['batch']:>6} {row['random']:>9.1%} {row['text_grouped']:>9.1%} {row['visual_grouped']:>15.1%} "
            f"{row['random'] / max(row['visual_grouped'], 1e-9):>16.1f}x"
        )
    return rows


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakMemory(TrainerCallback):
    """Resident memory at model load (the Trainer's init, before DeepSpeed starts) and its peak after."""

    def __init__(self) -> None:
        self.at_load_kib = 0
        self.peak_kib = 0

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # Weights loaded from safetensors may still be file pages not yet read: touch them all, so the
        # baseline holds the whole model and the difference is what training itself adds.
        with torch.no_grad():
            for param in model.parameters():
                param.sum()
        self.at_load_kib = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (the peak) to the current size
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_kib = _status_kib("VmHWM")


def worker(config: dict) -> None:
    from llava_adapter.train import FinetuneArguments, finetune

    meter = PeakMemory()
    result = finetune(FinetuneArguments(**config["args"]), callbacks=[meter])
    trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
    report = {
        "at_load_mib": meter.at_load_kib / 1024,
        "peak_mib": meter.peak_kib / 1024,
        "training_mib": (meter.peak_kib - meter.at_load_kib) / 1024,
        "trainable": trainable,
        "losses": result.losses,
    }
    if torch.cuda.is_available():
        report["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(config["report"]).write_text(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_memory(paths: dict[str, Path], workdir: Path, steps: int, batch: int) -> dict[str, dict]:
    common = {
        "stage": 2,
        "llm": str(paths["llm"]),
        "tower": str(paths["tower"]),
        "data": str(paths["data"]),
        "image_folder": str(paths["images"]),
        "max_steps": steps,
        "per_device_train_batch_size": batch,
        "learning_rate": 1e-4,
        "visual_length_cache": str(workdir / "cache"),
        "logging_steps": 1,
    }
    zero2 = "zero2"  # the packaged config
    configs = {
        "full": dict(common),
        "full + ZeRO-2": dict(common, deepspeed=zero2),
        "LoRA": dict(common, lora=True, lora_r=16, lora_alpha=32),
        "LoRA + ZeRO-2": dict(common, deepspeed=zero2, lora=True, lora_r=16, lora_alpha=32),
    }
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    results = {}
    for name, args in configs.items():
        slug = name.replace(" + ", "-").replace(" ", "").lower()
        args = dict(args, output_dir=str(workdir / "runs" / slug))
        config = {"args": args, "report": str(workdir / "runs" / f"{slug}.json")}
        Path(config["report"]).parent.mkdir(parents=True, exist_ok=True)
        launcher = (
            ["torchrun", "--nproc_per_node", "1", "--master_port", str(_free_port())]
            if "deepspeed" in args
            else [sys.executable]
        )
        done = subprocess.run(
            [*launcher, __file__, "--worker", json.dumps(config)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
        results[name] = json.loads(Path(config["report"]).read_text())
    print(f"\nmemory: stage 2, {steps} steps of batch {batch}")
    print(
        f"{'run':>15} {'trainable':>11} {'at load MiB':>12} {'peak MiB':>9} {'training MiB':>13}"
        + (f" {'cuda peak MiB':>14}" if torch.cuda.is_available() else "")
    )
    for name, r in results.items():
        line = f"{name:>15} {r['trainable']:>11,} {r['at_load_mib']:>12.0f} {r['peak_mib']:>9.0f} {r['training_mib']:>13.0f}"
        if "cuda_peak_mib" in r:
            line += f" {r['cuda_peak_mib']:>14.0f}"
        print(line)
    full, lora = results["full"], results["LoRA + ZeRO-2"]
    print(
        f"training memory, LoRA + ZeRO-2 / full: {lora['training_mib'] / full['training_mib']:.2f}; "
        f"peak RSS ratio {lora['peak_mib'] / full['peak_mib']:.2f}"
    )
    return results


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/dove_bench_vlm_training"))
    parser.add_argument("--n-images", type=int, default=100)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--llm-hidden", type=int, default=1024)
    parser.add_argument("--llm-layers", type=int, default=8)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=4)
    parser.add_argument("--skip-padding", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
    )
    paths = prepare(args.workdir, args.n_images, args.llm_hidden, args.llm_layers)
    if not args.skip_padding:
        bench_padding(paths, args.workdir, args.batch_sizes)
    if not args.skip_memory:
        bench_memory(paths, args.workdir, args.memory_steps, args.memory_batch)


if __name__ == "__main__":
    main()
