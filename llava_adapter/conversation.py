"""Conversations -> token ids and training labels, and single-question prompts for generation.

A LLaVA record holds `conversations`: a list of turns `{"from": "human" | "gpt", "value": text}` (the
`{"role", "content"}` spelling is accepted too); an `<image>` placeholder marks where the image goes.

Templates:
- `chat_template`: the LLM tokenizer's own chat template (Qwen, Llama-3 instruct, the tiny test tokenizer);
- `vicuna_v1`: LLaVA's `conv_templates["vicuna_v1"]` (LLaVA-1.5's template): its system prompt, then
  `USER: ... ASSISTANT: ...</s>` turns, for base or Vicuna LLMs. The answer separator is the LLM's EOS
  token, so an answer ends where generation stops; for LLaMA / Vicuna tokenizers (EOS `</s>`) the text
  equals LLaVA's `get_prompt()` character for character;
- `plain`: stage-1 alignment as LLaVA's `preprocess_plain` renders `conv_templates["plain"]`: only `<image>`,
  the answer and the template's separator `\n` (the question is not shown to the LLM, though the tower may
  still read it as its query);
- `auto`: `chat_template` when the tokenizer has one, else `vicuna_v1`.

Labels come from one tokenization of the whole rendered text: each token whose character span starts
inside an assistant answer is a target, everything else is IGNORE_INDEX. Tokenizing once (instead of
turn by turn) means a generation prompt, which is a prefix of the same text, tokenizes exactly as the
training prompt did.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .constants import IGNORE_INDEX, IMAGE_TOKEN

TEMPLATES = ("auto", "chat_template", "vicuna_v1", "plain")
# LLaVA's `conv_vicuna_v1` (llava/conversation.py): system prompt, the separator after the system prompt and
# each question, and the one after each answer (LLaVA's literal `</s>`; here the LLM's EOS token).
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA_SEPARATOR = " "
# LLaVA's `conv_llava_plain.sep`, which `preprocess_plain` puts after the answer.
PLAIN_SEPARATOR = "\n"
_HUMAN_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant"}


class ConversationError(ValueError):
    """A malformed conversation; the message names the sample."""


@dataclass
class Turn:
    role: str  # "user" or "assistant"
    text: str


def resolve_template(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> str:
    """`auto` -> `chat_template` if the tokenizer carries one, else `vicuna_v1`; other names are checked."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; known: {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "vicuna_v1"
    if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template 'chat_template' requested but the LLM tokenizer has no chat template")
    return template


def add_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Make `<image>` one special token of `tokenizer` (adding it if missing) and return its id.

    The LLM's embedding table need not grow: the model replaces placeholder positions before any lookup.
    """
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def parse_turns(conversations: Any, sample_id: Any = None) -> list[Turn]:
    """Validate a LLaVA `conversations` list: non-empty, human first, roles alternating, text values."""
    name = _sample_name(sample_id)
    if not isinstance(conversations, Sequence) or isinstance(conversations, (str, bytes)):
        raise ConversationError(f"{name}: 'conversations' must be a list of turns, got {type(conversations).__name__}")
    if len(conversations) == 0:
        raise ConversationError(f"{name}: empty conversation")
    turns = []
    for index, raw in enumerate(conversations):
        if not isinstance(raw, Mapping):
            raise ConversationError(f"{name}: turn {index} must be an object, got {type(raw).__name__}")
        role = raw.get("from", raw.get("role"))
        text = raw.get("value", raw.get("content"))
        if role in _HUMAN_ROLES:
            role = "user"
        elif role in _ASSISTANT_ROLES:
            role = "assistant"
        else:
            raise ConversationError(f"{name}: turn {index} has unknown role {role!r} (expected 'human' or 'gpt')")
        if not isinstance(text, str):
            raise ConversationError(f"{name}: turn {index} has no text value")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise ConversationError(
                f"{name}: turn {index} is from the {role}, expected the {expected} (turns must alternate, human first)"
            )
        turns.append(Turn(role, text))
    if turns[-1].role != "assistant":
        raise ConversationError(f"{name}: the conversation ends without an answer to its last question")
    return turns


# Answer-format instructions that VQA prompts append (LLaVA-1.5's training data, lmms-eval's tasks). The
# LLM reads them; the tower's query does not: Q-DOVE conditions on what is asked about the image, and
# training and evaluation must derive the query by the same rule.
INSTRUCTION_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Please answer yes or no.",
    "Answer with the option's letter from the given choices directly.",
)


def conversation_query(conversations: Any, sample_id: Any = None) -> str:
    """The tower's query: the first human turn (the one the image belongs to), as `tower_query` cleans it.

    Built only from human text, so no answer can leak into the visual tokens.
    """
    turns = parse_turns(conversations, sample_id)
    return tower_query(turns[0].text)


def tower_query(text: str) -> str:
    """A prompt reduced to its question: image placeholders and trailing answer-format instructions removed."""
    text = strip_image_tokens(text)
    changed = True
    while changed:
        changed = False
        for suffix in INSTRUCTION_SUFFIXES:
            if text.endswith(suffix):
                text = text[: -len(suffix)].rstrip()
                changed = True
    return text


def require_question(text: str, where: str = "question") -> str:
    """The question of a prompt (`tower_query`), refusing one with nothing left to ask.

    The one rule for chat, `answer_questions` and the lmms-eval model: a prompt that is empty, blank,
    or only `<image>` placeholders and answer-format instructions asks nothing, so the model would
    answer at random; it is an error (a `ValueError` naming `where`) rather than an answer.
    """
    question = tower_query(str(text))
    if not question:
        raise ValueError(
            f"{where}: empty question {text!r} (nothing left after removing whitespace, {IMAGE_TOKEN} placeholders "
            f"and answer-format instructions)"
        )
    return question


def strip_image_tokens(text: str) -> str:
    return " ".join(text.replace(IMAGE_TOKEN, " ").split())


def render_conversation(
    turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase, template: str
) -> tuple[str, list[tuple[int, int]]]:
    """The full training text and the character spans of the assistant answers (the targets)."""
    if template == "plain":
        return _render_plain(turns, tokenizer)
    if template == "vicuna_v1":
        return _render_vicuna(turns, tokenizer)
    if template == "chat_template":
        return _render_chat(turns, tokenizer)
    raise ValueError(f"cannot render template {template!r}; resolve 'auto' first")


def tokenize_conversation(
    conversations: Any,
    tokenizer: PreTrainedTokenizerBase,
    template: str = "auto",
    num_images: int = 1,
    sample_id: Any = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A LLaVA conversation -> (input_ids [T], labels [T]) with IGNORE_INDEX on all but assistant answers.

    `num_images` is how many images the sample carries (0 for text-only): the conversation must hold
    exactly that many `<image>` placeholders, all in human turns. Nothing is truncated here: the model
    truncates after replacing placeholders with visual tokens, when the true length is known.
    """
    name = _sample_name(sample_id)
    turns = parse_turns(conversations, sample_id)
    _check_placeholders(turns, num_images, name)
    template = resolve_template(tokenizer, template)
    if template == "plain" and len(turns) != 2:
        raise ConversationError(
            f"{name}: the 'plain' template takes one question and one answer, got {len(turns)} turns"
        )
    text, spans = render_conversation(turns, tokenizer, template)
    input_ids, labels = _tokenize_with_spans(text, spans, tokenizer, add_special_tokens=template != "chat_template")
    if all(label == IGNORE_INDEX for label in labels):
        raise ConversationError(f"{name}: the conversation has no answer tokens to train on")
    return torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def build_generation_prompt(
    question: str, tokenizer: PreTrainedTokenizerBase, template: str = "auto", has_image: bool = True
) -> str:
    """The text that precedes the answer to one question, in the same form training used.

    With `has_image`, an `<image>` placeholder is put before the question unless it already holds one.
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    template = resolve_template(tokenizer, template)
    if has_image and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    if not has_image and IMAGE_TOKEN in question:
        raise ValueError(f"the question holds {IMAGE_TOKEN} but no image is given")
    turns = [Turn("user", question), Turn("assistant", "")]
    text, spans = render_conversation(turns, tokenizer, template)
    return text[: spans[0][0]]


def tokenize_generation_prompt(
    question: str, tokenizer: PreTrainedTokenizerBase, template: str = "auto", has_image: bool = True
) -> list[int]:
    """Token ids of `build_generation_prompt` (with BOS where the tokenizer adds one, as in training)."""
    template = resolve_template(tokenizer, template)
    text = build_generation_prompt(question, tokenizer, template, has_image)
    return list(tokenizer(text, add_special_tokens=template != "chat_template")["input_ids"])


# ---------------------------------------------------------------------------------------------- internals


def _sample_name(sample_id: Any) -> str:
    return "conversation" if sample_id is None else f"sample {sample_id!r}"


def _check_placeholders(turns: Sequence[Turn], num_images: int, name: str) -> None:
    in_answers = [i for i, turn in enumerate(turns) if turn.role == "assistant" and IMAGE_TOKEN in turn.text]
    if in_answers:
        raise ConversationError(f"{name}: {IMAGE_TOKEN} appears in an answer (turn {in_answers[0]})")
    count = sum(turn.text.count(IMAGE_TOKEN) for turn in turns)
    if num_images > 0 and count == 0:
        raise ConversationError(f"{name}: an image sample but its conversation has no {IMAGE_TOKEN} placeholder")
    if count > num_images:
        raise ConversationError(f"{name}: {count} {IMAGE_TOKEN} placeholders but only {num_images} image(s)")
    if count < num_images:
        raise ConversationError(f"{name}: {num_images} image(s) but only {count} {IMAGE_TOKEN} placeholder(s)")


def _eos(tokenizer: PreTrainedTokenizerBase) -> str:
    if tokenizer.eos_token is None:
        raise ValueError("the LLM tokenizer has no EOS token; answers need one to end")
    return tokenizer.eos_token


def _render_plain(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    prefix = IMAGE_TOKEN if IMAGE_TOKEN in turns[0].text else ""
    answer = turns[1].text + PLAIN_SEPARATOR if turns[1].text else ""
    return prefix + answer, [(len(prefix), len(prefix) + len(answer))]


def _render_vicuna(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    text = VICUNA_SYSTEM_PROMPT + VICUNA_SEPARATOR
    spans = []
    for turn in turns:
        if turn.role == "user":  # after the system prompt or an answer's EOS: no space, as in LLaVA
            text += f"USER: {turn.text}{VICUNA_SEPARATOR}ASSISTANT:"
        else:
            answer = f" {turn.text}{_eos(tokenizer)}" if turn.text else ""
            spans.append((len(text), len(text) + len(answer)))
            text += answer
    return text, spans


def _render_chat(turns: Sequence[Turn], tokenizer: PreTrainedTokenizerBase) -> tuple[str, list[tuple[int, int]]]:
    messages = [{"role": turn.role, "content": turn.text} for turn in turns]
    if not turns[-1].text:  # a generation prompt: the last answer is still to come
        before = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        return before, [(len(before), len(before))]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, turn in enumerate(turns):
        if turn.role != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError(
                "the tokenizer's chat template rewrites earlier turns as the conversation grows, so answer "
                "spans cannot be located; use template 'vicuna_v1' or a template that only appends"
            )
        spans.append((len(before), len(after)))
    return full, spans


def _tokenize_with_spans(
    text: str, spans: Sequence[tuple[int, int]], tokenizer: PreTrainedTokenizerBase, add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("conversation labels need a fast (Rust) tokenizer, which reports character offsets")
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(low <= start < high for low, high in spans):
            labels[position] = input_ids[position]
    return input_ids, labels
