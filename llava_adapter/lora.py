"""LoRA on the LLM of a `DoveLlavaForCausalLM`, through peft.

Only the LLM is wrapped: the projector is trained in full (it is small and new) and the tower is not
the LLM's business, so neither can ever receive adapter layers. Which layers of the LLM: peft's own
`"all-linear"` rule, which takes `nn.Linear` and transformers' `Conv1D` (GPT-2's) alike and leaves out the
output layer, as LLaVA does (its width is the vocabulary, and adapting it buys little for its size).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from tokenizer.hub import resolve_pretrained_dir

from .modeling import DoveLlavaForCausalLM

LORA_ALL_LINEAR = "all-linear"  # peft's rule: nn.Linear and Conv1D layers, the output layer excepted


def is_lora_wrapped(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "merge_and_unload")


def apply_lora(
    llm: PreTrainedModel,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap `llm` in a peft LoRA model (LLaVA-1.5's defaults: r=128, alpha=256, dropout 0.05).

    `target_modules` (peft names) default to every linear layer of the LLM but its output layer (module
    doc). Only the adapter weights are trainable afterwards; the base weights are frozen by peft.
    """
    from peft import LoraConfig, get_peft_model

    if is_lora_wrapped(llm):
        raise ValueError("the LLM already carries a LoRA adapter; merge it first or keep training it")
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {r}")
    targets = list(target_modules) if target_modules else LORA_ALL_LINEAR
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(llm, config)


def merge_lora(model: DoveLlavaForCausalLM) -> DoveLlavaForCausalLM:
    """Fold the adapter into the LLM's weights in place; the model then computes the same logits without peft."""
    if not is_lora_wrapped(model.llm):
        raise ValueError("the model's LLM carries no LoRA adapter to merge")
    model.llm = model.llm.merge_and_unload()
    return model


def merge_lora_checkpoint(source: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Load a saved model with its adapter, merge, and save a standalone copy (LLM weights included)."""
    from .inference import load_llm_tokenizer

    output = Path(output)
    source_dir = resolve_pretrained_dir(source)
    if output.resolve() == source_dir.resolve():
        raise ValueError(f"the output directory must differ from the source ({output})")
    model = DoveLlavaForCausalLM.from_pretrained(source_dir)
    if not is_lora_wrapped(model.llm):
        raise ValueError(f"{source} holds no LoRA adapter (no adapter_config.json) to merge")
    tokenizer = load_llm_tokenizer(source_dir, model)
    merge_lora(model)
    model.save_pretrained(output, tokenizer=tokenizer, save_llm=True)
    return output
