"""Loading a saved VLM and asking it about images: batched answers and multiple-choice scoring.

`load_pretrained_model` returns `(tokenizer, model, image_processor, context_len)`, LLaVA's order, so
code written against LLaVA's builder reads naturally. With query conditioning on, the tower reads the
question (never an answer or a continuation) as its Q-DOVE query; it is ignored by a tower built with
`use_query=False`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokenizer.hub import resolve_pretrained_dir

from .constants import IGNORE_INDEX
from .conversation import require_question, tokenize_generation_prompt, tower_query
from .modeling import DoveLlavaForCausalLM

ImageLike = Image.Image | str | os.PathLike | torch.Tensor


@dataclass
class Answer:
    text: str
    visual_tokens: int
    generated_tokens: int = 0


INFERENCE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", *INFERENCE_DTYPES)


def inference_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The LLM's dtype for answering questions: a name from `DTYPE_CHOICES` or a torch dtype.

    "auto" is bfloat16 on a GPU that computes in it (half the memory, the precision LLaVA-style models are
    evaluated in) and float32 elsewhere (a CPU runs bf16 matmuls slowly). Training never comes here: it
    loads float32 master weights.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype)
    if name == "auto":
        on_gpu = torch.device(device).type == "cuda"
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    return INFERENCE_DTYPES[name]


def load_pretrained_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "auto"
) -> tuple[PreTrainedTokenizerBase, DoveLlavaForCausalLM, Any, int]:
    """(LLM tokenizer, model in eval mode, the tower's image processor, max tokens the LLM may see).

    `dtype` is the LLM's (see `inference_dtype`; "auto": bfloat16 on a GPU, float32 on the CPU); the
    tower keeps float32.
    """
    directory = resolve_pretrained_dir(path)
    model = DoveLlavaForCausalLM.from_pretrained(directory, dtype=inference_dtype(dtype, device))
    model = model.to(device).eval()
    tokenizer = load_llm_tokenizer(directory, model)
    return tokenizer, model, model.vision_tower.image_processor, model.max_length


def load_llm_tokenizer(directory: str | os.PathLike, model: DoveLlavaForCausalLM) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the model, else the one of the LLM's source."""
    directory = Path(directory)
    if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(directory)
    if model.config.llm_source:
        return AutoTokenizer.from_pretrained(resolve_pretrained_dir(model.config.llm_source))
    raise FileNotFoundError(
        f"{directory} holds no LLM tokenizer and its config records no llm_source; "
        "save the model with save_pretrained(dir, tokenizer=...)"
    )


def answer_questions(
    model: DoveLlavaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[ImageLike],
    questions: Sequence[str],
    use_query: bool = True,
    budget: int | None = None,
    threshold: float | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 8,
    template: str | None = None,
    queries: Sequence[str | None] | None = None,
    **generation_kwargs: Any,
) -> list[Answer]:
    """One answer per (image, question), greedy unless `generation_kwargs` say otherwise.

    `queries` (one per question) replace the question as the tower's query, e.g. the question without
    a benchmark's answer-format instruction."""
    _check_lengths(images=images, questions=questions, **({"queries": queries} if queries is not None else {}))
    for index, question in enumerate(questions):
        require_question(question, f"questions[{index}]")
    template = template or model.config.conversation_template
    generation_kwargs.setdefault("do_sample", False)
    generation_kwargs.setdefault("pad_token_id", _pad_id(tokenizer))
    generation_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    answers: list[Answer] = []
    for start in range(0, len(questions), batch_size):
        chunk = slice(start, start + batch_size)
        pixels = _pixels(model, images[chunk])
        prompts = [tokenize_generation_prompt(q, tokenizer, template, has_image=True) for q in questions[chunk]]
        input_ids, attention_mask = _pad(prompts, _pad_id(tokenizer), side="left")
        tower_queries = _tower_queries(questions[chunk], queries[chunk] if queries is not None else None, use_query)
        with torch.no_grad():
            new_tokens = model.generate(
                input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                images=pixels,
                queries=tower_queries,
                budget=budget,
                threshold=threshold,
                max_new_tokens=max_new_tokens,
                **generation_kwargs,
            )
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        counts = _generated_counts(new_tokens, generation_kwargs["eos_token_id"])
        answers += [Answer(t.strip(), n, c) for t, n, c in zip(texts, model.last_visual_lengths, counts)]
    return answers


def score_continuations(
    model: DoveLlavaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    images: Sequence[ImageLike],
    contexts: Sequence[str],
    continuations: Sequence[str],
    use_query: bool = True,
    budget: int | None = None,
    threshold: float | None = None,
    batch_size: int = 8,
    template: str | None = None,
    queries: Sequence[str | None] | None = None,
) -> list[tuple[float, bool]]:
    """For each (image, context, continuation): (sum of the continuation's token log-probs, whether greedy
    decoding would produce exactly it). The context is the question; the continuation follows the
    generation prompt as an answer would."""
    _check_lengths(images=images, contexts=contexts, continuations=continuations,
                   **({"queries": queries} if queries is not None else {}))
    for index, context in enumerate(contexts):
        require_question(context, f"contexts[{index}]")
    template = template or model.config.conversation_template
    results: list[tuple[float, bool]] = []
    for start in range(0, len(contexts), batch_size):
        chunk = slice(start, start + batch_size)
        rows, row_labels = [], []
        for index, (context, continuation) in enumerate(zip(contexts[chunk], continuations[chunk])):
            prompt = tokenize_generation_prompt(context, tokenizer, template, has_image=True)
            answer = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if not answer:
                raise ValueError(f"continuations[{start + index}] is empty: nothing to score")
            rows.append(prompt + answer)
            row_labels.append([IGNORE_INDEX] * len(prompt) + answer)
        input_ids, attention_mask = _pad(rows, _pad_id(tokenizer), side="right")
        labels, _ = _pad(row_labels, IGNORE_INDEX, side="right")
        tower_queries = _tower_queries(contexts[chunk], queries[chunk] if queries is not None else None, use_query)
        with torch.no_grad():
            out = model(
                input_ids=input_ids.to(model.device),
                attention_mask=attention_mask.to(model.device),
                labels=labels.to(model.device),
                images=_pixels(model, images[chunk]),
                queries=tower_queries,
                budget=budget,
                threshold=threshold,
            )
        logits = out.logits[:, :-1].float()
        targets = out.labels[:, 1:]
        log_probs = torch.log_softmax(logits, dim=-1)
        scored = targets != IGNORE_INDEX
        picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        greedy = logits.argmax(dim=-1) == targets
        for row in range(len(rows)):
            mask = scored[row]
            results.append((float(picked[row][mask].sum()), bool(greedy[row][mask].all())))
    return results


def _tower_queries(
    texts: Sequence[str], queries: Sequence[str | None] | None, use_query: bool
) -> list[str | None] | None:
    """The tower's queries: the given ones, else the question texts as `tower_query` cleans them; None when off."""
    if not use_query:
        return None
    return list(queries) if queries is not None else [tower_query(t) for t in texts]


def _generated_counts(new_tokens: torch.Tensor, eos_token_id: Any) -> list[int]:
    """New tokens per row up to and including the first EOS (the rest is padding)."""
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    is_eos = torch.isin(new_tokens.cpu(), eos_ids)
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, torch.full_like(is_eos[:, 0], new_tokens.shape[1], dtype=torch.long))
    return [int(n) for n in first]


def _check_lengths(**lists: Sequence[Any]) -> None:
    sizes = {name: len(values) for name, values in lists.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"these lists must have one entry per sample: {sizes}")


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the LLM tokenizer has neither a pad nor an EOS token to pad batches with")


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        ids[index, span] = torch.tensor(list(row), dtype=torch.long)
        mask[index, span] = 1
    return ids, mask


def _pixels(model: DoveLlavaForCausalLM, images: Sequence[ImageLike]) -> torch.Tensor:
    """Paths, PIL images or tensors -> [B,3,S,S]; a missing or broken file raises `ImageLoadError` naming it."""
    return model.vision_tower.image_processor.to_tensor(list(images)).to(model.vision_tower.device)
