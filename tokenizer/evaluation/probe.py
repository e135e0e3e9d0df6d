"""Linear probe on frozen DOVE tokens: how much of a label (e.g. a scene's object count) the tokens hold linearly.

Features, the tokenizer frozen:
- "mean": the mean of each image's tokens over its automatic length, [D] (variable length, fixed size);
- "budget": the first K tokens concatenated, [K * D] (every image cut to the same budget).

The classifier is multinomial logistic regression (one linear layer + softmax, L2-regularised, fitted
full-batch with L-BFGS on standardised features): the textbook probe, convex, so the score is about the
features and not about optimiser luck.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling.dove_tokenizer import DoveTokenizer

FEATURE_MODES = ("mean", "budget")


@torch.no_grad()
def token_features(
    model: DoveTokenizer,
    pixels: torch.Tensor,
    mode: str = "mean",
    budget: int | None = None,
    queries: list[str] | None = None,
) -> torch.Tensor:
    """Frozen-token features of a batch of images [B,3,S,S]: [B, D] for "mean", [B, budget*D] for "budget"."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {mode!r}")
    if mode == "budget":
        if budget is None or not 1 <= budget <= model.max_tokens:
            raise ValueError(f"budget features need a budget in [1, {model.max_tokens}], got {budget}")
        encoding = model.encode(pixels, queries=queries, budget=budget)
        return encoding.tokens[:, :budget].flatten(1).float()
    encoding = model.encode(pixels, queries=queries)
    mask = encoding.attention_mask.unsqueeze(-1).float()
    return (encoding.tokens.float() * mask).sum(1) / mask.sum(1).clamp(min=1)


@dataclass
class ProbeResult:
    train_accuracy: float
    test_accuracy: float
    majority_accuracy: float  # always predicting the most common training label, on the test set
    classes: list
    n_train: int
    n_test: int


def fit_linear_probe(
    train_x: torch.Tensor,
    train_y: list,
    test_x: torch.Tensor,
    test_y: list,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> ProbeResult:
    """Fit softmax regression on (train_x, train_y), score it on the test set. Labels may be any hashable."""
    if len(train_y) != train_x.shape[0] or len(test_y) != test_x.shape[0]:
        raise ValueError("features and labels differ in length")
    if not train_y or not test_y:
        raise ValueError("the probe needs both training and test examples")
    classes = sorted(set(train_y), key=str)
    index = {c: i for i, c in enumerate(classes)}
    y_train = torch.tensor([index[c] for c in train_y])
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp(min=1e-6)
    x_train = ((train_x - mean) / std).double()
    x_test = ((test_x - mean) / std).double()
    torch.manual_seed(0)
    layer = torch.nn.Linear(x_train.shape[1], len(classes)).double()
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.LBFGS(layer.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(layer(x_train), y_train) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_pred = layer(x_train).argmax(1)
        test_pred = [classes[i] for i in layer(x_test).argmax(1).tolist()]
    majority = Counter(train_y).most_common(1)[0][0]
    return ProbeResult(
        train_accuracy=float((train_pred == y_train).double().mean()),
        test_accuracy=sum(p == t for p, t in zip(test_pred, test_y)) / len(test_y),
        majority_accuracy=sum(t == majority for t in test_y) / len(test_y),
        classes=classes,
        n_train=len(train_y),
        n_test=len(test_y),
    )
