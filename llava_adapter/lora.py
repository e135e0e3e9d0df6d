"""LoRA on the LLM of a `DoveLlavaForCausalLM`, through peft.

Only the LLM is wrapped: the projector is trained in full (it is small and new) and the tower is not
the LLM's business, so neither can ever receive adapter layers. The LLM's output layer is left out
too, as LLaVA does: its width is the vocabulary, and adapting it buys little for its size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from tokenizer.hub import resolve_pretrained_dir

from .modeling import DoveLlavaForCausalLM


def is_lora_wrapped(llm: nn.Module) -> bool:
    return hasattr(llm, "peft_config") and hasattr(llm, "merge_and_unload")


def lora_target_modules(llm: PreTrainedModel) -> list[str]:
    """Every linear layer of the LLM except its output layer, as peft `target_modules` names.

    Leaf names (`q_proj`, `dense_h_to_4h`, ...) when they single out exactly those layers; full module
    paths in the rare model where the output layer shares a leaf name with an inner layer.
    """
    output = llm.get_output_embeddings()
    linear = {name: module for name, module in llm.named_modules() if isinstance(module, nn.Linear)}
    inner = {name for name, module in linear.items() if module is not output}
    if not inner:
        raise ValueError(f"{type(llm).__name__} has no linear layers besides its output layer to adapt")
    output_names = {name for name, module in linear.items() if module is output}
    leaves = {name.rsplit(".", 1)[-1] for name in inner}
    if any(name.rsplit(".", 1)[-1] in leaves for name in output_names):
        return sorted(inner)
    return sorted(leaves)


def apply_lora(
    llm: PreTrainedModel,
    r: int = 128,
    alpha: int = 256,
    dropout: float = 0.05,
    target_modules: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap `llm` in a peft LoRA model (LLaVA-1.5's defaults: r=128, alpha=256, dropout 0.05).

    Only the adapter weights are trainable afterwards; the base weights are frozen by peft.
    """
    from peft import LoraConfig, get_peft_model

    if is_lora_wrapped(llm):
        raise ValueError("the LLM already carries a LoRA adapter; merge it first or keep training it")
    if r < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {r}")
    targets = list(target_modules) if target_modules else lora_target_modules(llm)
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
