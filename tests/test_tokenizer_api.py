"""The tokenizer's public API on the tiny preset: lengths, padding, decoding, queries, persistence."""

from __future__ import annotations

import pytest
import torch

from dove_vlm import DoveTokenizer
from tokenizer.modeling.length import lengths_from_eos


@pytest.fixture
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 64, 64, generator=generator)


@torch.no_grad()
def test_forced_budgets_give_exactly_those_lengths(tiny_tokenizer, images):
    budgets = [1, 5, 17, 32]
    enc = tiny_tokenizer.encode(images, budget=budgets)
    assert enc.tokens.shape == (4, 32, tiny_tokenizer.token_dim)
    assert enc.lengths.tolist() == budgets
    assert enc.attention_mask.sum(dim=1).tolist() == budgets
    for i, budget in enumerate(budgets):
        assert torch.all(enc.attention_mask[i, :budget] == 1)
        assert torch.all(enc.attention_mask[i, budget:] == 0)
        assert torch.all(enc.tokens[i, budget:] == 0)
        assert enc.tokens[i, :budget].abs().sum() > 0
    assert [f.shape[0] for f in enc.features()] == budgets


@torch.no_grad()
def test_automatic_length_follows_each_images_own_eos(tiny_tokenizer, images):
    model = tiny_tokenizer
    model.generator.eos_head.bias.fill_(-20.0)  # nobody stops: every image gets all N tokens
    assert model.encode(images).lengths.tolist() == [model.max_tokens] * 4

    def fire_for_image_two(module, inputs, output):
        output = output.clone()
        output[2, 5] = 30.0  # EOS at position 6 for image 2 only
        return output

    handle = model.generator.eos_head.register_forward_hook(fire_for_image_two)
    try:
        assert model.encode(images).lengths.tolist() == [32, 32, 6, 32]
    finally:
        handle.remove()
    model.generator.eos_head.bias.fill_(20.0)  # everybody stops as early as allowed
    assert model.encode(images).lengths.tolist() == [model.config.min_tokens] * 4


@torch.no_grad()
def test_automatic_lengths_in_a_batch_equal_lengths_alone(tiny_tokenizer, images):
    model = tiny_tokenizer
    model.generator.eos_head.weight.normal_(0, 2.0)  # an EOS head that actually varies along the sequence
    model.generator.eos_head.bias.fill_(-1.0)
    batch = model.encode(images, threshold=0.6)
    alone = [model.encode(images[i : i + 1], threshold=0.6).lengths.item() for i in range(4)]
    assert batch.lengths.tolist() == alone


def test_lengths_from_eos_rules():
    probs = torch.tensor(
        [
            [0.1, 0.2, 0.9, 0.9],  # first above threshold at position 3
            [0.9, 0.1, 0.1, 0.1],  # fires at 1 but min_tokens=2 -> first allowed is none -> N
            [0.1, 0.1, 0.1, 0.1],  # never -> N
            [0.1, 0.6, 0.1, 0.1],  # at 2
        ]
    )
    assert lengths_from_eos(probs, 0.5, min_tokens=2).tolist() == [3, 4, 4, 2]
    assert lengths_from_eos(probs, 0.5, min_tokens=1).tolist() == [3, 1, 4, 2]
    assert lengths_from_eos(probs, 0.95, min_tokens=1).tolist() == [4, 4, 4, 4]


@torch.no_grad()
def test_padding_never_leaks_into_encoding(tiny_tokenizer, images):
    queries = ["what colour is the circle?", None, "", "is the red square left of the blue triangle?"]
    batch = tiny_tokenizer.encode(images, queries=queries, budget=[3, 32, 9, 20])
    for i in range(4):
        alone = tiny_tokenizer.encode(images[i : i + 1], queries=[queries[i]], budget=[batch.lengths[i].item()])
        torch.testing.assert_close(batch.tokens[i], alone.tokens[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch.eos_probs[i], alone.eos_probs[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_padding_never_leaks_into_decoding(tiny_tokenizer, images):
    enc = tiny_tokenizer.encode(images, budget=32)
    lengths = [2, 32, 7, 15]
    batch = tiny_tokenizer.decode(enc.tokens, lengths)
    for i, length in enumerate(lengths):
        alone = tiny_tokenizer.decode(enc.tokens[i : i + 1, :length], [length])
        torch.testing.assert_close(batch[i], alone[0], atol=1e-5, rtol=1e-4)
    # Whatever sits after the length must not matter either.
    noisy = enc.tokens.clone()
    noisy[0, 2:] = 100.0
    torch.testing.assert_close(tiny_tokenizer.decode(noisy, lengths)[0], batch[0], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_every_budget_decodes_to_a_valid_image(tiny_tokenizer, images):
    enc = tiny_tokenizer.encode(images[:1], budget=32)
    tokens = enc.tokens.expand(32, -1, -1)
    decoded = tiny_tokenizer.decode(tokens, list(range(1, 33)))
    assert decoded.shape == (32, 3, 64, 64)
    assert torch.isfinite(decoded).all()
    assert decoded.min() >= 0 and decoded.max() <= 1


@torch.no_grad()
def test_query_changes_tokens_and_empty_query_equals_none(tiny_tokenizer, images):
    plain = tiny_tokenizer.encode(images[:2], budget=32)
    empty = tiny_tokenizer.encode(images[:2], queries=["", "   "], budget=32)
    torch.testing.assert_close(plain.tokens, empty.tokens)
    torch.testing.assert_close(plain.eos_probs, empty.eos_probs)
    asked = tiny_tokenizer.encode(images[:2], queries="what colour is the square?", budget=32)
    assert (asked.tokens - plain.tokens).abs().max() > 1e-4
    # A mixed batch: the empty query's image is still exactly the unconditioned one.
    mixed = tiny_tokenizer.encode(images[:2], queries=["what colour is the square?", ""], budget=32)
    torch.testing.assert_close(mixed.tokens[1], plain.tokens[1], atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_reconstruct_returns_each_budget_and_the_automatic_length(tiny_tokenizer, images):
    result = tiny_tokenizer.reconstruct(images[:2], budgets=[4, 16])
    assert sorted(result.by_budget) == [4, 16]
    assert result.auto.shape == (2, 3, 64, 64)
    assert result.auto_lengths.shape == (2,)
    direct = tiny_tokenizer.decode(tiny_tokenizer.encode(images[:2], budget=4).tokens, [4, 4])
    torch.testing.assert_close(result.by_budget[4], direct, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_save_and_load_round_trip(tiny_tokenizer, images, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert (tmp_path / "ckpt" / "config.json").is_file()
    loaded = DoveTokenizer.from_pretrained(tmp_path / "ckpt").eval()
    queries = ["what shape is the red object?", None, "", "count the shapes"]
    a = tiny_tokenizer.encode(images, queries=queries)
    b = loaded.encode(images, queries=queries)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(tiny_tokenizer.decode(a.tokens, a.lengths), loaded.decode(b.tokens, b.lengths))
    # Saving over an existing checkpoint replaces it and leaves no temporary directories behind.
    loaded.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_dtype_casts_leave_the_vq_in_fp32(tiny_tokenizer):
    model = tiny_tokenizer.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.vq.parameters()} == {torch.float32}
    with torch.no_grad():
        enc = model.encode(torch.rand(1, 3, 64, 64), budget=8)
    assert enc.tokens.dtype == torch.bfloat16
    assert torch.isfinite(enc.tokens.float()).all()
