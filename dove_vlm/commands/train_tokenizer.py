"""`dove-vlm train-tokenizer`: train DOVE / Q-DOVE from a training recipe or a YAML config.

Multi-GPU: run the same command under `accelerate launch` or `torchrun` (see scripts/train_tokenizer.sh).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizer.training.recipes import available_recipes, recipe_path

from ._args import output_dir


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train a DOVE / Q-DOVE tokenizer (single process, or DDP under accelerate launch / torchrun)",
        description="Train a DOVE tokenizer on an image folder, a Hugging Face dataset, or (Q-DOVE) an image "
        "folder with --annotations. Checkpoints go to OUTPUT/checkpoints, logs to OUTPUT/logs, reconstruction "
        "grids to OUTPUT/samples and the final model to OUTPUT/final.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help=f"a packaged training recipe: {', '.join(available_recipes())}")
    source.add_argument("--config", help="training YAML with `model:` and `train:` sections")
    parser.add_argument("--data", required=True, help="image folder, save_to_disk dataset, .parquet, or hf://NAME")
    parser.add_argument("--annotations", help="Q-DOVE annotation JSON (image_id, question, answer, bounding_box)")
    parser.add_argument("--output", type=output_dir, required=True, help="run directory")
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None,
        help="continue from the latest checkpoint in OUTPUT (or from the checkpoint dir given)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", action="store_true",
        help="discard the earlier run in OUTPUT (its checkpoints, final/, metrics and grids) and start afresh",
    )  # fmt: skip
    parser.add_argument(
        "--strict", action="store_true", help="stop at the first unreadable image instead of skipping it"
    )
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--batch-size", type=int, help="override train.batch_size (per process)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="override train.mixed_precision")
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
        help="override train.gradient_checkpointing: recompute activations in the backward pass (less memory)",
    )  # fmt: skip
    parser.add_argument("--tracker", choices=["tensorboard", "wandb", "none"], help="override train.tracker")
    parser.add_argument("--seed", type=int, help="override train.seed")
    parser.add_argument("--num-workers", type=int, help="override train.num_workers")
    parser.add_argument("--checkpoint-every", type=int, help="override train.checkpoint_every")
    parser.add_argument("--freeze-vq", action="store_true", default=None, help="train without updating the VQ")
    parser.add_argument(
        "--perceptual-weights",
        help="VGG16 weights for the LPIPS loss: `torchvision` (torchvision's ImageNet weights, downloaded once), "
        "a path or a hub id",
    )
    parser.add_argument("--vq", help="pretrained VQ (path or hub id), replacing the config's model.vq")
    parser.add_argument(
        "--generator", help="pretrained GPT-NeoX (path or hub id), replacing the config's model.generator"
    )
    parser.add_argument("--init-from", help="start from the weights of a saved tokenizer")
    parser.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    parser.add_argument("--image-column", default="image", help="image column of a Hugging Face dataset")
    parser.add_argument("--question-column", help="question column of a Hugging Face dataset (Q-DOVE)")
    parser.add_argument("--boxes-column", help="boxes column ([[x, y, w, h], ...]) of a Hugging Face dataset (Q-DOVE)")
    parser.add_argument(
        "--allow-paths-outside-root",
        action="store_true",
        help="let annotation image ids be absolute or climb out of --data with '..' (refused by default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tokenizer.training.config import ModelSpec, load_training_file
    from tokenizer.training.loop import train_tokenizer

    path = recipe_path(args.recipe) if args.recipe else Path(args.config)
    overrides = {
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "tracker": args.tracker,
        "seed": args.seed,
        "num_workers": args.num_workers,
        "checkpoint_every": args.checkpoint_every,
        "freeze_vq": args.freeze_vq,
        "perceptual_weights": args.perceptual_weights,
    }
    setup = load_training_file(path, overrides=overrides)
    if args.vq or args.generator or args.init_from:
        spec = setup.model.to_dict()
        spec.update(
            {k: v for k, v in (("vq", args.vq), ("generator", args.generator), ("init_from", args.init_from)) if v}
        )
        setup.model = ModelSpec.parse(spec)
    dataset_kwargs = {
        "hf_split": args.hf_split,
        "image_column": args.image_column,
        "question_column": args.question_column,
        "boxes_column": args.boxes_column,
        "allow_outside_root": args.allow_paths_outside_root,
    }
    summary = train_tokenizer(
        setup,
        data=args.data,
        output_dir=args.output,
        annotations=args.annotations,
        strict=args.strict,
        resume=args.resume or False,
        dataset_kwargs=dataset_kwargs,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    from accelerate import PartialState

    if PartialState().is_main_process:
        resumed = f" (resumed from {summary.resumed_from})" if summary.resumed_from else ""
        print(
            f"trained {summary.steps} steps{resumed}; skipped {summary.skipped_images} unreadable images; "
            f"final tokenizer: {summary.final_dir}"
        )
    return 0
