"""Batches of samples with similar *expanded* lengths, where an image's share is its own visual length.

With a CLIP tower every image costs the same number of tokens, so grouping by text length is enough.
A DOVE image costs anywhere from `min_tokens` to `max_tokens`, often more than its text, so a batch
grouped by text alone can still be mostly padding. The sampler therefore needs each image's visual
length, which only the tower can say: it is computed once, in one pass of the tower over the data, and
cached in a file keyed by the tower's weights and options and by the data file's bytes (a different
checkpoint, threshold, budget or data file gets its own entry; the same ones never pay twice).

Order: a seeded shuffle, cut into megabatches of `group_size` global batches; each megabatch is sorted
by length and cut into global batches (so batch mates have similar lengths); the global batches are
then shuffled, with the longest one first so that a batch that does not fit in memory fails at step 1,
not hours in. Every rank draws the same order from the same seed and epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .data import LlavaConversationDataset
from .vision_tower import DoveVisionTower

CACHE_ENV = "DOVE_VLM_CACHE"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """`$DOVE_VLM_CACHE/visual_lengths`, else `~/.cache/dove-vlm/visual_lengths`."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "dove-vlm") / "visual_lengths"


def _gathered(module: torch.nn.Module) -> Any:
    """Full parameters for the duration of a block, also when DeepSpeed ZeRO-3 has partitioned them."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def tower_fingerprint(tower: DoveVisionTower) -> str:
    """A digest of everything that decides a visual length: weights, architecture and length options."""
    digest = hashlib.sha256()
    options = {
        "config": tower.config.to_dict(),
        "use_query": tower.use_query,
        "threshold": tower.threshold,
        "budget": tower.budget,
    }
    digest.update(json.dumps(options, sort_keys=True, default=str).encode())
    with _gathered(tower), torch.no_grad():
        for name, tensor in sorted(tower.tokenizer.state_dict().items()):
            if name.startswith("decoder."):  # the decoder reconstructs pixels; lengths never depend on it
                continue
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _TowerInputs(Dataset):
    """The image samples' pixels and queries, for one pass of the tower (DataLoader workers decode)."""

    def __init__(self, dataset: LlavaConversationDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, str]:
        index = self.indices[position]
        return self.dataset.load_pixels(index), self.dataset.query(index) or ""


def _stack(items: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([pixels for pixels, _ in items]), [query for _, query in items]


@torch.no_grad()
def compute_visual_lengths(
    tower: DoveVisionTower,
    dataset: LlavaConversationDataset,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool | None = None,
) -> list[int]:
    """Each sample's visual token count as the tower decides it (0 for text-only samples).

    One tower pass over every image: minutes on a large set, so it shows a progress bar (`progress` None:
    only when stderr is a terminal)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    lengths = [0] * len(dataset)
    indices = [i for i in range(len(dataset)) if dataset.has_image(i)]
    if not indices:
        return lengths
    loader = DataLoader(
        _TowerInputs(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=_stack
    )
    was_training = tower.training
    tower.eval()
    cursor = 0
    try:
        with _gathered(tower):
            bar = tqdm(loader, desc="visual lengths", unit="batch", disable=None if progress is None else not progress)
            for pixels, queries in bar:
                pixels = pixels.to(device=tower.device)
                features = tower(pixels, queries=queries if any(queries) else None)
                for feature in features:
                    lengths[indices[cursor]] = int(feature.shape[0])
                    cursor += 1
    finally:
        tower.train(was_training)
    return lengths


def visual_length_cache_path(tower: DoveVisionTower, dataset: LlavaConversationDataset, cache_dir: Path) -> Path:
    key = hashlib.sha256(f"{tower_fingerprint(tower)}:{dataset.fingerprint()}".encode()).hexdigest()
    return Path(cache_dir) / f"visual_lengths-{key[:32]}.json"


def cached_visual_lengths(
    tower: DoveVisionTower,
    dataset: LlavaConversationDataset,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool | None = None,
) -> tuple[list[int], Path, bool]:
    """Visual lengths from the cache, or computed once and written there.

    Returns (lengths, cache file, whether it was read from the cache). A cache entry that does not fit
    the dataset (a different sample count) is recomputed rather than trusted.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = visual_length_cache_path(tower, dataset, cache_dir)
    if path.is_file():
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            lengths = [int(n) for n in entry["lengths"]]
            if entry.get("format") == CACHE_FORMAT and len(lengths) == len(dataset):
                return lengths, path, True
        except (ValueError, KeyError, TypeError):
            pass  # a damaged entry is recomputed and overwritten below
    lengths = compute_visual_lengths(tower, dataset, batch_size=batch_size, num_workers=num_workers, progress=progress)
    entry = {
        "format": CACHE_FORMAT,
        "tower": tower.vision_tower_name,
        "data": str(dataset.data_path),
        "image_folder": str(dataset.image_folder) if dataset.image_folder else None,
        "use_query": dataset.use_query and tower.use_query,
        "lengths": lengths,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(entry, out)
    os.replace(staging, path)  # readers on other ranks see the whole file or none of it
    return lengths, path, False


def expanded_lengths(text_lengths: Sequence[int], visual_lengths: Sequence[int]) -> list[int]:
    """What the LLM sees per sample: text tokens, minus the placeholder, plus the visual tokens."""
    if len(text_lengths) != len(visual_lengths):
        raise ValueError(f"{len(text_lengths)} text lengths but {len(visual_lengths)} visual lengths")
    return [t + (v - 1 if v > 0 else 0) for t, v in zip(text_lengths, visual_lengths)]


class VisualLengthGroupedSampler(Sampler[int]):
    """Indices in an order whose consecutive runs of `batch_size * world_size` have similar lengths.

    `lengths` are per-sample expanded lengths (`expanded_lengths`). `world_size` is the number of
    per-device batches one optimizer step draws (ranks times accumulation steps). `group_size` trades
    randomness for tighter batches: sorting happens within megabatches of that many global batches.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        group_size: int = 16,
        seed: int = 0,
    ) -> None:
        if batch_size < 1 or world_size < 1 or group_size < 1:
            raise ValueError(
                f"batch_size, world_size and group_size must be positive, got {batch_size}, {world_size}, {group_size}"
            )
        if len(lengths) == 0:
            raise ValueError("the sampler needs at least one sample length")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.world_size = world_size
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        step = self.batch_size * self.world_size
        megabatch = step * self.group_size
        steps: list[list[int]] = []
        for start in range(0, len(order), megabatch):
            chunk = sorted(order[start : start + megabatch], key=lambda i: self.lengths[i], reverse=True)
            steps += [chunk[i : i + step] for i in range(0, len(chunk), step)]
        # A short final step stays last (the DataLoader may drop it); the rest are shuffled, longest first.
        tail = [steps.pop()] if len(steps[-1]) < step else []
        shuffled = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
        if shuffled:
            longest = max(range(len(shuffled)), key=lambda i: max(self.lengths[j] for j in shuffled[i]))
            shuffled.insert(0, shuffled.pop(longest))
        for indices in shuffled + tail:
            yield from indices


def padding_share(order: Sequence[int], lengths: Sequence[int], batch_size: int) -> float:
    """Fraction of the tokens in right-padded batches (consecutive runs of `batch_size`) that are padding."""
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return (padded - real) / padded if padded else 0.0
