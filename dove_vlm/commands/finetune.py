"""`dove-vlm finetune`: one stage of LLaVA's recipe (1: projector alignment, 2: LoRA or full instruction tuning).

Runs as a plain process, or under a launcher for several devices and DeepSpeed:

    deepspeed --no_local_rank --module dove_vlm.cli finetune --deepspeed zero2 ...
    torchrun --nproc_per_node 8 -m dove_vlm.cli finetune --deepspeed zero3 ...

(`--no_local_rank` because the launcher would otherwise put `--local_rank` before the sub-command;
every launcher also sets the LOCAL_RANK environment variable, which is what is read.)
"""

from __future__ import annotations

import argparse

from ._args import output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a DOVE VLM: stage 1 (projector) or stage 2 (LoRA / full LLM), with optional DeepSpeed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    start = parser.add_argument_group("starting point (either --model, or --llm and --tower)")
    start.add_argument("--stage", type=int, choices=(1, 2), required=True)
    start.add_argument("--model", help="a saved DOVE VLM directory or hub id (e.g. stage 1's output)")
    start.add_argument("--llm", help="causal LM: hub id (Qwen/Qwen2.5-0.5B-Instruct, lmsys/vicuna-7b-v1.5) or dir")
    start.add_argument("--tower", help="DOVE tokenizer checkpoint dir, hub id or preset name")
    start.add_argument("--tokenizer", help="LLM tokenizer (default: the LLM's, or the one saved with --model)")
    start.add_argument("--projector-type", default="mlp2x_gelu", help="linear, mlp<N>x_gelu or identity")
    start.add_argument("--pretrained-projector", help="mm_projector.* weights file to start from (with --llm/--tower)")
    start.add_argument("--template", help="conversation template (default: plain in stage 1, the model's in stage 2)")
    start.add_argument(
        "--query",
        dest="use_query",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="condition the tower on the question (Q-DOVE); with --llm/--tower only",
    )
    start.add_argument(
        "--tower-trainable",
        default=None,
        choices=("none", "eos_head", "generator"),
        help="tower part trained in stage 2 (default: none, or what --model was saved with)",
    )
    start.add_argument(
        "--token-price",
        type=float,
        help="stage 2 with --tower-trainable eos_head: tune the EOS head by the answer loss plus this price per "
        "visual token (the answer loss, in nats per answer token, one token must save to be kept); saved with "
        "the model (default: the price --model was tuned at)",
    )
    start.add_argument(
        "--length-candidates",
        type=int,
        default=4,
        help="with --token-price: lengths the answer loss is computed at each step (LLM passes per step)",
    )
    start.add_argument("--threshold", type=float, help="tower EOS threshold (default: the tower's)")
    start.add_argument("--budget", type=int, help="force every image to this many visual tokens")
    start.add_argument(
        "--train-lengths",
        default="auto",
        choices=("auto", "uniform"),
        help="each training image's length: the EOS head's choice (auto), or drawn uniformly from 1..N so the LLM "
        "learns to read any prefix and fixed budgets at inference are lengths it has met (uniform)",
    )
    start.add_argument("--model-max-length", type=int, help="tokens the LLM sees, visual tokens included")

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, help="LLaVA conversation JSON (or JSON Lines)")
    data.add_argument("--image-folder", help="folder the records' 'image' paths are relative to")
    data.add_argument(
        "--group-by-visual-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch samples of similar visual+text length (lengths computed once, cached)",
    )
    data.add_argument("--visual-length-cache", help="cache dir (default: $DOVE_VLM_CACHE or ~/.cache/dove-vlm)")
    data.add_argument("--num-workers", type=int, default=0, dest="dataloader_num_workers")
    data.add_argument(
        "--cache-dataset",
        action="store_true",
        help="keep each sample's tokenised conversation and pixels in memory after the first epoch "
        "(small images only: 3*S*S*4 bytes a sample)",
    )
    data.add_argument(
        "--allow-paths-outside-root",
        dest="allow_outside_root",
        action="store_true",
        help="let records' 'image' paths be absolute or climb out of --image-folder with '..' (refused by default)",
    )
    data.add_argument(
        "--strict",
        action="store_true",
        help="stop (before the first step) at an unreadable image instead of skipping its sample",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--output", "--output-dir", dest="output_dir", type=output_dir, required=True)
    train.add_argument(
        "--lora",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stage 2: LoRA adapters instead of the full LLM",
    )
    train.add_argument("--lora-r", type=int, default=128)
    train.add_argument("--lora-alpha", type=int, default=256)
    train.add_argument("--lora-dropout", type=float, default=0.05)
    train.add_argument("--lora-target-modules", nargs="+", help="default: every linear layer but the output layer")
    train.add_argument(
        "--lr",
        "--learning-rate",
        type=float,
        dest="learning_rate",
        help="default: 1e-3 (stage 1), 2e-4 (LoRA), 2e-5 (full)",
    )
    train.add_argument("--projector-lr", type=float, help="stage 2: the projector's own learning rate")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--warmup-ratio", type=float, default=0.03)
    train.add_argument("--lr-scheduler", dest="lr_scheduler_type", default="cosine")
    train.add_argument("--epochs", type=float, default=1.0, dest="num_train_epochs")
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", type=int, default=16, dest="per_device_train_batch_size", help="per device")
    train.add_argument("--grad-accum", type=int, default=1, dest="gradient_accumulation_steps")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    train.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="bf16 mixed precision (autocast; the VQ stays fp32)",
    )
    train.add_argument(
        "--deepspeed", help="DeepSpeed config: zero2, zero3 or zero3_offload (shipped with dove-vlm), or a JSON file"
    )
    train.add_argument("--save-steps", type=int, help="also write a resumable checkpoint every N steps")
    train.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint-<step> in --output (if there is one)"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the earlier run's checkpoint-<step> dirs, model and log in --output and start afresh",
    )
    train.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars for training and the visual-length pass (default: when stderr is a terminal)",
    )
    train.add_argument("--logging-steps", type=int, default=1)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--report-to", nargs="*", default=[], help="e.g. tensorboard wandb")
    train.add_argument(
        "--save-llm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write the LLM weights (default: only when trained or not reloadable from its source)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from llava_adapter.train import FinetuneArguments, finetune

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fields = FinetuneArguments.__dataclass_fields__
    values = {name: value for name, value in vars(args).items() if name in fields}
    result = finetune(FinetuneArguments(**values))
    if result.losses:
        print(
            f"stage {args.stage}: {len(result.losses)} logged losses, first {result.losses[0]:.4f}, "
            f"last {result.losses[-1]:.4f}; saved to {result.output_dir} (loss curve: loss_curve.png)"
        )
    return 0
