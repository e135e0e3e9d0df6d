"""Shared fixtures. Everything runs offline on tiny random configs."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tiny_tokenizer():
    """A freshly initialised `dove-tiny` tokenizer in eval mode (seeded: same weights every time)."""
    from tokenizer import DoveTokenizer

    torch.manual_seed(0)
    return DoveTokenizer.from_preset("dove-tiny").eval()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state; a Trainer run with bf16 must not fix the precision of the
    next test's Accelerator(mixed_precision="no")."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
