"""A sampler whose position can be saved and restored, so a resumed run draws exactly the batches it would have.

The order of epoch `e` is a pure function of `(seed, e)`; nothing depends on a global RNG, on how many
times `iter()` was called, or on what the DataLoader prefetched. The training loop owns the position:
it calls `advance(n)` for every batch it actually trains on (prefetched batches that a kill throws away
were never counted), and saves `state_dict()` with its checkpoint.

Distributed use: the sampler shards by itself (`num_replicas`, `rank`), the way
`torch.utils.data.DistributedSampler` does. Do NOT pass the DataLoader through `accelerator.prepare()`:
with several processes accelerate wraps the batch sampler in its own `BatchSamplerShard` and would
split the already-split stream a second time. Build the DataLoader per process and move batches to
`accelerator.device` yourself::

    sampler = ResumableSampler(len(dataset), seed, num_replicas=accelerator.num_processes,
                               rank=accelerator.process_index)
    loader = DataLoader(dataset, batch_size=per_device_batch, sampler=sampler,
                        collate_fn=collate_examples, num_workers=4)
    if resuming:
        sampler.load_state_dict(checkpoint["sampler"])
    epoch = sampler.epoch
    while step < max_steps:
        sampler.set_epoch(epoch)          # keeps a restored mid-epoch offset
        for batch in loader:
            sampler.advance(batch["consumed"])
            ...                           # train; checkpoint with sampler.state_dict()
        epoch += 1

Every rank yields the same number of indices (the permutation is padded by wrapping around, or cut
with `drop_last`), so no rank runs out of batches while the others wait in an all-reduce.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Deterministic per-epoch permutation of `range(dataset_len)`, sharded by rank, restartable mid-epoch."""

    def __init__(
        self,
        dataset_len: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if int(dataset_len) < 1:
            raise ValueError(f"ResumableSampler needs a non-empty dataset, got dataset_len={dataset_len}")
        if int(num_replicas) < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank must lie in [0, num_replicas={num_replicas}), got {rank}")
        if drop_last and dataset_len < num_replicas:
            raise ValueError(
                f"drop_last with {dataset_len} examples and {num_replicas} replicas would leave every rank empty"
            )
        self.dataset_len = int(dataset_len)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.offset = 0

    @property
    def samples_per_replica(self) -> int:
        """How many indices each rank draws in a full epoch."""
        if self.drop_last:
            return self.dataset_len // self.num_replicas
        return -(-self.dataset_len // self.num_replicas)

    def epoch_order(self, epoch: int) -> list[int]:
        """The global order of `epoch` (before sharding), a fixed function of `(seed, epoch)`."""
        if self.shuffle:
            # SeedSequence mixes the pair properly: (seed, epoch) and (seed + 1, epoch - 1) differ.
            order = np.random.default_rng([self.seed, int(epoch)]).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        total = self.samples_per_replica * self.num_replicas
        if total > self.dataset_len:
            order = np.concatenate([order, order[: total - self.dataset_len]])
        return order[:total].tolist()

    def indices_for_epoch(self, epoch: int) -> list[int]:
        """This rank's share of `epoch`, from its start."""
        return self.epoch_order(epoch)[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        # Computed eagerly: a later `advance()` during the epoch must not change what this pass yields.
        return iter(self.indices_for_epoch(self.epoch)[self.offset :])

    def __len__(self) -> int:
        return max(0, self.samples_per_replica - self.offset)

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch`; a different epoch starts at its beginning, the current one keeps its offset."""
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = epoch
            self.offset = 0

    def advance(self, num_samples: int) -> None:
        """Record that the loop consumed `num_samples` indices of this rank's stream (a batch, skipped items included)."""
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        self.offset = min(self.offset + int(num_samples), self.samples_per_replica)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_len": self.dataset_len,
            "num_replicas": self.num_replicas,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position. The data, seed and shuffling must match; the world size may change.

        With the same number of replicas the resumed stream is exactly the uninterrupted one. With a
        different number, the global position (offset x old replicas) carries over, rounded down to a
        whole step of the new world size: the epoch's order is kept and at most `num_replicas - 1`
        examples are seen twice.
        """
        for key in ("dataset_len", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]!r} but this sampler has {key}="
                    f"{getattr(self, key)!r}; resuming would replay a different order"
                )
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or offset < 0:
            raise ValueError(f"invalid sampler state: epoch={epoch}, offset={offset}")
        saved_replicas = int(state.get("num_replicas", self.num_replicas))
        if saved_replicas != self.num_replicas:
            offset = offset * saved_replicas // self.num_replicas
        self.epoch = epoch
        self.offset = min(offset, self.samples_per_replica)
