"""DOVE inside LLaVA's own codebase (the real `llava` package, llava-torch 1.2.2.post1, installed --no-deps).

LLaVA's builder, its `LlavaLlamaForCausalLM` over a tiny random LLaMA, its conversation templates and its
`tokenizer_image_token` run for real; only `enable_dove_in_llava()` stands between them and DOVE.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llava_adapter.conversation import build_generation_prompt, parse_turns, render_conversation, tokenize_conversation
from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer
from tokenizer import DoveTokenizer
from tokenizer.evaluation.stand_ins import calibrate_eos_head

pytest.importorskip(
    "llava.model",
    reason="LLaVA's `llava` package is not importable; install it with pip install --no-deps llava-torch==1.2.2.post1",
)

from llava.constants import IGNORE_INDEX  # noqa: E402
from llava.conversation import conv_templates  # noqa: E402
from llava.mm_utils import tokenizer_image_token  # noqa: E402
from llava.model import LlavaConfig, LlavaLlamaForCausalLM  # noqa: E402

from llava_adapter.integrations import LlavaDoveVisionTower, enable_dove_in_llava  # noqa: E402
from llava_adapter.integrations import llava as integration  # noqa: E402

QUESTIONS = ["what color is the circle", "how many squares are there", "is the star on the left", "what shape is red"]
ANSWERS = ["red", "three", "yes", "the square"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory, images):
    """A saved random dove-tiny whose EOS head reads images and questions (see `calibrate_eos_head`)."""
    torch.manual_seed(0)
    tokenizer = DoveTokenizer.from_preset("dove-tiny").eval()
    calibrate_eos_head(tokenizer, torch.cat([images, images]), [None] * 4 + QUESTIONS)
    directory = tmp_path_factory.mktemp("dove-tower")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llm_tokenizer():
    texts = [conv_templates["vicuna_v1"].system, *QUESTIONS, *ANSWERS, "USER: ASSISTANT: </s>"] * 4
    return train_tiny_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def llava_model(tower_dir, llm_tokenizer):
    """LLaVA's own model class over a tiny random LLaMA, its tower built by LLaVA's own initialize_vision_modules."""
    enable_dove_in_llava()
    torch.manual_seed(0)
    tiny = build_tiny_llm(llm_tokenizer, init_std=0.2).config.to_dict()
    config = LlavaConfig(**{k: v for k, v in tiny.items() if k not in ("model_type", "architectures")})
    model = LlavaLlamaForCausalLM(config)
    model_args = SimpleNamespace(  # the fields of LLaVA's ModelArguments that initialize_vision_modules reads
        vision_tower=f"dove:{tower_dir}",
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None,
        mm_patch_merge_type="flat",
        mm_projector_type="mlp2x_gelu",
    )
    model.get_model().initialize_vision_modules(model_args)
    return model.float().eval()


def _prompt(question: str, answer: str | None) -> str:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], answer)
    return conv.get_prompt()


def _pad(rows: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    filler = [torch.full((width - len(r),), value, dtype=r.dtype) for r in rows]
    return torch.stack([torch.cat([f, r]) if side == "left" else torch.cat([r, f]) for r, f in zip(rows, filler)])


def _training_batch(tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    ids, labels = [], []
    for question, answer in zip(QUESTIONS, ANSWERS):
        row = tokenizer_image_token(_prompt(question, answer), tokenizer, return_tensors="pt")
        prompt_len = len(tokenizer_image_token(_prompt(question, None), tokenizer))
        target = row.clone()
        target[:prompt_len] = IGNORE_INDEX
        ids.append(row)
        labels.append(target)
    lengths = [len(r) for r in ids]
    input_ids = _pad(ids, tokenizer.pad_token_id, "right")
    return input_ids, _pad(labels, IGNORE_INDEX, "right"), (input_ids != tokenizer.pad_token_id).long(), lengths


def _llm_lengths(model, run) -> list[int]:
    """The number of positions the LLM itself attends to per sample (text with the image spliced in)."""
    seen = []

    def hook(_module, _args, kwargs):
        seen.append(kwargs["attention_mask"].sum(dim=1).tolist())

    handle = model.get_model().register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_llavas_builder_builds_dove_from_its_vision_tower_argument(tower_dir, images):
    enable_dove_in_llava()
    enable_dove_in_llava()  # idempotent
    from llava.model.multimodal_encoder import builder

    saved = DoveTokenizer.from_pretrained(tower_dir).eval()
    expected = saved.encode(images, budget=[3, 5, 7, 9]).features()
    # LLaVA's training arguments say vision_tower; a saved LLaVA config says mm_vision_tower.
    for args in (
        SimpleNamespace(vision_tower=f"dove:{tower_dir}"),
        SimpleNamespace(mm_vision_tower=str(tower_dir)),  # a DOVE checkpoint dir needs no prefix
    ):
        tower = builder.build_vision_tower(args)
        assert isinstance(tower, LlavaDoveVisionTower) and tower.is_loaded
        for feature, reference in zip(tower(images, budget=[3, 5, 7, 9]), expected):
            torch.testing.assert_close(feature, reference)
    for name in ("dove:dove-tiny", "dove-tiny"):
        assert builder.build_vision_tower(SimpleNamespace(vision_tower=name)).hidden_size == 32
    # delay_load as LLaVA's from_pretrained passes it: the config now, the weights with load_model()
    delayed = builder.build_vision_tower(SimpleNamespace(mm_vision_tower=f"dove:{tower_dir}"), delay_load=True)
    assert not delayed.is_loaded and delayed.hidden_size == 32 and delayed.image_processor.image_size == 64
    delayed.load_model()
    torch.testing.assert_close(delayed(images, budget=[3, 5, 7, 9])[2], expected[2])
    # every other name still reaches LLaVA's own builder, and an empty DOVE name is named in the error
    with pytest.raises(ValueError, match="Unknown vision tower"):
        builder.build_vision_tower(SimpleNamespace(vision_tower="no-such-tower"))
    with pytest.raises(ValueError, match="names no DOVE checkpoint"):
        builder.build_vision_tower(SimpleNamespace(vision_tower="dove:"))


def test_training_forward_splices_each_images_own_length_and_matches_each_sample_alone(
    llava_model, llm_tokenizer, images
):
    model, tower = llava_model, llava_model.get_vision_tower()
    input_ids, labels, mask, text_lengths = _training_batch(llm_tokenizer)
    outputs = {}

    def run():
        outputs["batch"] = model(input_ids=input_ids, attention_mask=mask, labels=labels, images=images, queries=QUESTIONS)

    seen = _llm_lengths(model, run)
    visual = tower.last_lengths.tolist()
    assert len(set(visual)) > 1, "the calibrated tower should give these images different lengths"
    # the LLM sees each sample's text with its one <image> replaced by that image's own number of tokens
    assert seen == [n - 1 + v for n, v in zip(text_lengths, visual)]
    loss = outputs["batch"].loss
    assert torch.isfinite(loss)
    loss.backward()
    assert model.get_model().mm_projector[0].weight.grad.abs().sum() > 0
    model.zero_grad()
    with torch.no_grad():
        for i, n in enumerate(text_lengths):
            alone = model(input_ids=input_ids[i : i + 1, :n], images=images[i : i + 1], queries=[QUESTIONS[i]])
            length = alone.logits.shape[1]
            assert length == seen[i]
            torch.testing.assert_close(outputs["batch"].logits[i, :length], alone.logits[0], rtol=1e-4, atol=1e-5)


def test_generate_batches_different_visual_lengths_like_each_sample_alone(llava_model, llm_tokenizer, images):
    model = llava_model
    model.config.tokenizer_padding_side = "left"  # what LLaVA's training script copies from its tokenizer
    try:
        prompts = [tokenizer_image_token(_prompt(q, None), llm_tokenizer, return_tensors="pt") for q in QUESTIONS]
        input_ids = _pad(prompts, llm_tokenizer.pad_token_id, "left")
        mask = _pad([torch.ones_like(p) for p in prompts], 0, "left")
        settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=llm_tokenizer.pad_token_id)
        batch = model.generate(input_ids, attention_mask=mask, images=images, queries=QUESTIONS, **settings)
        assert len(set(model.get_vision_tower().last_lengths.tolist())) > 1
        for i, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], images=images[i : i + 1], queries=[QUESTIONS[i]], **settings)
            generated = batch[i][batch[i] != llm_tokenizer.pad_token_id]
            assert generated.tolist() == alone[0][alone[0] != llm_tokenizer.pad_token_id].tolist()
    finally:
        model.config.tokenizer_padding_side = "right"


def test_the_question_reaches_the_tower_and_changes_what_the_llm_sees(llava_model, llm_tokenizer, images):
    model = llava_model
    input_ids, labels, mask, _ = _training_batch(llm_tokenizer)
    with torch.no_grad():
        asked = _llm_lengths(model, lambda: model(input_ids=input_ids, attention_mask=mask, images=images, queries=QUESTIONS))
        blind = _llm_lengths(model, lambda: model(input_ids=input_ids, attention_mask=mask, images=images))
        # the prompt's own spelling of the question (placeholder, answer-format instruction) is cleaned as ours is
        raw = ["<image>\n" + q + "\nAnswer the question using a single word or phrase." for q in QUESTIONS]
        cleaned = _llm_lengths(model, lambda: model(input_ids=input_ids, attention_mask=mask, images=images, queries=raw))
    assert asked != blind
    assert cleaned == asked
    assert "queries" in inspect.signature(model.forward).parameters
    assert "queries" in inspect.signature(model.generate).parameters


def test_several_images_per_sample_are_refused_with_the_reason(llava_model, llm_tokenizer, images):
    input_ids, _, mask, _ = _training_batch(llm_tokenizer)
    stacked = images.unsqueeze(1)  # [B, 1, 3, S, S]: one image per sample, as LLaVA's list layout also gives
    with torch.no_grad():
        listed = llava_model(input_ids=input_ids, attention_mask=mask, images=list(images)).logits
        torch.testing.assert_close(llava_model(input_ids=input_ids, attention_mask=mask, images=stacked).logits, listed)
        with pytest.raises(ValueError, match="one image per sample"):
            llava_model(input_ids=input_ids, attention_mask=mask, images=[images[:2], images[2:3], images[3:], images[:1]])


def test_llava_is_imported_only_inside_the_call():
    tree = ast.parse(Path(inspect.getsourcefile(integration)).read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    names = [alias.name for node in top_level if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
    assert not [n for n in names if n == "llava" or n.startswith(("llava.", "dove_vlm"))]


# ---------------------------------------------------------------------------------------------- templates

TURNS = [
    ("<image>\nWhat color is the circle?", "The circle is red."),
    ("How many squares are there?", "There are three squares."),
]


def test_vicuna_v1_equals_llavas_own_template(llm_tokenizer):
    assert llm_tokenizer.eos_token == "</s>"  # the separator LLaVA writes after each answer
    conv = conv_templates["vicuna_v1"].copy()
    records = []
    for question, answer in TURNS:
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], answer)
        records += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    assert render_conversation(parse_turns(records), llm_tokenizer, "vicuna_v1")[0] == conv.get_prompt()
    ids, _ = tokenize_conversation(records, llm_tokenizer, "vicuna_v1")
    assert llm_tokenizer.decode(ids) == llm_tokenizer.bos_token + conv.get_prompt()
    # the generation prompt: LLaVA's template with the answer still to come
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], TURNS[0][0])
    conv.append_message(conv.roles[1], None)
    assert build_generation_prompt(TURNS[0][0], llm_tokenizer, "vicuna_v1") == conv.get_prompt()


def test_plain_equals_llavas_stage_one_rendering(llm_tokenizer):
    # LLaVA's preprocess_plain: the question becomes a bare <image>, then the answer and the plain template's sep
    question, answer = TURNS[0]
    llava_text = "<image>" + answer + conv_templates["plain"].sep
    records = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    assert render_conversation(parse_turns(records), llm_tokenizer, "plain")[0] == llava_text
    ids, _ = tokenize_conversation(records, llm_tokenizer, "plain")
    assert llm_tokenizer.decode(ids) == llm_tokenizer.bos_token + llava_text
