"""The web demo's request handler, apart from any web framework so it can be called and tested directly.

One request: an image and a question, query conditioning on or off, a budget (automatic or fixed) and an
EOS threshold. The answer comes from `answer_questions`, the call `dove-vlm chat` makes, so the page and
the command agree on the answer and the visual token count. The tower is then run once more over the
whole sequence (every budget is a prefix of it) for what the page shows besides the answer: the EOS
probability at each position, and reconstructions from the tokens the LLM saw and from a second budget.
Bad input raises `RequestError`, whose message is written for the person at the page.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from llava_adapter.conversation import require_question, tokenize_generation_prompt, tower_query
from llava_adapter.inference import answer_questions, load_pretrained_model
from tokenizer import ImageLoadError, load_image
from tokenizer.evaluation.visualize import tensor_to_pil

DEFAULT_MAX_NEW_TOKENS = 64  # `dove-vlm chat`'s default, so both answer alike


class RequestError(ValueError):
    """Input the demo refuses (no image, an unreadable file, an empty or overlong question, a bad control)."""


@dataclass
class ServedModel:
    """A VLM loaded once for every request, with the generation settings the server was started with."""

    model: Any
    tokenizer: Any
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str = "cpu",
        dtype: str = "auto",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> ServedModel:
        tokenizer, model, _, _ = load_pretrained_model(path, device=device, dtype=dtype)
        return cls(model=model, tokenizer=tokenizer, max_new_tokens=max_new_tokens)

    @property
    def max_tokens(self) -> int:
        """The most visual tokens an image can cost."""
        return int(self.model.vision_tower.num_patches)

    @property
    def default_threshold(self) -> float:
        """The EOS threshold the tower uses when a request names none."""
        tower = self.model.vision_tower
        return float(tower.threshold if tower.threshold is not None else tower.config.eos_threshold)

    @property
    def max_question_tokens(self) -> int:
        """The longest prompt that leaves room in the LLM's context for the most visual tokens and the answer."""
        return int(self.model.max_length) - self.max_tokens - self.max_new_tokens


@dataclass
class Reply:
    """What the page shows for one request."""

    answer: str
    visual_tokens: int
    max_tokens: int
    threshold: float
    eos_probs: list[float]
    input_image: Image.Image  # the image as the tower sees it (resized and cropped)
    reconstruction: Image.Image  # from the `visual_tokens` tokens the LLM saw
    compare_budget: int
    comparison: Image.Image  # from the first `compare_budget` tokens of the same sequence
    eos_plot: Image.Image
    seconds: float


def handle_request(
    served: ServedModel,
    image: Image.Image | str | os.PathLike | None,
    question: str | None,
    use_query: bool = True,
    budget: int | None = None,
    threshold: float | None = None,
    compare_budget: int | None = None,
    image_name: str | None = None,
) -> Reply:
    """Answer `question` about `image` and show what the visual tokens cost and kept.

    `budget` None lets the EOS head choose the length at `threshold` (None: the model's); `compare_budget`
    (None: the most tokens) is the second reconstruction's. `image_name` names an uploaded file in
    messages (its on-disk path is a server-side temporary name).
    """
    start = time.perf_counter()
    question = _check_question(served, question)
    threshold = served.default_threshold if threshold is None else float(threshold)
    if not 0.0 < threshold < 1.0:
        raise RequestError(f"The EOS threshold must lie strictly between 0 and 1, not {threshold}.")
    budget = None if budget is None else _check_budget(served, budget, "budget")
    compare_budget = (
        served.max_tokens if compare_budget is None else _check_budget(served, compare_budget, "comparison budget")
    )
    picture = _load(image, image_name)

    model, tower = served.model, served.model.vision_tower
    (answer,) = answer_questions(
        model,
        served.tokenizer,
        [picture],
        [question],
        use_query=use_query,
        budget=budget,
        threshold=threshold,
        max_new_tokens=served.max_new_tokens,
    )
    query = tower_query(question) if use_query and tower.use_query else None
    dove = tower.tokenizer
    with torch.no_grad():
        pixels = dove.pixels(picture)
        full = dove.encode(pixels, queries=[query], budget=served.max_tokens)
        kept = answer.visual_tokens
        reconstruction = dove.decode(full.tokens[:, :kept], [kept])
        comparison = dove.decode(full.tokens[:, :compare_budget], [compare_budget])
    eos_probs = [float(p) for p in full.eos_probs[0]]
    return Reply(
        answer=answer.text,
        visual_tokens=kept,
        max_tokens=served.max_tokens,
        threshold=threshold,
        eos_probs=eos_probs,
        input_image=tensor_to_pil(pixels[0]),
        reconstruction=tensor_to_pil(reconstruction[0]),
        compare_budget=compare_budget,
        comparison=tensor_to_pil(comparison[0]),
        eos_plot=eos_plot(eos_probs, threshold, kept, automatic=budget is None and tower.budget is None),
        seconds=time.perf_counter() - start,
    )


def eos_plot(eos_probs: list[float], threshold: float, cut: int, automatic: bool = True) -> Image.Image:
    """EOS probability per position, the threshold, and the cut the LLM's tokens end at.

    Drawn with matplotlib's object API (no pyplot): requests run in worker threads and pyplot's global
    figure state is not thread-safe.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 2.6), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    positions = range(1, len(eos_probs) + 1)
    axis.plot(positions, eos_probs, "o-", markersize=3, color="tab:blue", label="P(EOS)")
    axis.axhline(threshold, color="tab:gray", linestyle="--", linewidth=1, label=f"threshold {threshold:g}")
    how = "automatic" if automatic else "fixed budget"
    axis.axvline(cut, color="tab:red", linewidth=1.5, label=f"cut: {cut} tokens ({how})")
    axis.set(xlabel="token position", ylabel="P(EOS)", ylim=(-0.02, 1.02), xlim=(0.5, len(eos_probs) + 0.5))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _check_question(served: ServedModel, question: str | None) -> str:
    if question is None or not str(question).strip():
        raise RequestError("Type a question about the image.")
    try:
        require_question(question)
    except ValueError as err:
        raise RequestError(f"The question asks nothing: {err}") from None
    prompt = tokenize_generation_prompt(question, served.tokenizer, served.model.config.conversation_template)
    if len(prompt) > served.max_question_tokens:
        raise RequestError(
            f"The question is too long: its prompt is {len(prompt)} tokens, and this model's context "
            f"({served.model.max_length} tokens) leaves {served.max_question_tokens} once the image "
            f"({served.max_tokens} tokens at most) and the answer ({served.max_new_tokens}) have their room."
        )
    return str(question)


def _check_budget(served: ServedModel, value: Any, what: str) -> int:
    try:
        budget = int(value)
    except (TypeError, ValueError):
        raise RequestError(f"The {what} must be a whole number of tokens, not {value!r}.") from None
    if budget != value or not 1 <= budget <= served.max_tokens:
        raise RequestError(f"The {what} must be a whole number from 1 to {served.max_tokens}, not {value!r}.")
    return budget


def _load(image: Image.Image | str | os.PathLike | None, name: str | None) -> Image.Image:
    if image is None:
        raise RequestError("Upload an image (or pick an example) first.")
    if isinstance(image, Image.Image):
        return image
    try:
        return load_image(image, name=name or Path(image).name)
    except ImageLoadError as err:
        raise RequestError(f"Could not read the image: {err}") from None
