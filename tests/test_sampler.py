"""The visual-length-grouped sampler: less padding than a shuffle, every sample once per epoch, and visual
lengths computed by the real tower once, then read from a cache keyed by tower and data."""

from __future__ import annotations

import json

import pytest
import torch
from llava_workspace import build_workspace
from transformers import AutoTokenizer

from llava_adapter import DoveLlavaForCausalLM, DoveVisionTower, add_image_token
from llava_adapter.data import LlavaCollator, LlavaConversationDataset, pad_token_id
from llava_adapter.sampler import (
    VisualLengthGroupedSampler,
    cached_visual_lengths,
    compute_visual_lengths,
    expanded_lengths,
    padding_share,
)


def heavy_tailed_lengths(n=400, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(8, 40, (n,), generator=generator)
    visual = (torch.rand(n, generator=generator) ** 2 * 256).long() + 1
    return (text + visual).tolist()


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    lengths = heavy_tailed_lengths(103)
    sampler = VisualLengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(103))
    assert list(VisualLengthGroupedSampler(lengths, batch_size=8, seed=3)) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(second) == list(range(103)) and second != first


@pytest.mark.parametrize("world_size", [1, 4])
def test_grouping_cuts_padding_well_below_a_shuffle(world_size):
    lengths = heavy_tailed_lengths()
    batch = 8
    grouped = padding_share(list(VisualLengthGroupedSampler(lengths, batch, world_size=world_size)), lengths, batch)
    shuffled = padding_share(
        torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist(), lengths, batch
    )
    assert shuffled > 0.3
    assert grouped < shuffled / 3


def test_the_longest_step_comes_first():
    lengths = heavy_tailed_lengths()
    order = list(VisualLengthGroupedSampler(lengths, batch_size=8, world_size=2, seed=5))
    assert max(lengths[i] for i in order[:16]) == max(lengths)


def test_expanded_lengths_replace_the_placeholder_by_the_visual_tokens():
    assert expanded_lengths([10, 7, 12], [5, 0, 1]) == [14, 7, 12]
    with pytest.raises(ValueError, match="3 text lengths but 2 visual lengths"):
        expanded_lengths([1, 2, 3], [1, 2])


# ------------------------------------------------------------------ with the real tower and data


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("sampler"), n_images=12)


@pytest.fixture(scope="module")
def tokenizer(workspace):
    tok = AutoTokenizer.from_pretrained(workspace.llm_dir)
    add_image_token(tok)
    return tok


@pytest.fixture(scope="module")
def tower(workspace):
    return DoveVisionTower(str(workspace.tower_dir)).eval()


@pytest.fixture
def small_data(workspace, tmp_path):
    """Six records: enough for the cache's bookkeeping, cheap to run the tower over."""
    path = tmp_path / "small.json"
    path.write_text(json.dumps(workspace.records()[:6]))
    return path


def dataset_for(workspace, tokenizer, tower, data=None, use_query=True):
    return LlavaConversationDataset(
        data or workspace.train_json, tokenizer, tower.image_processor, workspace.images, use_query=use_query
    )


def test_visual_lengths_are_the_towers_own(workspace, tokenizer, tower, tmp_path):
    records = workspace.records()[:6]
    records.insert(
        2, {"id": "t", "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "yes"}]}
    )
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(records))
    dataset = dataset_for(workspace, tokenizer, tower, data)
    lengths = compute_visual_lengths(tower, dataset, batch_size=4)
    assert lengths[2] == 0
    image_rows = [i for i in range(len(dataset)) if i != 2]
    with torch.no_grad():
        features = tower(
            torch.stack([dataset.load_pixels(i) for i in image_rows]), queries=[dataset.query(i) for i in image_rows]
        )
    assert [lengths[i] for i in image_rows] == [f.shape[0] for f in features]
    assert len({lengths[i] for i in image_rows}) > 1, "the calibrated tower should give varied lengths"


def test_the_cache_is_computed_once_and_keyed_by_tower_and_data(workspace, tokenizer, tower, small_data, tmp_path):
    calls = []
    hook = tower.register_forward_hook(lambda *_: calls.append(1))
    cache = tmp_path / "cache"
    try:
        dataset = dataset_for(workspace, tokenizer, tower, small_data)
        lengths, path, hit = cached_visual_lengths(tower, dataset, cache, batch_size=16)
        assert not hit and path.is_file() and calls
        calls.clear()
        again, same_path, hit = cached_visual_lengths(
            tower, dataset_for(workspace, tokenizer, tower, small_data), cache
        )
        assert hit and same_path == path and again == lengths and not calls

        # Another data file, other tower options or other tower weights: another entry.
        shorter = tmp_path / "shorter.json"
        shorter.write_text(json.dumps(workspace.records()[:5]))
        _, other_data, hit = cached_visual_lengths(tower, dataset_for(workspace, tokenizer, tower, shorter), cache)
        assert not hit and other_data != path
        no_query = dataset_for(workspace, tokenizer, tower, small_data, use_query=False)
        _, other_query, _ = cached_visual_lengths(tower, no_query, cache)
        assert other_query != path
        retrained = DoveVisionTower(str(workspace.tower_dir)).eval()
        with torch.no_grad():
            retrained.tokenizer.generator.eos_head.bias.add_(0.5)
        retrained_data = dataset_for(workspace, tokenizer, retrained, small_data)
        _, other_tower, hit = cached_visual_lengths(retrained, retrained_data, cache)
        assert not hit and other_tower != path
    finally:
        hook.remove()


def test_a_damaged_cache_entry_is_recomputed(workspace, tokenizer, tower, small_data, tmp_path):
    dataset = dataset_for(workspace, tokenizer, tower, small_data)
    lengths, path, _ = cached_visual_lengths(tower, dataset, tmp_path)
    path.write_text('{"format": 1, "lengths": [1, 2')
    again, _, hit = cached_visual_lengths(tower, dataset, tmp_path)
    assert not hit and again == lengths
    assert json.loads(path.read_text())["lengths"] == lengths


def test_on_real_data_grouped_batches_carry_less_padding_than_shuffled_ones(workspace, tokenizer, tower, tmp_path):
    dataset = dataset_for(workspace, tokenizer, tower)
    visual, _, _ = cached_visual_lengths(tower, dataset, tmp_path)
    text = [dataset[i]["input_ids"].shape[0] for i in range(len(dataset))]
    lengths = expanded_lengths(text, visual)

    # The lengths the sampler groups by are exactly the rows the LLM receives.
    model = DoveLlavaForCausalLM.from_components(workspace.llm_dir, tower, tokenizer=tokenizer).eval()
    batch = LlavaCollator(pad_token_id(tokenizer))([dataset[i] for i in range(6)])
    with torch.no_grad():
        spliced = model.prepare_multimodal_inputs(
            batch["input_ids"], batch["attention_mask"], images=batch["images"], queries=batch["queries"]
        )
    assert spliced.attention_mask.sum(dim=1).tolist() == lengths[:6]

    batch_size = 4
    grouped = padding_share(list(VisualLengthGroupedSampler(lengths, batch_size, group_size=8)), lengths, batch_size)
    shuffles = [
        padding_share(
            torch.randperm(len(lengths), generator=torch.Generator().manual_seed(s)).tolist(), lengths, batch_size
        )
        for s in range(5)
    ]
    assert grouped < 0.5 * min(shuffles)
