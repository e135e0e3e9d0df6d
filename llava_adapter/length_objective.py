r"""The length learned from the answer: the tower's EOS head tuned by the VLM's own answer loss plus a token price.

DOVE trains its EOS head from reconstruction: stop when the picture is good enough. A VLM needs the answer,
not the picture. Lengths are a hard cut, so the LLM's loss never reaches the head by itself; this objective
gives it a gradient. The head's probabilities s_l = sigmoid(eos_logit_l), l = 1..N, are hazards (the chance
that the sequence ends at l once it got there) and define a distribution over an image's length

    p(L = l) = s_l * prod_{m <= i < l} (1 - s_i)     for m <= l < N     (m = the tokenizer's `min_tokens`)
    p(L = N) = prod_{m <= i < N} (1 - s_i)                               (the rest of the mass)
    p(L = l) = 0                                     for l < m

whose first position with s_l above the threshold is the length inference picks. Per image sample

    J = E_L[ loss(L) ] + beta * E[L],    E[L] = sum_l l p(L = l),

with loss(l) the sample's answer loss (mean negative log-likelihood per answer token, the LM loss) when
the image brings l tokens, and beta the token price: the answer loss one visual token must save to be
worth keeping. The batch's loss is the mean of J over its samples (a text-only sample adds its answer loss).

Estimator (`AnswerLengthObjective`, the default): the answer loss at K candidate lengths c_1 = m < ... <
c_K = N (`candidate_lengths`), interpolated linearly in between,

    loss(l) ~ ((c_{k+1} - l) loss(c_k) + (l - c_k) loss(c_{k+1})) / (c_{k+1} - c_k),   c_k <= l <= c_{k+1},
    E_L[loss(L)] ~ sum_k w_k loss(c_k),   w_k = sum_l p(L = l) a_{l,k}   (a: those interpolation weights),

so the head's gradient is sum_k (dw_k / dtheta) loss(c_k) + beta dE[L]/dtheta, deterministic, and exact
when every length from m to N is a candidate; the LLM and projector get sum_k w_k dloss(c_k)/dphi, i.e. they
train at the lengths the head is about to choose. The alternative, a score-function (REINFORCE) estimator
with the greedy length as baseline (`sampled_answer_length_objective`), is unbiased but noisy;
docs/benchmarks.md has the two measured against the exact gradient at equal LLM passes.

Cost per step: ONE tower pass (every candidate is a prefix of the same tokens, see
`DoveVisionTower.sharing_one_pass`) and K LLM forward passes with their backward, i.e. about K times the
LLM cost of a plain stage-2 step. Batches hold at most one image per sample (as `LlavaCollator` builds them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .constants import IGNORE_INDEX

DEFAULT_CANDIDATES = 4


def length_distribution(eos_logits: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """EOS logits [B, N] -> p(L = l) [B, N] (column l - 1 for length l), computed in log space, in float32
    or wider."""
    logits = eos_logits.to(_at_least_float32(eos_logits.dtype))
    max_tokens = logits.shape[-1]
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"min_tokens must lie in [1, {max_tokens}], got {min_tokens}")
    position = torch.arange(1, max_tokens + 1, device=logits.device)
    can_end = position >= min_tokens
    # log s_l where a sequence may end (the last position takes the rest: log 1), and log(1 - s_i) where it
    # may go on past i (positions before min_tokens always go on: log 1).
    log_end = torch.where(position == max_tokens, torch.zeros_like(logits), F.logsigmoid(logits))
    log_go_on = torch.where(can_end, F.logsigmoid(-logits), torch.zeros_like(logits))
    log_reach = torch.cumsum(log_go_on, dim=-1) - log_go_on  # sum over i < l
    return torch.where(can_end, torch.exp(log_end + log_reach), torch.zeros_like(logits))


def expected_length(probs: torch.Tensor) -> torch.Tensor:
    """E[L] per row of a length distribution [B, N]."""
    lengths = torch.arange(1, probs.shape[-1] + 1, device=probs.device, dtype=probs.dtype)
    return probs @ lengths


def candidate_lengths(min_tokens: int, max_tokens: int, count: int = DEFAULT_CANDIDATES) -> list[int]:
    """`count` lengths from `min_tokens` to `max_tokens`, both included, spaced evenly in log length (an
    answer usually changes most over the first tokens); every length when `count` covers them all."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens} and {max_tokens}")
    span = max_tokens - min_tokens + 1
    if count < 2 and span > 1:
        raise ValueError(f"count must be at least 2 (the shortest and the longest length), got {count}")
    if count >= span:
        return list(range(min_tokens, max_tokens + 1))
    chosen = {min_tokens, max_tokens}
    step = math.log(max_tokens / min_tokens) / (count - 1)
    for index in range(1, count - 1):
        chosen.add(round(min_tokens * math.exp(step * index)))
    spare = (n for n in range(min_tokens, max_tokens + 1) if n not in chosen)
    while len(chosen) < count:  # rounding merged two: fill with the shortest unused lengths
        chosen.add(next(spare))
    return sorted(chosen)


def interpolation_weights(candidates: Sequence[int], max_tokens: int) -> torch.Tensor:
    """[N, K]: row l - 1 holds the weights that interpolate the loss at length l linearly from the two
    candidates around it (zero rows below the shortest candidate, where p(L = l) is zero)."""
    candidates = list(candidates)
    if candidates != sorted(set(candidates)) or candidates[-1] != max_tokens:
        raise ValueError(f"candidates must be increasing and end at max_tokens={max_tokens}, got {candidates}")
    weights = torch.zeros(max_tokens, len(candidates))
    for length in range(candidates[0], max_tokens + 1):
        upper = next(k for k, c in enumerate(candidates) if c >= length)
        if candidates[upper] == length:
            weights[length - 1, upper] = 1.0
            continue
        low, high = candidates[upper - 1], candidates[upper]
        weights[length - 1, upper - 1] = (high - length) / (high - low)
        weights[length - 1, upper] = (length - low) / (high - low)
    return weights


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's answer loss (mean next-token NLL over its supervised positions, as the LM loss averages
    them) [B], and whether the row has any supervised position [B]."""
    targets = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].to(_at_least_float32(logits.dtype)).flatten(0, 1),
        targets.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    counted = (targets != IGNORE_INDEX).sum(dim=1)
    return nll.sum(dim=1) / counted.clamp(min=1), counted > 0


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


@dataclass
class LengthObjectiveOutput:
    """`loss` is what training differentiates; the rest is for logs (detached)."""

    loss: torch.Tensor
    objective: float  # the estimate of mean J over the batch
    answer_loss: float  # its E[loss(L)] part
    expected_length: float  # mean E[L] over the batch's images
    threshold_length: float  # mean length the threshold picks (what inference uses)
    llm_passes: int


@dataclass
class _Rows:
    """Which batch row each image belongs to (one image per row at most)."""

    image_row: torch.Tensor  # [n_images] row index
    has_image: torch.Tensor  # [B] bool


def _image_rows(inputs: Mapping[str, Any], image_token_id: int) -> _Rows:
    input_ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    placeholders = input_ids == image_token_id
    if mask is not None:
        placeholders &= mask.bool()
    counts = placeholders.sum(dim=1)
    if int(counts.max()) > 1:
        row = int((counts > 1).nonzero()[0])
        raise ValueError(
            f"the length objective takes at most one image per sample; batch row {row} has {int(counts[row])} "
            "<image> placeholders"
        )
    has_image = counts > 0
    return _Rows(image_row=has_image.nonzero().flatten(), has_image=has_image)


def _check_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    for name in ("budget", "threshold", "image_sample_mask"):
        if inputs.get(name) is not None:
            raise ValueError(f"the length objective chooses the lengths itself; the batch must not carry {name!r}")
    return {k: v for k, v in inputs.items() if k not in ("budget", "threshold", "image_sample_mask")}


def _row_losses(model: Callable[..., Any], inputs: Mapping[str, Any], budget: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(**inputs, budget=budget)
    return answer_losses(out.logits, out.labels)


class AnswerLengthObjective:
    """E_L[answer loss(L)] + beta * E[L] from K candidate lengths sharing one tower pass (module docstring).

    Call it with the model to run (a `DoveLlavaForCausalLM`, or the DeepSpeed / DDP engine wrapping one),
    the `DoveLlavaForCausalLM` itself (for its tower and config) and a collated batch.
    """

    def __init__(self, token_price: float, candidates: int = DEFAULT_CANDIDATES) -> None:
        if not math.isfinite(token_price) or token_price < 0:
            raise ValueError(f"token_price must be a finite number >= 0, got {token_price}")
        self.token_price = float(token_price)
        self.candidates = int(candidates)

    def __call__(self, model: Callable[..., Any], vlm: Any, inputs: Mapping[str, Any]) -> LengthObjectiveOutput:
        inputs = _check_inputs(inputs)
        tower = vlm.vision_tower
        max_tokens, min_tokens = tower.num_patches, tower.config.min_tokens
        rows = _image_rows(inputs, vlm.config.image_token_id)
        if inputs.get("images") is None or not bool(rows.has_image.any()):
            out = model(**inputs)
            return LengthObjectiveOutput(out.loss, float(out.loss), float(out.loss), math.nan, math.nan, 1)
        lengths = candidate_lengths(min_tokens, max_tokens, self.candidates)
        losses, answered = [], None
        with tower.sharing_one_pass():
            for length in lengths:
                row_loss, answered = _row_losses(model, inputs, length)
                losses.append(row_loss)
            eos_logits = tower.last_eos_logits
            threshold_lengths = tower.tokenizer.choose_lengths(
                torch.sigmoid(eos_logits.detach().float()), tower.threshold
            )
        per_length = torch.stack(losses, dim=1)  # [B, K]
        probs = length_distribution(eos_logits, min_tokens)  # [n_images, N]
        weights = probs @ interpolation_weights(lengths, max_tokens).to(probs)  # [n_images, K]
        return _combine(
            per_length[:, 0],
            (weights * per_length[rows.image_row]).sum(dim=1),
            expected_length(probs),
            rows,
            answered,
            self.token_price,
            threshold_lengths,
            len(lengths),
        )


def sampled_answer_length_objective(
    model: Callable[..., Any], vlm: Any, inputs: Mapping[str, Any], token_price: float, samples: int = 1
) -> LengthObjectiveOutput:
    """The score-function alternative: `samples` lengths per image drawn from p(L), the answer loss at each, and
    the greedy (threshold) length's loss as baseline b:

        dJ/dtheta ~ (1 / S) sum_j (loss(L_j) - b) dlog p(L_j)/dtheta + beta dE[L]/dtheta,

    unbiased for the head, 1 + S LLM passes per step, one tower pass. Kept to measure the default against."""
    inputs = _check_inputs(inputs)
    tower = vlm.vision_tower
    min_tokens = tower.config.min_tokens
    rows = _image_rows(inputs, vlm.config.image_token_id)
    with tower.sharing_one_pass():
        baseline, answered = _row_losses(model, inputs, None)
        eos_logits = tower.last_eos_logits
        greedy = tower.last_lengths.clone()
        probs = length_distribution(eos_logits, min_tokens)
        sampled, log_probs = [], []
        for _ in range(samples):
            draw = torch.multinomial(probs.detach(), 1).squeeze(1) + 1  # [n_images], lengths 1..N
            row_loss, _ = _row_losses(model, inputs, draw.tolist())
            sampled.append(row_loss)
            log_probs.append(torch.log(probs.gather(1, (draw - 1).unsqueeze(1)).squeeze(1).clamp(min=1e-30)))
    losses = torch.stack(sampled, dim=1)  # [B, S]
    advantage = (losses[rows.image_row] - baseline[rows.image_row].unsqueeze(1)).detach()
    surrogate = (advantage * torch.stack(log_probs, dim=1)).mean(dim=1)  # gradient only, value ~0 in expectation
    image_answer = losses[rows.image_row].mean(dim=1) + surrogate - surrogate.detach()
    return _combine(baseline, image_answer, expected_length(probs), rows, answered, token_price, greedy, 1 + samples)


def _combine(
    text_loss: torch.Tensor,
    image_answer: torch.Tensor,
    image_length: torch.Tensor,
    rows: _Rows,
    answered: torch.Tensor,
    token_price: float,
    threshold_lengths: torch.Tensor,
    llm_passes: int,
) -> LengthObjectiveOutput:
    """Mean J over the rows that count: those with an answer to learn, and those with an image (its price)."""
    answer = torch.where(answered, text_loss, torch.zeros_like(text_loss))
    answer = answer.index_put((rows.image_row,), torch.where(answered[rows.image_row], image_answer, 0.0))
    price = torch.zeros_like(answer).index_put((rows.image_row,), token_price * image_length)
    counted = answered | rows.has_image
    total = (answer + price)[counted].mean()
    answer_part = answer[counted].mean()
    return LengthObjectiveOutput(
        loss=total,
        objective=float(total.detach()),
        answer_loss=float(answer_part.detach()),
        expected_length=float(image_length.detach().mean()),
        threshold_length=float(threshold_lengths.float().mean()),
        llm_passes=llm_passes,
    )
