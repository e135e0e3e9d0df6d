"""Conversation templates: labels only on answers, prompts that match training, the tower's query, errors."""

from __future__ import annotations

import copy

import pytest

from llava_adapter.constants import IGNORE_INDEX, IMAGE_TOKEN
from llava_adapter.conversation import (
    ConversationError,
    add_image_token,
    build_generation_prompt,
    conversation_query,
    resolve_template,
    tokenize_conversation,
    tokenize_generation_prompt,
)
from llava_adapter.tiny_llm import train_tiny_tokenizer

TEXTS = [
    "What color is the circle? The circle is red.",
    "How many squares are there? There are three squares.",
    "Is the star left of the triangle? Yes, the star is on the left.",
] * 10
CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat color is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many squares are there?"},
    {"from": "gpt", "value": "There are three squares."},
]


@pytest.fixture(scope="module")
def llm_tokenizer():
    return train_tiny_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def plain_tokenizer(llm_tokenizer):
    """The same vocabulary without a chat template, as a base LLM's tokenizer."""
    tokenizer = copy.deepcopy(llm_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


def _targets(tokenizer, ids, labels):
    assert len(ids) == len(labels)
    return tokenizer.decode([i for i, label in zip(ids.tolist(), labels.tolist()) if label != IGNORE_INDEX])


def test_auto_picks_the_chat_template_when_there_is_one(llm_tokenizer, plain_tokenizer):
    assert resolve_template(llm_tokenizer) == "chat_template"
    assert resolve_template(plain_tokenizer) == "vicuna_v1"
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template(plain_tokenizer, "chat_template")
    with pytest.raises(ValueError, match="unknown conversation template"):
        resolve_template(llm_tokenizer, "llava_v2")


@pytest.mark.parametrize("template", ["chat_template", "vicuna_v1"])
def test_no_prompt_or_image_position_is_a_target(llm_tokenizer, template):
    ids, labels = tokenize_conversation(CONVERSATION, llm_tokenizer, template, sample_id="s1")
    image_id = llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id in ids.tolist()
    assert image_id not in labels.tolist()
    targets = _targets(llm_tokenizer, ids, labels)
    assert "What color" not in targets and "How many" not in targets
    assert "USER" not in targets and "<|user|>" not in targets and "<|assistant|>" not in targets
    # Everything up to the first answer is prompt: the question, the system text, the role markers.
    first_target = next(i for i, label in enumerate(labels.tolist()) if label != IGNORE_INDEX)
    prompt = llm_tokenizer.decode(ids[:first_target])
    assert "What color is the circle?" in prompt and "red" not in prompt


def test_targets_are_exactly_the_answers_and_eos(llm_tokenizer):
    ids, labels = tokenize_conversation(CONVERSATION, llm_tokenizer, "vicuna_v1")
    eos = llm_tokenizer.eos_token
    assert _targets(llm_tokenizer, ids, labels) == f" The circle is red.{eos} There are three squares.{eos}"
    ids, labels = tokenize_conversation(CONVERSATION, llm_tokenizer, "chat_template")
    assert _targets(llm_tokenizer, ids, labels) == f"The circle is red.{eos}\nThere are three squares.{eos}\n"


def test_plain_template_is_image_then_answer(llm_tokenizer):
    # LLaVA's preprocess_plain: the answer ends with the plain template's separator, a newline
    ids, labels = tokenize_conversation(CONVERSATION[:2], llm_tokenizer, "plain")
    assert llm_tokenizer.decode(ids) == f"{llm_tokenizer.bos_token}{IMAGE_TOKEN}The circle is red.\n"
    assert _targets(llm_tokenizer, ids, labels) == "The circle is red.\n"
    with pytest.raises(ConversationError, match="plain"):
        tokenize_conversation(CONVERSATION, llm_tokenizer, "plain", sample_id="multi")


@pytest.mark.parametrize("template", ["chat_template", "vicuna_v1", "plain"])
def test_generation_prompt_is_the_training_prefix(llm_tokenizer, template):
    conversation = CONVERSATION[:2]
    ids, labels = tokenize_conversation(conversation, llm_tokenizer, template)
    prompt = tokenize_generation_prompt("What color is the circle?", llm_tokenizer, template)
    first_target = next(i for i, label in enumerate(labels.tolist()) if label != IGNORE_INDEX)
    assert prompt == ids[:first_target].tolist()
    text = build_generation_prompt("What color is the circle?", llm_tokenizer, template)
    assert IMAGE_TOKEN in text and "red" not in text


def test_text_only_samples_need_no_placeholder(llm_tokenizer):
    conversation = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]
    ids, labels = tokenize_conversation(conversation, llm_tokenizer, num_images=0, sample_id="t")
    assert llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) not in ids.tolist()
    assert _targets(llm_tokenizer, ids, labels).startswith("hi")
    prompt = build_generation_prompt("Say hi.", llm_tokenizer, has_image=False)
    assert IMAGE_TOKEN not in prompt


def test_query_is_the_first_question_without_placeholders_and_never_an_answer():
    query = conversation_query(CONVERSATION)
    assert query == "What color is the circle?"
    for turn in CONVERSATION:
        if turn["from"] == "gpt":
            assert turn["value"] not in query
    assert (
        conversation_query([{"role": "user", "content": "Where? <image>"}, {"role": "assistant", "content": "x"}])
        == "Where?"
    )


@pytest.mark.parametrize(
    ("conversation", "num_images", "message"),
    [
        ([], 1, "empty conversation"),
        ([{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "a"}], 1, "no <image> placeholder"),
        (
            [{"from": "human", "value": "<image><image> two?"}, {"from": "gpt", "value": "a"}],
            1,
            "2 <image> placeholders but only 1",
        ),
        ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "<image> a"}], 1, "in an answer"),
        ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>"}], 1, "expected the user"),
        ([{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "a"}], 1, "unknown role"),
        ([{"from": "human", "value": "<image> q"}], 1, "without an answer"),
        ([{"from": "human", "value": "<image> q"}, {"from": "gpt"}], 1, "no text"),
        ("not a list", 1, "must be a list"),
    ],
)
def test_malformed_conversations_name_the_sample(llm_tokenizer, conversation, num_images, message):
    with pytest.raises(ConversationError, match="sample 'rec-42'") as info:
        tokenize_conversation(conversation, llm_tokenizer, num_images=num_images, sample_id="rec-42")
    assert message in str(info.value)


def test_chat_templates_that_rewrite_history_are_refused(llm_tokenizer):
    tokenizer = copy.deepcopy(llm_tokenizer)
    tokenizer.chat_template = "{% for m in messages[-1:] %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="rewrites earlier turns"):
        tokenize_conversation(CONVERSATION, tokenizer, "chat_template")


def test_add_image_token_makes_the_placeholder_one_token(llm_tokenizer):
    assert add_image_token(llm_tokenizer) == llm_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    fresh = _tokenizer_without_image_token()
    before = len(fresh)
    image_id = add_image_token(fresh)
    assert len(fresh) == before + 1
    assert fresh("a <image> b", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert add_image_token(fresh) == image_id and len(fresh) == before + 1


def _tokenizer_without_image_token():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
