"""Stand-ins for a trained tokenizer where none can be trained in the time: benchmarks and tests of code whose
behaviour depends on per-image lengths (padding, length-grouped batches, the query's effect) need lengths that
vary with the image and the question, which a randomly initialised tokenizer does not give.
"""

from __future__ import annotations

import math

import torch

from ..modeling.dove_tokenizer import DoveTokenizer


def calibrate_eos_head(
    tokenizer: DoveTokenizer,
    images: torch.Tensor,
    queries: list[str | None] | None = None,
    mean_length: float | None = None,
    seed: int = 0,
) -> None:
    """Re-aim a randomly initialised tokenizer's EOS head so its lengths depend on the input.

    An untrained generator's hidden states are dominated by the timestep signal, so a random EOS head
    stops every input at the same position. This sets the head, in place and deterministically, to the
    sum of two readings of the hidden states seen on `images` / `queries`: a ramp over positions (from
    the part all inputs share) that crosses the threshold at `mean_length` (default: half the maximum),
    plus the input-dependent part, scaled so one standard deviation moves the stop by a quarter of the
    maximum. Lengths still come from the real head on the real hidden states.
    """
    captured: list[torch.Tensor] = []
    hook = tokenizer.generator.eos_head.register_forward_hook(lambda _m, args, _o: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            query = tokenizer.tokenize_queries(queries, images.shape[0])
            tokenizer(images.to(tokenizer.device), *(query or (None, None)))
    finally:
        hook.remove()
    hidden = captured[0].double().cpu()  # [B, N, H]
    max_tokens = hidden.shape[1]
    mean_length = max_tokens / 2 if mean_length is None else mean_length
    shared = hidden.mean(dim=0)  # [N, H]: what every input shows at each position
    basis = torch.linalg.qr(shared.T).Q
    content = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    content = content - basis @ (basis.T @ content)
    content = content / (hidden @ content).std().clamp(min=1e-12)
    spread = max_tokens / 4
    ramp = (torch.arange(1, max_tokens + 1, dtype=torch.float64) - mean_length) / spread
    position = torch.linalg.lstsq(shared, ramp.unsqueeze(1)).solution.squeeze(1)
    threshold = tokenizer.config.eos_threshold
    head = tokenizer.generator.eos_head
    with torch.no_grad():
        head.weight.copy_((content + position).to(head.weight)[None])
        head.bias.fill_(math.log(threshold / (1 - threshold)))
