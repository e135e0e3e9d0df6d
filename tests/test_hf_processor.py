"""The VLM in transformers' auto classes: every save carries `DoveLlavaProcessor` and `architectures`,
`AutoProcessor` / `AutoModelForCausalLM` reopen it, and the processor's output feeds `generate()` with the same
prompt, pixels and queries as the project's own `answer_questions`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor

from llava_adapter import (
    DoveLlavaForCausalLM,
    DoveLlavaImageProcessor,
    DoveLlavaProcessor,
    DoveVisionTower,
    answer_questions,
)
from llava_adapter.conversation import tower_query
from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer
from tokenizer import DoveTokenizer
from tokenizer.evaluation.stand_ins import calibrate_eos_head

TEXTS = ["What color is the circle? The circle is red.", "How many squares are there? There are three squares."] * 10
QUESTIONS = [
    "What color is the circle?",
    "How many squares are there? Answer the question using a single word or phrase.",
]


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=["auto", "vicuna_v1"])
def saved(request, images, tmp_path_factory):
    """A tiny VLM saved with its tokenizer, under the tokenizer's chat template ("auto") and LLaVA's vicuna_v1."""
    llm_tokenizer = train_tiny_tokenizer(TEXTS, vocab_size=320)
    torch.manual_seed(0)
    tower = DoveTokenizer.from_preset("dove-tiny").eval()
    calibrate_eos_head(tower, torch.cat([images, images]), [None] * 2 + [tower_query(q) for q in QUESTIONS])
    torch.manual_seed(0)
    model = DoveLlavaForCausalLM.from_components(
        build_tiny_llm(llm_tokenizer, "llama", init_std=0.2),
        DoveVisionTower(tower),
        tokenizer=llm_tokenizer,
        conversation_template=request.param,
    ).eval()
    directory = tmp_path_factory.mktemp(request.param) / "vlm"
    model.save_pretrained(directory, tokenizer=llm_tokenizer)
    return directory, model, llm_tokenizer


def test_auto_classes_reopen_a_saved_model_and_its_processor(saved):
    directory, model, llm_tokenizer = saved
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["DoveLlavaForCausalLM"]
    processor = AutoProcessor.from_pretrained(directory)
    assert type(processor) is DoveLlavaProcessor
    assert type(processor.image_processor) is DoveLlavaImageProcessor
    assert processor.image_processor.image_size == 64 and processor.image_processor.crop_size == {
        "height": 64,
        "width": 64,
    }
    assert processor.conversation_template == (
        "vicuna_v1" if model.config.conversation_template == "vicuna_v1" else "chat_template"
    )
    assert processor.tokenizer.get_vocab() == llm_tokenizer.get_vocab()
    assert type(AutoImageProcessor.from_pretrained(directory)) is DoveLlavaImageProcessor
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert type(reloaded) is DoveLlavaForCausalLM
    state, original = reloaded.state_dict(), model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)


def test_processor_output_feeds_generate_as_answer_questions_does(saved, images):
    directory, _, _ = saved
    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in QUESTIONS
    ]
    inputs = processor(images=list(images), text=prompts, return_tensors="pt")
    assert inputs["queries"] == [tower_query(q) for q in QUESTIONS]
    assert torch.equal(inputs["pixel_values"], model.vision_tower.image_processor.to_tensor(list(images)))
    tokenizer = processor.tokenizer
    new_tokens = model.generate(
        **inputs,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    lengths = list(model.last_visual_lengths)
    expected = answer_questions(model, tokenizer, list(images), QUESTIONS, max_new_tokens=4)
    assert lengths == [a.visual_tokens for a in expected] and len(set(lengths)) > 1
    assert [t.strip() for t in processor.batch_decode(new_tokens, skip_special_tokens=True)] == [
        a.text for a in expected
    ]
    tokenized = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": QUESTIONS[0]}]}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )
    assert torch.equal(tokenized["input_ids"], processor(images=images[:1], text=prompts[:1])["input_ids"])


def test_processor_refuses_images_without_placeholders(saved, images):
    processor = AutoProcessor.from_pretrained(saved[0])
    with pytest.raises(ValueError, match="1 <image> placeholder"):
        processor(images=list(images), text="<image>\nWhat color is the circle?")


@pytest.mark.slow
def test_without_the_import_transformers_names_the_unknown_model_type(saved):
    """transformers' own message for an unregistered type; the README tells what to import."""
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(saved[0])!r})"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "model type `dove_llava`" in result.stderr
