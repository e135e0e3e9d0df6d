"""`dove-vlm chat`: ask a saved DOVE-LLaVA model one question about one image."""

from __future__ import annotations

import argparse

from ._args import add_dtype_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="answer a question about an image with a saved VLM")
    parser.add_argument("--model", required=True, help="directory (or hub id) written by save_pretrained")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", required=True, help="question about the image")
    parser.add_argument("--no-query", action="store_true", help="do not condition the visual tokens on the question")
    parser.add_argument("--budget", type=int, default=None, help="force this many visual tokens (default: automatic)")
    parser.add_argument("--threshold", type=float, default=None, help="EOS threshold (default: the model's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    add_dtype_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from llava_adapter.conversation import require_question
    from llava_adapter.inference import answer_questions, load_pretrained_model

    require_question(args.question, "--question")  # before the model loads: the same rule as evaluation
    tokenizer, model, _, _ = load_pretrained_model(args.model, device=args.device, dtype=args.dtype)
    if args.budget is not None and not 1 <= args.budget <= model.vision_tower.num_patches:
        raise ValueError(f"--budget: {args.budget} is outside [1, {model.vision_tower.num_patches}] for this model")
    (answer,) = answer_questions(
        model,
        tokenizer,
        [args.image],
        [args.question],
        use_query=not args.no_query,
        budget=args.budget,
        threshold=args.threshold,
        max_new_tokens=args.max_new_tokens,
    )
    print(answer.text)
    print(f"visual tokens: {answer.visual_tokens}")
    return 0
