"""`DoveVisionTower`: LLaVA's tower interface over a DOVE tokenizer, per-image lengths, freezing, queries."""

from __future__ import annotations

import inspect

import pytest
import torch
from PIL import Image

from llava_adapter.vision_tower import DoveVisionTower
from tokenizer import DoveTokenizer
from tokenizer.evaluation.stand_ins import calibrate_eos_head

# What LLaVA's CLIP tower exposes and the rest of a LLaVA codebase reads.
LLAVA_TOWER_MEMBERS = (
    "load_model",
    "is_loaded",
    "image_processor",
    "hidden_size",
    "num_patches",
    "num_patches_per_side",
    "dummy_feature",
    "config",
    "dtype",
    "device",
    "forward",
)
QUERIES = ["what color is the circle", "how many squares are there", "is the star on the left", "what shape is red"]


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calibrated_tokenizer(images):
    """A random dove-tiny whose EOS head reads its inputs (see `calibrate_eos_head`)."""
    torch.manual_seed(0)
    tokenizer = DoveTokenizer.from_preset("dove-tiny").eval()
    calibrate_eos_head(tokenizer, torch.cat([images, images]), [None] * 4 + QUERIES)
    return tokenizer


def test_tower_has_every_member_llava_uses():
    tower = DoveVisionTower("dove-tiny")
    for name in LLAVA_TOWER_MEMBERS:
        assert hasattr(tower, name), name
    assert tower.is_loaded is True
    assert "device_map" in inspect.signature(tower.load_model).parameters
    assert tower.hidden_size == tower.config.token_dim == 32
    assert tower.num_patches == tower.config.max_tokens == 32
    assert tower.num_patches_per_side**2 >= tower.num_patches > (tower.num_patches_per_side - 1) ** 2
    assert tower.dummy_feature.shape == (1, tower.hidden_size)
    assert tower.dummy_feature.dtype == tower.dtype and tower.dummy_feature.device == tower.device
    processor = tower.image_processor
    image = Image.new("RGB", (80, 64), (200, 10, 10))
    pixels = processor.preprocess(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 64, 64)
    assert torch.equal(processor(image, return_tensors="pt")["pixel_values"], pixels)
    assert len(processor.image_mean) == 3
    assert processor.crop_size == {"height": 64, "width": 64}


def test_forward_returns_one_tensor_per_image_at_its_own_length(tiny_tokenizer, images):
    tower = DoveVisionTower(tiny_tokenizer)
    features = tower(images, budget=[3, 17, 32, 1])
    assert [tuple(f.shape) for f in features] == [(3, 32), (17, 32), (32, 32), (1, 32)]
    assert tower.last_lengths.tolist() == [3, 17, 32, 1]
    # The tower is the tokenizer's encoder: same tokens, cut at the same lengths.
    encoded = tiny_tokenizer.encode(images, budget=[3, 17, 32, 1])
    for feature, reference in zip(features, encoded.features()):
        torch.testing.assert_close(feature, reference)
    # A list of single images is accepted as LLaVA's towers accept it.
    listed = tower([images[0], images[1]], budget=5)
    assert [f.shape[0] for f in listed] == [5, 5]


def test_automatic_lengths_come_from_the_eos_head(calibrated_tokenizer, images):
    tower = DoveVisionTower(calibrated_tokenizer)
    features = tower(images, queries=QUERIES)
    lengths = [f.shape[0] for f in features]
    expected = calibrated_tokenizer.encode(images, queries=QUERIES).lengths.tolist()
    assert lengths == expected
    assert len(set(lengths)) > 1, "the calibrated head should give different lengths to different inputs"
    lower = tower(images, queries=QUERIES, threshold=0.05)
    assert all(a <= b for a, b in zip((f.shape[0] for f in lower), lengths))


def test_uniform_training_lengths_draw_every_length_in_training_and_none_in_eval(calibrated_tokenizer, images):
    tower = DoveVisionTower(calibrated_tokenizer, training_lengths="uniform")
    n, low = tower.num_patches, calibrated_tokenizer.config.min_tokens
    auto = calibrated_tokenizer.encode(images, queries=QUERIES).lengths.tolist()
    tower.eval()
    assert [f.shape[0] for f in tower(images, queries=QUERIES)] == auto  # inference keeps the EOS head's choice
    tower.train()
    torch.manual_seed(3)
    drawn = [[f.shape[0] for f in tower(images, queries=QUERIES)] for _ in range(200)]
    seen = {length for lengths in drawn for length in lengths}
    assert seen == set(range(low, n + 1)), "every length from min_tokens to N is drawn"
    assert [f.shape[0] for f in tower(images, queries=QUERIES, budget=2)] == [2] * 4  # a budget still forces
    torch.manual_seed(3)
    assert [[f.shape[0] for f in tower(images, queries=QUERIES)] for _ in range(200)] == drawn  # seeded: repeats
    # each drawn length cuts the same token sequence: a prefix of the full encoding
    full = calibrated_tokenizer.encode(images, queries=QUERIES, budget=n)
    for feature, tokens in zip(tower(images, queries=QUERIES), full.tokens):
        torch.testing.assert_close(feature, tokens[: feature.shape[0]])
    with pytest.raises(ValueError, match="training_lengths"):
        DoveVisionTower(calibrated_tokenizer, training_lengths="random")


def test_a_frozen_tower_ignores_the_training_steps_autocast(calibrated_tokenizer, images):
    """Lengths picked inside a bf16 training step must equal the fp32 lengths inference and the cache use."""
    tower = DoveVisionTower(calibrated_tokenizer)
    with torch.no_grad():
        plain = tower(images, queries=QUERIES)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = tower(images, queries=QUERIES)
    assert [f.shape[0] for f in under_autocast] == [f.shape[0] for f in plain]
    for a, b in zip(plain, under_autocast):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b)


def test_query_conditioning_changes_lengths_and_can_be_switched_off(calibrated_tokenizer, images):
    with_queries = DoveVisionTower(calibrated_tokenizer, use_query=True)
    without_queries = DoveVisionTower(calibrated_tokenizer, use_query=False)
    on = [f.shape[0] for f in with_queries(images, queries=QUERIES)]
    off = [f.shape[0] for f in with_queries(images)]
    assert on != off
    ignored = without_queries(images, queries=QUERIES)
    plain = without_queries(images)
    assert [f.shape[0] for f in ignored] == off
    for a, b in zip(ignored, plain):
        assert torch.equal(a, b)


def test_frozen_by_default_and_trainable_parts_exist_from_construction(tmp_path):
    torch.manual_seed(0)
    frozen = DoveVisionTower("dove-tiny")
    assert not any(p.requires_grad for p in frozen.parameters())
    features = frozen(torch.rand(2, 3, 64, 64), budget=4)
    assert not features[0].requires_grad

    eos = DoveVisionTower("dove-tiny", trainable="eos_head")
    trainable = {n for n, p in eos.named_parameters() if p.requires_grad}
    assert trainable == {"tokenizer.generator.eos_head.weight", "tokenizer.generator.eos_head.bias"}

    generator = DoveVisionTower("dove-tiny", trainable="generator")
    trainable = {n for n, p in generator.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("tokenizer.generator.") for n in trainable)
    out = generator(torch.rand(1, 3, 64, 64), budget=3)[0]
    out.sum().backward()
    assert generator.tokenizer.generator.token_head.weight.grad is not None

    with torch.no_grad():
        eos.tokenizer.generator.eos_head.bias.add_(1.5)
    eos.tokenizer.save_pretrained(tmp_path / "tower")
    reloaded = DoveVisionTower(str(tmp_path / "tower"), trainable="eos_head")
    assert torch.equal(reloaded.tokenizer.generator.eos_head.bias, eos.tokenizer.generator.eos_head.bias)
    assert reloaded.tokenizer.generator.eos_head.bias.requires_grad

    with pytest.raises(ValueError, match="trainable"):
        DoveVisionTower("dove-tiny", trainable="decoder")


def test_frozen_parts_stay_in_eval_mode():
    tower = DoveVisionTower("dove-tiny", trainable="eos_head").train()
    assert tower.training and not tower.tokenizer.training
    tower = DoveVisionTower("dove-tiny", trainable="generator").train()
    assert tower.tokenizer.generator.training and not tower.tokenizer.vq.training


def test_delay_load_answers_config_questions_before_loading(tmp_path):
    torch.manual_seed(0)
    DoveTokenizer.from_preset("dove-tiny").save_pretrained(tmp_path / "tower")
    tower = DoveVisionTower(str(tmp_path / "tower"), delay_load=True)
    assert tower.is_loaded is False
    assert tower.hidden_size == 32 and tower.num_patches == 32
    assert tower.image_processor.crop_size == {"height": 64, "width": 64}
    with pytest.raises(RuntimeError, match="load_model"):
        tower(torch.rand(1, 3, 64, 64))
    tower.load_model()
    loaded = tower.tokenizer
    tower.load_model()  # a second call keeps what is loaded
    assert tower.is_loaded and tower.tokenizer is loaded
    assert tower(torch.rand(1, 3, 64, 64), budget=2)[0].shape == (2, 32)


def test_bad_inputs_get_clear_errors(tiny_tokenizer):
    tower = DoveVisionTower(tiny_tokenizer)
    with pytest.raises(ValueError, match=r"\[B, 3, 64, 64\]"):
        tower(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="queries has 1 entries"):
        tower(torch.rand(2, 3, 64, 64), queries=["one"])
    with pytest.raises(ValueError, match="budget"):
        tower(torch.rand(1, 3, 64, 64), budget=33)
    with pytest.raises(FileNotFoundError):
        DoveVisionTower("/nonexistent/tower/dir")
