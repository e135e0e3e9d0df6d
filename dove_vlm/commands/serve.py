"""`dove-vlm serve`: a local web demo (Gradio) of a saved DOVE-LLaVA model."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from ._args import add_dtype_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="a web page to ask a saved VLM about images and see the visual tokens it spends"
    )
    parser.add_argument("--model", required=True, help="directory (or hub id) written by save_pretrained")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    parser.add_argument(
        "--examples",
        nargs="+",
        default=None,
        metavar="IMAGE",
        help="image files offered as examples (default: the demo's held-out scenes when --model is the demo's)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest answer (as `chat`)")
    parser.add_argument("--device", default="cpu")
    add_dtype_argument(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("gradio") is None:
        print("dove-vlm serve: error: needs Gradio; install it with: pip install 'dove-vlm[serve]'", file=sys.stderr)
        return 2
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    from ..serve.app import demo_examples, file_examples, launch
    from ..serve.handler import ServedModel

    examples = file_examples(args.examples) if args.examples else demo_examples(args.model)
    served = ServedModel.load(args.model, device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens)
    launch(served, examples, host=args.host, port=args.port, share=args.share)
    return 0
