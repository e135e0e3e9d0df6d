"""A tiny LLM and its tokenizer, built offline, for tests and the CPU demo.

Real runs pass a hub id (`Qwen/Qwen2.5-0.5B-Instruct`, `lmsys/vicuna-7b-v1.5`) wherever these are used;
the tiny pair only stands in for them where no pretrained weights can be fetched. The tokenizer is a
byte-level BPE trained on the caller's own text, so it needs nothing beyond `tokenizers`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from .constants import IMAGE_TOKEN

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Every turn ends with the EOS token, so a generation stops exactly where a trained answer stops.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts`, with `<image>`, role markers, pad/bos/eos and a chat template.

    Plain `tokenizer(text)` prepends BOS (as LLaMA's tokenizer does); the chat template writes its own BOS.
    """
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(specials)),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B", special_tokens=[(BOS_TOKEN, bos_id)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IMAGE_TOKEN, *ROLE_TOKENS],
        model_max_length=512,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llm(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 512,
    init_std: float = 0.02,
) -> PreTrainedModel:
    """A randomly initialised causal LM whose vocabulary covers `tokenizer` (call `torch.manual_seed` first).

    A larger `init_std` makes an untrained model's outputs depend visibly on its inputs, which tests of
    batching need (at 0.02 every prompt yields nearly the same next-token distribution).
    """
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": hidden * 4,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_positions,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        "initializer_range": init_std,
    }
    if arch == "llama":
        config = LlamaConfig(num_key_value_heads=max(1, heads // 2), **common)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **common)
    elif arch == "gpt2":  # transformers' Conv1D layers instead of nn.Linear
        config = GPT2Config(
            vocab_size=common["vocab_size"],
            n_embd=hidden,
            n_inner=hidden * 4,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            **{k: common[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")},
            initializer_range=init_std,
        )
    else:
        raise ValueError(f"unknown tiny LLM arch {arch!r}; expected 'llama', 'gpt_neox' or 'gpt2'")
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()
