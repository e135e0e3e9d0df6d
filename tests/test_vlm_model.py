"""`DoveLlavaForCausalLM` over a tiny LLaMA and a tiny GPT-NeoX: splicing, batching, labels, truncation,
save/load (LoRA included), query conditioning, inference helpers and the `chat` command."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from llava_adapter import (
    IGNORE_INDEX,
    DoveLlavaForCausalLM,
    DoveVisionTower,
    TruncationWarning,
    answer_questions,
    conversation_query,
    load_pretrained_model,
    score_continuations,
    tokenize_conversation,
    tokenize_generation_prompt,
)
from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer
from tokenizer import DoveTokenizer, ImageLoadError
from tokenizer.evaluation.stand_ins import calibrate_eos_head

TEXTS = [
    "What color is the circle? The circle is red.",
    "How many squares are there? There are three squares.",
    "Is the star left of the triangle? Yes, the star is on the left.",
    "What shape is blue? The blue shape is a square.",
] * 10
CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": "The circle is red."}],
    [
        {"from": "human", "value": "How many squares are there?\n<image>"},
        {"from": "gpt", "value": "There are three squares."},
        {"from": "human", "value": "What shape is blue?"},
        {"from": "gpt", "value": "A square."},
    ],
    [{"from": "human", "value": "<image>\nIs the star left of the triangle?"}, {"from": "gpt", "value": "Yes."}],
]
QUESTIONS = ["What color is the circle?", "How many squares are there?", "Is the star left of the triangle?"]
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"]}


@pytest.fixture(scope="module")
def llm_tokenizer():
    return train_tiny_tokenizer(TEXTS, vocab_size=320)


@pytest.fixture(scope="module")
def images():
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tower_tokenizer(images):
    """A random dove-tiny whose EOS head reads its inputs, so lengths differ across samples and queries."""
    torch.manual_seed(0)
    tokenizer = DoveTokenizer.from_preset("dove-tiny").eval()
    calibrate_eos_head(tokenizer, torch.cat([images, images]), [None] * 3 + QUESTIONS)
    return tokenizer


def build_model(arch, tower_tokenizer, llm_tokenizer, **kwargs):
    torch.manual_seed(0)
    llm = build_tiny_llm(llm_tokenizer, arch, init_std=0.2)
    return DoveLlavaForCausalLM.from_components(
        llm, DoveVisionTower(tower_tokenizer), tokenizer=llm_tokenizer, **kwargs
    ).eval()


@pytest.fixture(scope="module", params=["llama", "gpt_neox"])
def model(request, tower_tokenizer, llm_tokenizer):
    return build_model(request.param, tower_tokenizer, llm_tokenizer)


@pytest.fixture(scope="module")
def llama_model(tower_tokenizer, llm_tokenizer):
    """For tests of plumbing above the LLM, where one architecture is enough."""
    return build_model("llama", tower_tokenizer, llm_tokenizer)


def training_batch(tokenizer, conversations=CONVERSATIONS):
    encoded = [tokenize_conversation(c, tokenizer, sample_id=i) for i, c in enumerate(conversations)]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(encoded):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = targets
        attention_mask[row, : len(ids)] = 1
    queries = [conversation_query(c) for c in conversations]
    return input_ids, attention_mask, labels, queries


def prompt_batch(tokenizer, questions=QUESTIONS):
    prompts = [tokenize_generation_prompt(q, tokenizer) for q in questions]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


# ------------------------------------------------------------------------------------------ batching


@pytest.mark.parametrize("budget", [None, [3, 9, 20]], ids=["auto-lengths", "forced-lengths"])
def test_training_logits_of_each_sample_equal_the_sample_alone(model, llm_tokenizer, images, budget):
    input_ids, attention_mask, labels, queries = training_batch(llm_tokenizer)
    with torch.no_grad():
        batched = model(input_ids, attention_mask, labels=labels, images=images, queries=queries, budget=budget)
    assert len(set(batched.visual_lengths)) > 1, batched.visual_lengths
    assert model.last_visual_lengths == batched.visual_lengths
    for row in range(len(CONVERSATIONS)):
        n = int(attention_mask[row].sum())
        with torch.no_grad():
            alone = model(
                input_ids[row : row + 1, :n],
                attention_mask[row : row + 1, :n],
                labels=labels[row : row + 1, :n],
                images=images[row : row + 1],
                queries=queries[row : row + 1],
                budget=None if budget is None else budget[row : row + 1],
            )
        width = alone.logits.shape[1]
        assert width == n - 1 + batched.visual_lengths[row]
        assert alone.visual_lengths == [batched.visual_lengths[row]]
        torch.testing.assert_close(batched.logits[row, :width], alone.logits[0], atol=5e-5, rtol=1e-4)
        assert torch.equal(batched.labels[row, :width], alone.labels[0])
        assert batched.attention_mask[row, :width].all() and not batched.attention_mask[row, width:].any()
        assert (batched.labels[row, width:] == IGNORE_INDEX).all()


def test_greedy_generation_of_each_sample_equals_the_sample_alone(model, llm_tokenizer, images):
    input_ids, attention_mask = prompt_batch(llm_tokenizer)
    settings = {
        "max_new_tokens": 6,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
        "pad_token_id": llm_tokenizer.pad_token_id,
        "eos_token_id": llm_tokenizer.eos_token_id,
    }
    batched = model.generate(input_ids, attention_mask, images=images, queries=QUESTIONS, **settings)
    lengths = list(model.last_visual_lengths)
    assert len(set(lengths)) > 1, lengths
    first_scores = batched.scores[0]
    assert not torch.allclose(first_scores[0], first_scores[1], atol=1e-3), "samples should not look alike"
    for row in range(len(QUESTIONS)):
        keep = attention_mask[row].bool()
        alone = model.generate(
            input_ids[row : row + 1, keep], images=images[row : row + 1], queries=QUESTIONS[row : row + 1], **settings
        )
        assert model.last_visual_lengths == [lengths[row]]
        steps = alone.sequences.shape[1]
        assert torch.equal(batched.sequences[row, :steps], alone.sequences[0])
        assert (batched.sequences[row, steps:] == llm_tokenizer.pad_token_id).all()
        for step in range(steps):
            torch.testing.assert_close(batched.scores[step][row], alone.scores[step][0], atol=1e-4, rtol=1e-4)


def test_text_only_samples_mix_with_image_samples(model, llm_tokenizer, images):
    conversations = [CONVERSATIONS[0], [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]]
    encoded = [
        tokenize_conversation(conversations[0], llm_tokenizer),
        tokenize_conversation(conversations[1], llm_tokenizer, num_images=0),
    ]
    input_ids, attention_mask, labels, _ = _pad_pairs(encoded, llm_tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids, attention_mask, labels=labels, images=images[:1])
        n = int(attention_mask[1].sum())
        text_only = model.llm(input_ids=input_ids[1:, :n]).logits
        # The collator's one-image-per-sample layout (a dummy for the text-only sample) gives the same result.
        masked = model(
            input_ids, attention_mask, labels=labels, images=images[:2], image_sample_mask=torch.tensor([True, False])
        )
    torch.testing.assert_close(out.logits[1, :n], text_only[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.logits, masked.logits)
    assert len(out.visual_lengths) == 1


def _pad_pairs(encoded, pad_id):
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id)
    labels = torch.full((len(encoded), width), IGNORE_INDEX)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, targets) in enumerate(encoded):
        input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = ids, targets, 1
    return input_ids, attention_mask, labels, None


# ------------------------------------------------------------------------------------------ labels


def test_no_image_or_prompt_position_is_ever_a_target(model, llm_tokenizer, images):
    input_ids, attention_mask, labels, queries = training_batch(llm_tokenizer)
    image_id = model.config.image_token_id
    with torch.no_grad():
        out = model(input_ids, attention_mask, labels=labels, images=images, queries=queries)
    for row, length in enumerate(out.visual_lengths):
        ids = input_ids[row][attention_mask[row].bool()]
        placeholder = int((ids == image_id).nonzero()[0])
        visual = out.labels[row, placeholder : placeholder + length]
        assert (visual == IGNORE_INDEX).all()
        assert (out.labels[row, :placeholder] == IGNORE_INDEX).all()  # the prompt before the image
        targets = out.labels[row][out.labels[row] != IGNORE_INDEX]
        expected = labels[row][labels[row] != IGNORE_INDEX]
        assert torch.equal(targets, expected)  # exactly the answers, in order, nothing else
        assert image_id not in targets.tolist()


def test_a_sample_longer_than_the_maximum_is_truncated_with_a_warning_and_stays_aligned(
    tower_tokenizer, llm_tokenizer, images
):
    model = build_model("llama", tower_tokenizer, llm_tokenizer)
    input_ids, attention_mask, labels, queries = training_batch(llm_tokenizer)
    budget = [32, 2, 2]
    with torch.no_grad():
        full = model(input_ids, attention_mask, labels=labels, images=images, queries=queries, budget=budget)
    long_length = int(attention_mask[0].sum()) - 1 + 32
    short = max(int(attention_mask[r].sum()) - 1 + 2 for r in (1, 2))
    limit = long_length - 3  # cuts into the first sample's answer only
    assert short <= limit
    model.config.model_max_length = limit
    with pytest.warns(TruncationWarning, match="sample 'long-one'") as caught, torch.no_grad():
        cut = model(
            input_ids,
            attention_mask,
            labels=labels,
            images=images,
            queries=queries,
            budget=budget,
            sample_ids=["long-one", "b", "c"],
        )
    assert len(caught) == 1
    assert cut.logits.shape[1] == limit
    torch.testing.assert_close(cut.logits[0], full.logits[0, :limit], atol=1e-5, rtol=1e-5)
    assert torch.equal(cut.labels[0], full.labels[0, :limit])
    assert (full.labels[0, limit:] != IGNORE_INDEX).any()  # some answer tokens were really dropped
    for row in (1, 2):
        torch.testing.assert_close(cut.logits[row, :short], full.logits[row, :short], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ bad input


def test_more_placeholders_than_images_names_the_sample(model, llm_tokenizer, images):
    input_ids, attention_mask, labels, _ = training_batch(llm_tokenizer)
    with pytest.raises(ValueError, match="sample 'rec-b': more <image> placeholders than images"):
        model(input_ids, attention_mask, labels=labels, images=images[:1], sample_ids=["rec-a", "rec-b", "rec-c"])
    text_only = input_ids.clone()
    text_only[2][text_only[2] == model.config.image_token_id] = llm_tokenizer.pad_token_id
    with pytest.raises(ValueError, match="samples without one: batch row 2"):
        model(text_only, attention_mask, labels=labels, images=images)
    with pytest.raises(ValueError, match="queries has 2 entries"):
        model(input_ids, attention_mask, images=images, queries=["a", "b"])


# ------------------------------------------------------------------------------------------ queries


def test_query_conditioning_on_versus_off_changes_the_visual_lengths(model, llm_tokenizer, images):
    input_ids, attention_mask, labels, queries = training_batch(llm_tokenizer)
    with torch.no_grad():
        on = model(input_ids, attention_mask, labels=labels, images=images, queries=queries).visual_lengths
        off = model(input_ids, attention_mask, labels=labels, images=images).visual_lengths
    assert on != off
    answers_on = answer_questions(model, llm_tokenizer, list(images), QUESTIONS, use_query=True, max_new_tokens=2)
    answers_off = answer_questions(model, llm_tokenizer, list(images), QUESTIONS, use_query=False, max_new_tokens=2)
    assert [a.visual_tokens for a in answers_on] == on
    assert [a.visual_tokens for a in answers_off] == off


def test_the_query_never_contains_the_answer(model, llm_tokenizer, images):
    seen = []
    hook = model.vision_tower.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.append(kwargs.get("queries")), with_kwargs=True
    )
    answers = ["The circle is red.", "There are three squares.", "Yes."]
    try:
        score_continuations(model, llm_tokenizer, list(images), QUESTIONS, answers)
        answer_questions(model, llm_tokenizer, list(images), QUESTIONS, max_new_tokens=2)
        input_ids, attention_mask, labels, queries = training_batch(llm_tokenizer)
        with torch.no_grad():
            model(input_ids, attention_mask, labels=labels, images=images, queries=queries)
    finally:
        hook.remove()
    assert seen == [QUESTIONS, QUESTIONS, QUESTIONS]
    for queries in seen:
        for query in queries:
            assert not any(answer.rstrip(".") in query for answer in answers)


# ------------------------------------------------------------------------------------------ save / load


def test_save_and_reload_give_identical_logits(model, llm_tokenizer, images, tmp_path):
    input_ids, attention_mask, labels, queries = training_batch(llm_tokenizer)
    with torch.no_grad():
        before = model(input_ids, attention_mask, labels=labels, images=images, queries=queries)
    model.save_pretrained(tmp_path / "vlm", tokenizer=llm_tokenizer)
    for name in (
        "config.json",
        "mm_projector.safetensors",
        "vision_tower/model.safetensors",
        "vision_tower/text_tokenizer",
        "llm/config.json",
        "tokenizer_config.json",
    ):
        assert (tmp_path / "vlm" / name).exists(), name
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert config["model_type"] == "dove_llava" and config["tower_config"]["max_tokens"] == 32
    tokenizer, reloaded, image_processor, context_len = load_pretrained_model(tmp_path / "vlm")
    assert context_len == model.max_length and image_processor.crop_size == {"height": 64, "width": 64}
    assert tokenizer("<image> red")["input_ids"] == llm_tokenizer("<image> red")["input_ids"]
    with torch.no_grad():
        after = reloaded(input_ids, attention_mask, labels=labels, images=images, queries=queries)
    assert after.visual_lengths == before.visual_lengths
    assert torch.equal(after.logits, before.logits)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_lora_adapter_saves_and_reloads_to_identical_logits(arch, tower_tokenizer, llm_tokenizer, images, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = build_model(arch, tower_tokenizer, llm_tokenizer)
    input_ids, attention_mask, _labels, queries = training_batch(llm_tokenizer)
    with torch.no_grad():
        base = model(input_ids, attention_mask, images=images, queries=queries).logits
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.llm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
        adapted = model(input_ids, attention_mask, images=images, queries=queries).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    model.save_pretrained(tmp_path / "lora", tokenizer=llm_tokenizer)
    # The Trainer's path: a full state dict handed over (gathered, under ZeRO-3).
    model.save_pretrained(tmp_path / "lora-state", state_dict=model.state_dict())
    for directory in ("lora", "lora-state"):
        assert (tmp_path / directory / "adapter_config.json").is_file()
        reloaded = DoveLlavaForCausalLM.from_pretrained(tmp_path / directory)
        assert isinstance(reloaded.llm, PeftModel)
        with torch.no_grad():
            logits = reloaded(input_ids, attention_mask, images=images, queries=queries).logits
        torch.testing.assert_close(logits, adapted, atol=1e-6, rtol=1e-6)
        # The base weights under llm/ are the LLM without the adapter.
        with torch.no_grad():
            bare = reloaded.llm.get_base_model()
            with reloaded.llm.disable_adapter():
                unadapted = reloaded(input_ids, attention_mask, images=images, queries=queries).logits
        assert bare is reloaded._base_llm()
        torch.testing.assert_close(unadapted, base, atol=1e-6, rtol=1e-6)


def test_components_from_dirs_and_an_llm_kept_by_reference(tower_tokenizer, llm_tokenizer, images, tmp_path):
    torch.manual_seed(0)
    build_tiny_llm(llm_tokenizer, "gpt_neox", init_std=0.2).save_pretrained(tmp_path / "llm-src")
    tower_tokenizer.save_pretrained(tmp_path / "tower-src")
    model = DoveLlavaForCausalLM.from_components(
        str(tmp_path / "llm-src"),
        str(tmp_path / "tower-src"),
        projector_type="linear",
        tokenizer=llm_tokenizer,
        use_query=False,
    ).eval()
    assert model.config.llm_source == str(tmp_path / "llm-src")
    assert model.config.tower_source == str(tmp_path / "tower-src")
    input_ids, attention_mask, _labels, queries = training_batch(llm_tokenizer)
    with torch.no_grad():
        before = model(input_ids, attention_mask, images=images, queries=queries)
    model.save_pretrained(tmp_path / "vlm", tokenizer=llm_tokenizer, save_llm=False)
    assert not (tmp_path / "vlm" / "llm").exists()
    reloaded = DoveLlavaForCausalLM.from_pretrained(tmp_path / "vlm")
    assert reloaded.vision_tower.use_query is False
    with torch.no_grad():
        after = reloaded(input_ids, attention_mask, images=images, queries=queries)
    assert torch.equal(after.logits, before.logits)


def test_training_reaches_the_projector_and_not_the_frozen_tower(tower_tokenizer, llm_tokenizer, images):
    model = build_model("llama", tower_tokenizer, llm_tokenizer).train()
    model.activation_checkpointing_enable()
    input_ids, attention_mask, labels, queries = training_batch(llm_tokenizer)
    out = model(input_ids, attention_mask, labels=labels, images=images, queries=queries)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.mm_projector.parameters())
    assert all(p.grad is None for p in model.vision_tower.parameters())
    assert model.get_input_embeddings().weight.grad is not None
    assert not model.vision_tower.tokenizer.training


# ------------------------------------------------------------------------------------------ inference


def test_answers_are_batched_and_name_missing_images(llama_model, llm_tokenizer, tmp_path):
    model = llama_model
    paths = []
    for index, color in enumerate([(220, 20, 20), (20, 200, 40), (30, 40, 230)]):
        path = tmp_path / f"img{index}.png"
        Image.new("RGB", (72, 64), color).save(path)
        paths.append(str(path))
    batched = answer_questions(model, llm_tokenizer, paths, QUESTIONS, max_new_tokens=4, batch_size=3)
    single = answer_questions(model, llm_tokenizer, paths, QUESTIONS, max_new_tokens=4, batch_size=1)
    assert batched == single
    assert all(1 <= a.visual_tokens <= 32 for a in batched)
    forced = answer_questions(model, llm_tokenizer, paths[:1], QUESTIONS[:1], budget=5, max_new_tokens=1)
    assert forced[0].visual_tokens == 5
    with pytest.raises(ImageLoadError, match="missing.png"):
        answer_questions(model, llm_tokenizer, [str(tmp_path / "missing.png")], QUESTIONS[:1])


def test_continuation_scores(model, llm_tokenizer, images):
    continuations = ["The circle is red.", "three", "Yes"]
    batched = score_continuations(model, llm_tokenizer, list(images), QUESTIONS, continuations, batch_size=3)
    single = score_continuations(model, llm_tokenizer, list(images), QUESTIONS, continuations, batch_size=1)
    for (a, greedy_a), (b, greedy_b) in zip(batched, single):
        assert a < 0 and abs(a - b) < 1e-4 and greedy_a == greedy_b
    # The greedy next token scores as greedy; another token does not.
    input_ids, attention_mask = prompt_batch(llm_tokenizer, QUESTIONS[:1])
    generated = model.generate(
        input_ids,
        attention_mask,
        images=images[:1],
        queries=QUESTIONS[:1],
        max_new_tokens=1,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=llm_tokenizer.pad_token_id,
    )
    ranked = generated.scores[0][0].argsort(descending=True).tolist()
    single_token = [
        t for t in ranked if llm_tokenizer(llm_tokenizer.decode([t]), add_special_tokens=False)["input_ids"] == [t]
    ]
    best, other = single_token[0], single_token[1]
    assert best == ranked[0], "the greedy token should round-trip through text"
    texts = [llm_tokenizer.decode([best]), llm_tokenizer.decode([other])]
    scored = score_continuations(model, llm_tokenizer, [images[0]] * 2, QUESTIONS[:1] * 2, texts)
    log_probs = torch.log_softmax(generated.scores[0][0], dim=-1)
    assert scored[0][1] is True and scored[1][1] is False
    assert abs(scored[0][0] - float(log_probs[best])) < 1e-4
    assert abs(scored[1][0] - float(log_probs[other])) < 1e-4


def test_chat_command_prints_the_answer_and_the_visual_token_count(llama_model, llm_tokenizer, tmp_path, capsys):
    model = llama_model
    from dove_vlm.cli import main

    model.save_pretrained(tmp_path / "vlm", tokenizer=llm_tokenizer)
    image = tmp_path / "scene.png"
    Image.new("RGB", (64, 64), (250, 0, 0)).save(image)
    argv = ["chat", "--model", str(tmp_path / "vlm"), "--image", str(image), "--question", QUESTIONS[0]]
    assert main(argv + ["--max-new-tokens", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("visual tokens: ")
    assert main(argv + ["--budget", "7", "--no-query", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "visual tokens: 7"
    assert main(argv + ["--budget", "99"]) == 2
    assert "--budget" in capsys.readouterr().err
