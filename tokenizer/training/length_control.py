"""Length control: teaching the EOS head how many tokens each image needs.

Nothing labels the right length of an image. Instead, every training sample is reconstructed at some
length L, and its reconstruction loss is compared with a running threshold: if L tokens were enough
(the loss beat the threshold) the sequence may end at L; if not, it must not end at or before L. Over
many samples, simple images beat the threshold with few tokens and busy images only with many, so the
learnt lengths follow image complexity.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LengthControl", "sample_training_lengths"]


class LengthControl:
    r"""The EOS loss against a dynamic threshold tau, the mean reconstruction loss of recent steps.

    For a batch with EOS logits s_{b,i} (position i = 1..N), reconstruction lengths L_b and per-sample
    reconstruction losses r_b (at length L_b):

        tau        = mean of the last `history` batch-mean losses of b's kind (this batch's before any)
        good_b     = [r_b <= tau]
        l_b        = BCE(s_{b,L_b}, 1)                              if good_b   (end here: L_b was enough)
                   = (1 / L_b) * sum_{i=1..L_b} BCE(s_{b,i}, 0)     otherwise  (do not end at or before L_b)
        w(step)    = weight_start + (weight_max - weight_start) * min(1, (step - start_step) / ramp_steps)
        loss       = w(step) * (1 / B) * sum_b l_b

    with BCE(s, y) = -y log sigmoid(s) - (1 - y) log(1 - sigmoid(s)). r_b and tau carry no gradient.

    Why it works: the EOS probability at position i is trained towards (approximately) P(a reconstruction
    from i tokens beats the running average): a good sample is a positive example for its own length, and a bad one a
    negative example for its length and every shorter one (fewer tokens would not have done better).
    Inference takes the first position whose probability passes 0.5, i.e. the shortest length that is
    likely good enough; a complex image needs more tokens before it beats tau, so it gets a longer
    sequence. As the tokenizer improves tau falls, which keeps asking for better reconstructions rather
    than settling. A bad sample's positions are averaged so each sample casts one vote whatever its length;
    the weight starts tiny because early losses say nothing yet about what each image needs, and its ramp
    counts from `start_step`, the first step length control runs (after any warm-up phases), so it is not
    spent before there is anything to ramp.

    Samples may come in `KINDS` kinds, each judged against its own history (kind `WHOLE_IMAGE` or
    `QUESTION`): Q-DOVE judges a sample with a question by its boxes' mean loss and one without by the
    whole image's, and the two are not on one scale (a box sits on an object, a whole image is mostly
    background). What each history records is the caller's choice; the training loop records, for
    questions, the error whole-image reconstructions leave in the boxes (see `TokenizerTrainer`).

    Under DDP, pass every rank the same (all-reduced) batch mean to `update`, so all ranks share tau and
    the saved state.
    """

    WHOLE_IMAGE = 0
    QUESTION = 1
    KINDS = 2

    def __init__(
        self,
        history: int = 100,
        weight_start: float = 1e-4,
        weight_max: float = 0.1,
        ramp_steps: int = 1000,
        start_step: int = 0,
    ) -> None:
        if history < 1:
            raise ValueError(f"length-control history must be >= 1 steps, got {history}")
        if weight_start < 0 or weight_max < 0:
            raise ValueError(f"length-control weights must be >= 0, got start={weight_start}, max={weight_max}")
        if ramp_steps < 0:
            raise ValueError(f"length-control ramp_steps must be >= 0, got {ramp_steps}")
        if start_step < 0:
            raise ValueError(f"length-control start_step must be >= 0, got {start_step}")
        self.history = int(history)
        self.weight_start = float(weight_start)
        self.weight_max = float(weight_max)
        self.ramp_steps = int(ramp_steps)
        self.start_step = int(start_step)
        self._histories: tuple[deque[float], ...] = tuple(deque(maxlen=self.history) for _ in range(self.KINDS))
        self.skipped = 0

    @property
    def threshold(self) -> float | None:
        """tau of whole images (every sample, without Q-DOVE): the mean of its recorded losses, or None."""
        return self.threshold_of(self.WHOLE_IMAGE)

    def threshold_of(self, kind: int) -> float | None:
        """tau of one kind of sample, or None before its first `update`."""
        losses = self._histories[kind]
        return math.fsum(losses) / len(losses) if losses else None

    @property
    def recorded(self) -> list[float]:
        return list(self._histories[self.WHOLE_IMAGE])

    def recorded_of(self, kind: int) -> list[float]:
        return list(self._histories[kind])

    def weight_at(self, step: int) -> float:
        """w(step) = weight_start + (weight_max - weight_start) * min(1, (step - start_step) / ramp_steps)."""
        progress = 1.0 if self.ramp_steps == 0 else min(1.0, max(0, step - self.start_step) / self.ramp_steps)
        return self.weight_start + (self.weight_max - self.weight_start) * progress

    def loss(
        self,
        eos_logits: torch.Tensor,
        lengths: torch.Tensor,
        rec_per_sample: torch.Tensor,
        step: int,
        kinds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """EOS logits [B,N], 1-based lengths [B] the batch was reconstructed at, losses [B] -> scalar (fp32).

        `kinds` [B] (default: all `WHOLE_IMAGE`) picks each sample's tau.
        """
        if eos_logits.ndim != 2:
            raise ValueError(f"eos_logits must be [B,N], got {tuple(eos_logits.shape)}")
        batch, max_tokens = eos_logits.shape
        if lengths.shape != (batch,) or rec_per_sample.shape != (batch,):
            raise ValueError(
                f"lengths and rec_per_sample must be [B={batch}], got {tuple(lengths.shape)} and "
                f"{tuple(rec_per_sample.shape)}"
            )
        lengths = lengths.to(eos_logits.device).long()
        if bool(((lengths < 1) | (lengths > max_tokens)).any()):
            raise ValueError(f"lengths must lie in [1, {max_tokens}], got {lengths.tolist()}")
        losses = rec_per_sample.detach().float().to(eos_logits.device)
        good = losses <= self._thresholds(losses, self._kinds(kinds, batch, losses.device))

        logits = eos_logits.float()
        positions = torch.arange(1, max_tokens + 1, device=logits.device).unsqueeze(0)
        at_end = (positions == lengths.unsqueeze(1)).float()
        up_to_end = (positions <= lengths.unsqueeze(1)).float()
        end_here = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
        not_yet = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
        good_term = (end_here * at_end).sum(dim=1)
        bad_term = (not_yet * up_to_end).sum(dim=1) / lengths.float()
        per_sample = torch.where(good, good_term, bad_term)
        return self.weight_at(step) * per_sample.mean()

    def _kinds(self, kinds: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if kinds is None:
            return torch.full((batch,), self.WHOLE_IMAGE, dtype=torch.long, device=device)
        kinds = kinds.to(device).long()
        if kinds.shape != (batch,) or bool(((kinds < 0) | (kinds >= self.KINDS)).any()):
            raise ValueError(f"kinds must be [B={batch}] with values in [0, {self.KINDS}), got {kinds.tolist()}")
        return kinds

    def _thresholds(self, losses: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """tau per sample: its kind's history, or the mean of its kind in this batch before any."""
        taus = torch.empty_like(losses)
        for kind in range(self.KINDS):
            members = kinds == kind
            if bool(members.any()):
                tau = self.threshold_of(kind)
                taus[members] = losses[members].mean() if tau is None else tau
        return taus

    def update(self, rec_batch_mean: float | torch.Tensor, kind: int = WHOLE_IMAGE) -> None:
        """Record a batch-mean reconstruction loss of one kind (after `loss`, so a batch is not judged
        against itself).

        Non-finite values (an fp16 overflow step) are skipped and counted: one would poison tau for
        `history` steps.
        """
        value = float(
            rec_batch_mean.detach().float().item() if isinstance(rec_batch_mean, torch.Tensor) else rec_batch_mean
        )
        if not math.isfinite(value):
            self.skipped += 1
            warnings.warn(f"length control skipped a non-finite reconstruction loss ({value})", stacklevel=2)
            return
        self._histories[kind].append(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "losses": self.recorded,
            "question_losses": self.recorded_of(self.QUESTION),
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recorded losses exactly (the most recent `history` of them if the size changed)."""
        if not isinstance(state, dict) or "losses" not in state:
            raise ValueError("length-control state must be a dict with a 'losses' list (from LengthControl.state_dict)")
        histories = []
        for key in ("losses", "question_losses"):
            losses = state.get(key, [])
            if not isinstance(losses, (list, tuple)) or not all(isinstance(v, (int, float)) for v in losses):
                raise ValueError(f"length-control state {key!r} must be a list of numbers, got {type(losses).__name__}")
            histories.append(deque((float(v) for v in losses), maxlen=self.history))
        self._histories = tuple(histories)
        self.skipped = int(state.get("skipped", 0))


def sample_training_lengths(
    predicted_lengths: torch.Tensor,
    max_tokens: int,
    min_tokens: int = 1,
    uniform_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The length each sample is reconstructed at this step: its predicted length, or a uniform one.

    With probability `uniform_fraction` a sample draws L uniformly from [min_tokens, max_tokens]; otherwise
    it keeps its predicted length (clamped to the same range). Uniform lengths make every prefix learn to
    decode and give length control examples on both sides of the current guess; predicted lengths train
    the lengths that inference will actually use. Both draws are made for every sample, so a seeded
    generator's stream does not depend on the outcome.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens}, max_tokens={max_tokens}")
    if not 0.0 <= uniform_fraction <= 1.0:
        raise ValueError(f"uniform_fraction must lie in [0, 1], got {uniform_fraction}")
    if predicted_lengths.ndim != 1:
        raise ValueError(f"predicted_lengths must be [B], got {tuple(predicted_lengths.shape)}")
    batch = predicted_lengths.shape[0]
    device = generator.device if generator is not None else torch.device("cpu")
    use_uniform = torch.rand(batch, generator=generator, device=device) < uniform_fraction
    uniform = torch.randint(min_tokens, max_tokens + 1, (batch,), generator=generator, device=device)
    predicted = predicted_lengths.to(device).long().clamp(min_tokens, max_tokens)
    return torch.where(use_uniform, uniform, predicted).to(predicted_lengths.device)
