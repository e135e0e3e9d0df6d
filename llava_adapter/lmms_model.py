"""`dove_llava`: a `DoveLlavaForCausalLM` checkpoint as an lmms-eval model, counting the visual tokens of every answer.

    python -m lmms_eval --model dove_llava \
        --model_args pretrained=DIR,query=true,budget=auto --tasks ... --log_samples --output_path OUT

Model args (lmms-eval passes them as strings; `true`/`false` and numbers are converted):
    pretrained      a directory (or hub id) written by `DoveLlavaForCausalLM.save_pretrained`
    query           true: the question is the tower's query (Q-DOVE); false: the image alone (DOVE)
    budget          auto (the EOS head picks each length) or N (every image gets exactly N tokens)
    threshold       EOS probability that ends an image (default: the checkpoint's)
    batch_size      requests per forward (default 1)
    device          cuda, cuda:1, cpu ... (default: cuda when available)
    dtype           the LLM's: auto (default: bfloat16 on a GPU, float32 on the CPU), float32, bfloat16 or
                    float16 (the DOVE tower stays float32 regardless)
    max_new_tokens  when given, replaces every task's own limit on answer length (the task's
                    `generation_kwargs.max_new_tokens`; 1024, as lmms-eval's LLaVA models, where it names none)

How the counts travel: each answer is returned as an lmms-eval `GenerationResult` whose `TokenCounts`
(`VisualTokenCounts` here) adds `visual_tokens` and, for a sample that could not be answered, `error`.
lmms-eval writes them into each sample's `token_counts` in the samples log; task code can read them from
its request instances (see dove_vlm/lmms_tasks/dove_shapes_vqa). Answer throughput goes to lmms-eval's throughput
log, so a results JSON carries `throughput.avg_latency` (seconds per answer).

Bad samples never end a run: an image that is missing or unreadable, an empty question, or a prompt that
does not fit the LLM's maximum length gets an empty answer (scored wrong) and its error in the log.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger
from PIL import Image
from tqdm.auto import tqdm

from tokenizer.modeling.image_processing import ImageLoadError, load_image

from .conversation import require_question, tokenize_generation_prompt
from .inference import answer_questions, inference_dtype, load_pretrained_model, score_continuations
from .modeling import TruncationWarning

# Generation settings passed on to `generate`; other task keys (LLaVA's image_aspect_ratio ...) mean
# nothing to this model and are dropped.
_GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "num_beams",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
)
# A task that names no answer length gets what lmms-eval's own LLaVA models give it (llava, llava_hf: 1024);
# generation still ends at the EOS token.
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass
class VisualTokenCounts(TokenCounts):
    """lmms-eval's per-request token record plus what a variable-length tower adds: the visual tokens the
    answer cost, and the reason a sample was not answered."""

    visual_tokens: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = dict(super().to_dict())
        if self.visual_tokens is not None:
            record["visual_tokens"] = self.visual_tokens
        if self.error is not None:
            record["error"] = self.error
        return record


@dataclass
class _Sample:
    """One request made ready for the model, or the reason it cannot be."""

    index: int
    prompt: str
    query: str
    image: Image.Image | None = None
    prompt_tokens: int = 0
    error: str | None = None


class DoveLlava(lmms):
    is_simple = True

    def __init__(
        self,
        pretrained: str,
        query: bool | str = True,
        budget: int | str = "auto",
        threshold: float | str | None = None,
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int | str | None = None,
        max_batch_size: int | None = None,  # passed by lmms-eval's CLI; only meaningful for batch_size=auto
        *,
        release_on_clean: bool = True,
        **unknown: Any,
    ) -> None:
        """Model args as in the module docstring. `release_on_clean=False` keeps the weights through
        lmms-eval's `clean()`, for a caller that runs several evaluations on one instance (`eval-vqa`)."""
        super().__init__()
        if unknown:
            known = "pretrained, query, budget, threshold, batch_size, device, dtype, max_new_tokens"
            raise TypeError(f"dove_llava: unknown model arg(s) {sorted(unknown)}; known: {known}")
        if not pretrained:
            raise ValueError("dove_llava: model arg 'pretrained' (a saved DOVE-LLaVA directory) is required")
        self.pretrained = str(pretrained)
        self.use_query = _parse_bool("query", query)
        self.budget = _parse_budget(budget)
        self.threshold = _parse_threshold(threshold)
        self.batch_size_per_gpu = _parse_positive_int("batch_size", batch_size)
        self.max_new_tokens = (
            None if max_new_tokens in (None, "") else _parse_positive_int("max_new_tokens", max_new_tokens)
        )
        self._device = torch.device(_default_device(device))
        try:
            self.torch_dtype = inference_dtype(dtype, self._device)
        except ValueError as err:
            raise ValueError(f"dove_llava: {err}") from None
        self.release_on_clean = bool(release_on_clean)
        self._model = None
        self._tokenizer = None
        self._context_len = 0
        self._load()  # now, so a bad path fails before any task is built

    # ------------------------------------------------------------------ loading and lmms-eval's clean()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DoveLlava:
        """As lmms' own, except that a model arg wins over lmms-eval's CLI defaults (`--batch_size` is
        always passed, 1 unless given), instead of the two colliding."""
        from lmms_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    def _load(self) -> None:
        tokenizer, model, _, context_len = load_pretrained_model(
            self.pretrained, device=self._device, dtype=self.torch_dtype
        )
        self._check_setting(model)
        self._tokenizer, self._model, self._context_len = tokenizer, model.eval(), int(context_len)

    def _check_setting(self, model: Any) -> None:
        if self.budget is not None and self.budget > model.vision_tower.num_patches:
            raise ValueError(
                f"dove_llava: budget={self.budget} exceeds the tower's maximum of {model.vision_tower.num_patches} tokens"
            )
        if self.use_query and not model.vision_tower.use_query:
            eval_logger.warning(
                f"dove_llava: {self.pretrained} has a tower without query conditioning; query=true changes nothing"
            )

    def configure(self, query: bool | str | None = None, budget: int | str | None = None) -> None:
        """Switch the setting of a loaded instance (query conditioning, budget) between evaluations, so a
        sweep loads the weights once. Arguments left None keep their value; budget "auto" frees it."""
        if query is not None:
            self.use_query = _parse_bool("query", query)
        if budget is not None:
            self.budget = _parse_budget(budget)
        self._check_setting(self.model)

    @property
    def model(self):
        """The VLM, reloaded from `pretrained` if lmms-eval's `clean()` released it."""
        if self._model is None:
            eval_logger.info(f"dove_llava: reloading {self.pretrained} (released by clean())")
            self._load()
        return self._model

    @property
    def tokenizer(self):
        self.model  # noqa: B018 - loads the pair together
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def settings(self) -> dict[str, Any]:
        """The evaluation setting, as eval tables name it."""
        return {
            "query": self.use_query,
            "budget": "auto" if self.budget is None else self.budget,
            "threshold": self.threshold,
        }

    def clean(self) -> None:
        """lmms-eval calls this after the last request (to free memory for judge models). The weights are
        released, not lost: the next request reloads them, so one instance serves several evaluations."""
        if not self.release_on_clean:
            return
        self._model = None
        self._tokenizer = None
        super().clean()
        gc.collect()

    # ------------------------------------------------------------------ lmms-eval requests

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        answered, generated, model_seconds = 0, 0, 0.0
        model_errors: list[str] = []
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(_settings_key(request.args[1]), []).append(index)
        bar = self._progress_bar(len(requests), "dove_llava generate")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = _stop_sequences(gen_kwargs.get("until"))
            max_new_tokens = self.max_new_tokens or int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
            generation = {k: gen_kwargs[k] for k in _GENERATION_KEYS if k in gen_kwargs}
            if float(generation.get("temperature") or 0) == 0:  # lmms-eval's greedy: temperature 0
                generation.pop("temperature", None)
                generation["do_sample"] = False
            # Longest prompts first: the batch's padding shrinks and memory errors show up at once.
            indices = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = [self._prepare(i, requests[i]) for i in indices[start : start + self.batch_size]]
                runnable = [s for s in chunk if s.error is None]
                began = time.perf_counter()
                call = functools.partial(self._answer, max_new_tokens=max_new_tokens, generation=generation)
                answers = self._run(runnable, call, model_errors)
                model_seconds += time.perf_counter() - began
                for sample, answer in zip(runnable, answers):
                    if isinstance(answer, Exception):
                        sample.error = f"{type(answer).__name__}: {answer}"
                        continue
                    visual = int(answer.visual_tokens)
                    if sample.prompt_tokens - 1 + visual > self._context_len:
                        sample.error = (
                            f"the prompt ({sample.prompt_tokens - 1} text + {visual} visual tokens) "
                            f"exceeds the LLM's maximum length of {self._context_len}"
                        )
                        continue
                    text = _cut(answer.text, until)
                    output_tokens = getattr(answer, "generated_tokens", None)
                    if output_tokens is None:  # an estimate: the answer re-tokenized
                        output_tokens = len(self.tokenizer(answer.text, add_special_tokens=False)["input_ids"])
                    answered += 1
                    generated += output_tokens
                    results[sample.index] = GenerationResult(
                        text,
                        VisualTokenCounts(
                            input_tokens=sample.prompt_tokens - 1 + visual,
                            output_tokens=output_tokens,
                            visual_tokens=visual,
                        ),
                    )
                for sample in chunk:
                    if results[sample.index] is None:
                        eval_logger.warning(
                            f"dove_llava: {_describe(requests[sample.index])} not answered: {sample.error}"
                        )
                        results[sample.index] = GenerationResult("", VisualTokenCounts(error=sample.error))
                bar.update(len(chunk))
        bar.close()
        self._raise_if_nothing_ran(len(requests), answered, model_errors)
        if answered:
            log_metrics(
                total_elapsed_time=model_seconds,
                total_gen_tokens=generated,
                avg_speed=generated / model_seconds if model_seconds > 0 else 0.0,
                additional_metrics={"total_requests": answered},
            )
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """One (score, is_greedy) per request, where score is the continuation's NEGATIVE log-likelihood.

        Why negative: lmms-eval's multiple-choice scoring takes the argmin over the choices (its built-in
        models return a loss), so lower must mean more likely. The pair travels inside a
        `GenerationResult` because lmms-eval 0.7.3 turns a bare (float, bool) tuple into its string; the
        visual token count rides along. An unanswerable sample scores +inf, never the likeliest choice.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        model_errors: list[str] = []
        scored = 0
        bar = self._progress_bar(len(requests), "dove_llava loglikelihood")
        for start in range(0, len(requests), self.batch_size):
            chunk = [self._prepare(i, requests[i]) for i in range(start, min(start + self.batch_size, len(requests)))]
            runnable = [s for s in chunk if s.error is None]
            # The continuation is the assistant's answer, which starts its own turn: lmms-eval's word-boundary
            # space (target_delimiter) belongs to plain-text LMs, not to a chat-formatted answer.
            continuations = {s.index: str(requests[s.index].args[1]).lstrip() for s in runnable}
            continuation_lengths = {
                i: len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for i, text in continuations.items()
            }
            scores = self._run(runnable, functools.partial(self._score, continuations=continuations), model_errors)
            for sample, score in zip(runnable, scores):
                if isinstance(score, Exception):
                    sample.error = f"{type(score).__name__}: {score}"
                    continue
                (logprob, is_greedy), visual = score
                total = sample.prompt_tokens - 1 + visual + continuation_lengths[sample.index]
                if total > self._context_len:
                    sample.error = f"prompt and continuation ({total} tokens) exceed the LLM's maximum length of {self._context_len}"
                    continue
                scored += 1
                results[sample.index] = GenerationResult(
                    (-float(logprob), bool(is_greedy)), VisualTokenCounts(visual_tokens=visual)
                )
            for sample in chunk:
                if results[sample.index] is None:
                    eval_logger.warning(f"dove_llava: {_describe(requests[sample.index])} not scored: {sample.error}")
                    results[sample.index] = GenerationResult(
                        (float("inf"), False), VisualTokenCounts(error=sample.error)
                    )
            bar.update(len(chunk))
        bar.close()
        self._raise_if_nothing_ran(len(requests), scored, model_errors)
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "dove_llava answers one question per image and does not run multi-round tasks "
            "(output_type generate_until_multi_round); use generate_until or multiple-choice tasks"
        )

    # ------------------------------------------------------------------ helpers

    def _prepare(self, index: int, request: Instance) -> _Sample:
        """Everything about one request that can fail on its own input, checked before the model runs."""
        context, _, doc_to_visual, doc_id, task, split = request.args[:6]
        sample = _Sample(index=index, prompt=str(context), query="")
        try:
            sample.query = require_question(sample.prompt)
        except ValueError as err:
            sample.error = str(err)
            return sample
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        except Exception as err:  # noqa: BLE001 - any task's doc_to_visual; its failure is this sample's only
            sample.error = f"image: {type(err).__name__}: {err}"
            return sample
        images = [v for v in (visuals or []) if v is not None]
        if not images:
            sample.error = "no image"
            return sample
        if len(images) > 1:
            eval_logger.warning(f"dove_llava: {_describe(request)} has {len(images)} images; using the first")
        image = images[0]
        if isinstance(image, (str, os.PathLike)):
            try:  # a file is read now, so a missing one is this sample's input error, not a model failure
                image = load_image(image)
            except ImageLoadError as err:
                sample.error = f"image: {err}"
                return sample
        if not isinstance(image, Image.Image):
            sample.error = f"image: unsupported visual type {type(image).__name__} (images only)"
            return sample
        sample.image = image
        template = getattr(self.model.config, "conversation_template", "auto")
        sample.prompt_tokens = len(tokenize_generation_prompt(sample.prompt, self.tokenizer, template))
        if sample.prompt_tokens - 1 >= self._context_len:
            sample.error = (
                f"the prompt alone is {sample.prompt_tokens - 1} text tokens, not less than the LLM's "
                f"maximum length of {self._context_len}"
            )
        return sample

    def _answer(self, batch: list[_Sample], max_new_tokens: int, generation: dict[str, Any]) -> list:
        return answer_questions(
            self.model,
            self.tokenizer,
            [s.image for s in batch],
            [s.prompt for s in batch],
            use_query=self.use_query,
            budget=self.budget,
            threshold=self.threshold,
            max_new_tokens=max_new_tokens,
            batch_size=len(batch),
            queries=[s.query for s in batch] if self.use_query else None,
            **generation,
        )

    def _score(self, batch: list[_Sample], continuations: dict[int, str]) -> list[tuple[tuple[float, bool], int]]:
        """score_continuations on one batch, each score paired with its image's visual token count."""
        scores = score_continuations(
            self.model,
            self.tokenizer,
            [s.image for s in batch],
            [s.prompt for s in batch],
            [continuations[s.index] for s in batch],
            use_query=self.use_query,
            budget=self.budget,
            threshold=self.threshold,
            batch_size=len(batch),
            queries=[s.query for s in batch] if self.use_query else None,
        )
        return list(zip(scores, [int(n) for n in self.model.last_visual_lengths]))

    def _progress_bar(self, total: int, desc: str) -> tqdm:
        """One bar per request loop, on the first process only, as lmms-eval's own models draw it."""
        return tqdm(total=total, desc=desc, unit="req", disable=self.rank != 0)

    def _run(self, batch: list[_Sample], call: Callable[[list[_Sample]], list], errors: list[str]) -> list:
        """Run `call` on the batch; if it raises, run each sample alone so one bad sample costs only itself.
        Returns one result or exception per sample."""
        if not batch:
            return []
        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", category=TruncationWarning)  # checked per sample, reported as its error
                return list(call(batch))
        except Exception as batch_error:  # noqa: BLE001 - isolate the culprit below; one sample's error is logged
            if len(batch) == 1:
                errors.append(f"{type(batch_error).__name__}: {batch_error}")
                return [batch_error]
        outcomes: list = []
        for sample in batch:
            outcomes.extend(self._run([sample], call, errors))
        return outcomes

    @staticmethod
    def _raise_if_nothing_ran(total: int, succeeded: int, model_errors: list[str]) -> None:
        """Bad samples are logged and skipped; a model that fails on every sample is a broken model."""
        if total and not succeeded and model_errors:
            raise RuntimeError(f"dove_llava: the model failed on every request; first error: {model_errors[0]}")


# ---------------------------------------------------------------------------------------------- parsing


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"dove_llava: {name} must be true or false, got {value!r}")


def _parse_budget(value: Any) -> int | None:
    if value is None or str(value).strip().lower() in ("auto", "none", ""):
        return None
    budget = _parse_positive_int("budget", value)
    return budget


def _parse_threshold(value: Any) -> float | None:
    if value is None or str(value).strip().lower() in ("", "none", "default"):
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"dove_llava: threshold must be a number in (0, 1), got {value!r}") from None
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"dove_llava: threshold must lie in (0, 1), got {threshold}")
    return threshold


def _parse_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError(f"dove_llava: {name} must be a positive integer, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"dove_llava: {name} must be a positive integer, got {value!r}") from None
    if number != int(number) or number < 1:
        raise ValueError(f"dove_llava: {name} must be a positive integer, got {value!r}")
    return int(number)


def _default_device(device: str | None) -> str:
    if device:
        return str(device)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return f"cuda:{local_rank}"
    return "cpu"


def _settings_key(gen_kwargs: dict | None) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=str)


def _stop_sequences(until: Any) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
        return [u for u in until if u]
    raise ValueError(f"dove_llava: generation_kwargs 'until' must be a string or a list of strings, got {until!r}")


def _cut(text: str, until: Sequence[str]) -> str:
    """The answer up to the first stop sequence (generation itself stops at EOS or max_new_tokens)."""
    end = len(text)
    for stop in until:
        position = text.find(stop)
        if position != -1:
            end = min(end, position)
    return text[:end]


def _describe(request: Instance) -> str:
    return f"task {request.task_name!r} doc {request.doc_id}"
