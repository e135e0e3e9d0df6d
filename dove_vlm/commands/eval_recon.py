"""`dove-vlm eval-recon`: reconstruction quality against token count, per budget and at the automatic length."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from ._args import int_list, output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval-recon",
        help="PSNR / SSIM / LPIPS / rFID of reconstructions per token budget and at the automatic length",
    )
    parser.add_argument("--checkpoint", required=True, help="tokenizer dir or hub id (a save_pretrained export)")
    parser.add_argument("--data", required=True, help="image folder, save_to_disk dataset, .parquet, or hf://NAME")
    parser.add_argument("--annotations", help="Q-DOVE annotation JSON: encode each image with its question")
    parser.add_argument("--budgets", type=int_list, default=[4, 8, 16, 32], help="comma-separated token budgets")
    parser.add_argument("--threshold", type=float, default=None, help="EOS threshold for the automatic length")
    parser.add_argument("--lpips-weights", help="VGG16 weights (path or hub id) for LPIPS; omitted: no LPIPS")
    parser.add_argument("--inception-weights", help="Inception weights file for rFID; omitted: no rFID")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--out", type=output_dir, required=True, help="directory for metrics.csv, metrics.md and quality_vs_tokens.png"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    from tokenizer import DoveTokenizer
    from tokenizer.evaluation.metrics import ReconstructionMetrics
    from tokenizer.training.data import build_dataset, collate_examples

    model = DoveTokenizer.from_pretrained(args.checkpoint).to(args.device).eval()
    for budget in args.budgets:
        if not 1 <= budget <= model.max_tokens:
            raise ValueError(f"--budgets: {budget} is outside [1, {model.max_tokens}] for this model")
    dataset = build_dataset(args.data, args.annotations, image_size=model.config.image_size)
    if args.limit is not None:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate_examples)
    metrics = ReconstructionMetrics(
        args.budgets, lpips_weights=args.lpips_weights, inception_weights=args.inception_weights, device=args.device
    )
    skipped = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="eval-recon", unit="batch", disable=None):  # a bar only on a terminal
            skipped += batch["skipped"]
            pixels = batch["pixels"].to(args.device)
            if pixels.shape[0] == 0:
                continue
            queries = batch["queries"] if args.annotations else None
            result = model.reconstruct(pixels, budgets=args.budgets, queries=queries, threshold=args.threshold)
            for budget, images in result.by_budget.items():
                metrics.update(str(budget), images, pixels, torch.full((pixels.shape[0],), budget))
            metrics.update("auto", result.auto, pixels, result.auto_lengths)
    rows = metrics.rows()
    if not rows or metrics.scores["auto"].count == 0:
        raise ValueError(f"no readable images in {args.data}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "metrics.csv")
    table = markdown_table(rows)
    (out / "metrics.md").write_text(table + "\n")
    plot_quality(rows, out / "quality_vs_tokens.png")
    print(table)
    note = f"; skipped {skipped} unreadable images" if skipped else ""
    print(f"\n{metrics.scores['auto'].count} images{note}; wrote {out}/metrics.csv, metrics.md, quality_vs_tokens.png")
    return 0


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.4g}" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_quality(rows: list[dict], path: Path) -> Path:
    """One panel per metric: quality against mean tokens, budgets as a line, the automatic length as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in rows[0] if c not in ("budget", "tokens")]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    fixed = [r for r in rows if r["budget"] != "auto"]
    auto = [r for r in rows if r["budget"] == "auto"]
    for axis, name in zip(axes[0], names):
        axis.plot([r["tokens"] for r in fixed], [r[name] for r in fixed], "o-", label="fixed budget")
        axis.plot([r["tokens"] for r in auto], [r[name] for r in auto], "*", markersize=14, label="automatic length")
        axis.set_xlabel("tokens per image")
        axis.set_ylabel(name.upper())
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
