"""The web demo's page: Gradio components around `handler.handle_request`.

Inputs reach the handler unprocessed (`preprocess=False`): Gradio's own image preprocessing opens the
upload with PIL and answers a non-image with a bare "Error", where the handler names the file and the
problem. Gradio still checks that an uploaded path lies in its upload cache before the handler sees it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .handler import RequestError, ServedModel, handle_request

DISPLAY_SIZE = 256  # px; reconstructions of a small tokenizer are enlarged (nearest neighbour) to be seen
HELD_OUT_EXAMPLES = 6


@dataclass(frozen=True)
class Example:
    label: str
    image: Path
    question: str | None = None


def demo_examples(model_dir: str | os.PathLike, count: int = HELD_OUT_EXAMPLES) -> list[Example]:
    """Held-out scenes with one of their questions, when `model_dir` is a VLM `dove-vlm demo` wrote; else none.

    The scenes are chosen as the demo's report chooses its examples (spread over the object counts), so
    the page shows the same kind of range of scene complexity.
    """
    from ..demo_measure import examples_by_complexity
    from ..demo_recipe import DemoPaths

    model_dir = Path(model_dir)
    paths = DemoPaths(model_dir.parent)
    scenes_file, questions_file = paths.data / "scenes.json", paths.split_file("test", "annotations.json")
    if model_dir.name not in (paths.stage1.name, paths.stage2.name) or not scenes_file.is_file():
        return []
    if not questions_file.is_file():
        return []
    scenes = [s for s in json.loads(scenes_file.read_text()) if s.get("split") == "test"]
    first_question: dict[str, str] = {}
    for record in json.loads(questions_file.read_text()):
        first_question.setdefault(str(record["image_id"]), str(record["question"]))
    examples = []
    for scene in examples_by_complexity(scenes, count):
        image_id = str(scene["image_id"])
        image = paths.images / f"{image_id}.png"
        if image.is_file() and image_id in first_question:
            examples.append(Example(f"{image_id}: {first_question[image_id]}", image, first_question[image_id]))
    return examples


def file_examples(files: Sequence[str | os.PathLike]) -> list[Example]:
    """Examples from image files the user names; a missing one is an error naming it."""
    examples = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"--examples: no image file at {path}")
        examples.append(Example(path.name, path.resolve()))
    return examples


def build_app(served: ServedModel, examples: Sequence[Example] = (), title: str = "dove-vlm") -> Any:
    """The page, as a `gradio.Blocks` (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local demo does not report its use
    import gradio as gr

    n = served.max_tokens
    with gr.Blocks(title=title) as app:
        gr.Markdown(
            f"# {title}\nAsk a question about an image and see how many visual tokens it costs (at most {n}), "
            "where the EOS head cut the sequence, and what those tokens kept."
        )
        with gr.Row():
            with gr.Column(scale=1):
                if examples:
                    picker = gr.Dropdown(
                        choices=[(e.label, i) for i, e in enumerate(examples)],
                        value=None,
                        label="Examples",
                        elem_id="examples",
                    )
                image = gr.Image(
                    type="filepath", sources=["upload", "clipboard"], label="Image", elem_id="image", height=256
                )
                question = gr.Textbox(label="Question", placeholder="What colour is the circle?", elem_id="question")
                use_query = gr.Checkbox(
                    value=True, label="Condition the visual tokens on the question (Q-DOVE)", elem_id="use-query"
                )
                automatic = gr.Checkbox(
                    value=True, label="Automatic length (the EOS head decides)", elem_id="automatic"
                )
                budget = gr.Slider(1, n, value=max(1, n // 4), step=1, label="Budget when not automatic (tokens)",
                                   elem_id="budget")  # fmt: skip
                threshold = gr.Slider(0.01, 0.99, value=served.default_threshold, step=0.01, label="EOS threshold",
                                      elem_id="threshold")  # fmt: skip
                compare = gr.Slider(1, n, value=n, step=1, label="Second reconstruction from (tokens)",
                                    elem_id="compare")  # fmt: skip
                submit = gr.Button("Ask", variant="primary", elem_id="submit")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                with gr.Row():
                    tokens = gr.Textbox(label="Visual tokens", interactive=False, elem_id="tokens")
                    seconds = gr.Textbox(label="Time", interactive=False, elem_id="time")
                eos = gr.Image(
                    label="EOS probability per position", format="png", interactive=False, elem_id="eos-plot"
                )
                with gr.Row():
                    seen = gr.Image(label="Input (as the tower sees it)", format="png", interactive=False,
                                    elem_id="input-view")  # fmt: skip
                    reconstruction = gr.Image(label="Reconstruction", format="png", interactive=False,
                                              elem_id="reconstruction")  # fmt: skip
                    comparison = gr.Image(label="Second budget", format="png", interactive=False,
                                          elem_id="comparison")  # fmt: skip

        def ask(image_payload: Any, text: str, query_on: bool, auto: bool, fixed: float, cut: float, second: float):
            path, name = _uploaded(image_payload)
            try:
                reply = handle_request(
                    served,
                    path,
                    text,
                    use_query=bool(query_on),
                    budget=None if auto else fixed,
                    threshold=cut,
                    compare_budget=second,
                    image_name=name,
                )
            except RequestError as err:
                return f"**Error:** {err}", "", "", "", None, None, None, None
            how = "automatic" if auto else "fixed budget"
            query = "query on" if query_on else "query off"
            return (
                "",
                reply.answer,
                f"{reply.visual_tokens} of {reply.max_tokens} ({how}, {query})",
                f"{reply.seconds:.2f} s",
                reply.eos_plot,
                _enlarge(reply.input_image),
                gr.Image(_enlarge(reply.reconstruction), label=f"Reconstruction from {reply.visual_tokens} tokens"),
                gr.Image(_enlarge(reply.comparison), label=f"Reconstruction from {reply.compare_budget} tokens"),
            )

        inputs = [image, question, use_query, automatic, budget, threshold, compare]
        outputs = [status, answer, tokens, seconds, eos, seen, reconstruction, comparison]
        submit.click(ask, inputs, outputs, preprocess=False, api_name="ask")
        question.submit(ask, inputs, outputs, preprocess=False, api_name=False)

        if examples:

            def pick(index: int | None):
                if index is None:
                    return gr.update(), gr.update()
                chosen = examples[int(index)]
                return str(chosen.image), chosen.question if chosen.question is not None else gr.update()

            picker.change(pick, [picker], [image, question], api_name=False)
    return app


def launch(
    served: ServedModel,
    examples: Sequence[Example] = (),
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    title: str = "dove-vlm",
) -> None:
    """Serve the page until interrupted. Requests run one at a time: they share one model."""
    app = build_app(served, examples, title=title)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        allowed_paths=[str(e.image) for e in examples],
        ssr_mode=False,
    )


def _uploaded(payload: Any) -> tuple[str | None, str | None]:
    """(server-side path, the user's file name) of an image input's raw value."""
    if not payload:
        return None, None
    if isinstance(payload, str):
        return payload, None
    return payload.get("path"), payload.get("orig_name")


def _enlarge(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    scale = max(1, size // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
