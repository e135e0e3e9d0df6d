"""Training checkpoints: atomic, pruned to the last K, and complete enough to resume bit for bit.

A checkpoint is a directory `checkpoints/step-00001000/` holding

    model/                  a `DoveTokenizer.save_pretrained` export (loadable on its own)
    discriminator.safetensors
    optimizers.pt           optimiser, scheduler and grad-scaler state dicts (tensors and numbers only)
    rng.safetensors         torch CPU / CUDA generator states, one set per process
    trainer_state.json      step, data position, length-control history, python / numpy RNG, the config

Nothing is pickled: tensors go to safetensors, optimiser state is read back with
`torch.load(weights_only=True)`, and everything else is JSON, so loading a checkpoint never runs code.
(accelerate's `save_state` pickles its RNG and sampler files, which is why it is not used here.)

The directory is written through `atomic_directory`: a process killed at any point leaves either the
previous checkpoints or the new one complete, never a half-written `step-*`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..hub import atomic_directory

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
DISCRIMINATOR_FILE = "discriminator.safetensors"
OPTIMIZERS_FILE = "optimizers.pt"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"
logger = logging.getLogger(__name__)
T = TypeVar("T")
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Test hook, for timing only: "STEP:SECONDS" sleeps halfway through writing checkpoint STEP, so a test can
# kill the process at exactly that point. Unset in normal use.
SLOW_WRITE_ENV = "DOVE_TEST_SLOW_CHECKPOINT_WRITE"


class ExistingRunError(ValueError):
    """A fresh run was pointed at a folder where an earlier run left its checkpoints or results."""


def existing_run_error(output_dir: str | os.PathLike, found: Sequence[Path]) -> ExistingRunError:
    """The refusal both training commands give: continuing and discarding must be asked for, never implied."""
    shown = ", ".join(str(p) for p in found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    return ExistingRunError(
        f"{output_dir} already holds a training run ({shown}); use --resume to continue it, or --overwrite to "
        "discard it (resume=True / overwrite=True from Python)"
    )


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class RNGState:
    """One process's random state: python, numpy, torch CPU, CUDA (if any) and the loop's own generators."""

    python: list[Any]
    numpy: dict[str, Any]
    torch_cpu: torch.Tensor
    cuda: list[torch.Tensor]
    generators: dict[str, torch.Tensor]

    @classmethod
    def capture(cls, generators: Mapping[str, torch.Generator] | None = None) -> RNGState:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return cls(
            python=[version, list(internal), gauss],
            numpy={"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": cached},
            torch_cpu=torch.get_rng_state(),
            cuda=[s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            generators={name: g.get_state().cpu() for name, g in (generators or {}).items()},
        )

    def restore(self, generators: Mapping[str, torch.Generator] | None = None) -> None:
        version, internal, gauss = self.python
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(
            (self.numpy["kind"], np.asarray(self.numpy["keys"], dtype=np.uint32), self.numpy["pos"],
             self.numpy["has_gauss"], self.numpy["cached"])
        )  # fmt: skip
        torch.set_rng_state(self.torch_cpu)
        if self.cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda)
        for name, generator in (generators or {}).items():
            if name not in self.generators:
                raise ValueError(f"the checkpoint has no state for the random generator {name!r}")
            generator.set_state(self.generators[name])

    def json_part(self) -> dict[str, Any]:
        return {"python": self.python, "numpy": self.numpy}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.torch_cpu": self.torch_cpu}
        out.update({f"{prefix}.cuda.{i}": s for i, s in enumerate(self.cuda)})
        out.update({f"{prefix}.generator.{name}": s for name, s in self.generators.items()})
        return out

    @classmethod
    def from_parts(cls, json_part: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> RNGState:
        cuda = []
        while f"{prefix}.cuda.{len(cuda)}" in tensors:
            cuda.append(tensors[f"{prefix}.cuda.{len(cuda)}"])
        head = f"{prefix}.generator."
        generators = {k[len(head) :]: v for k, v in tensors.items() if k.startswith(head)}
        return cls(
            python=json_part["python"],
            numpy=json_part["numpy"],
            torch_cpu=tensors[f"{prefix}.torch_cpu"],
            cuda=cuda,
            generators=generators,
        )


@dataclass
class TrainingCheckpoint:
    """Everything read back from a checkpoint directory; `rng` holds one entry per process rank."""

    path: Path
    step: int
    model_dir: Path
    discriminator: dict[str, torch.Tensor]
    optimizers: dict[str, Any]
    rng: list[RNGState]
    state: dict[str, Any]


class CheckpointManager:
    """Writes `output/checkpoints/step-*` atomically, keeps the newest `keep`, and finds the latest complete one."""

    def __init__(self, output_dir: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.keep = int(keep)

    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first. Staging and retired siblings (dot-prefixed) never match."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir() and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1][1] if found else None

    def save(
        self,
        step: int,
        write_model: Any,
        discriminator_state: Mapping[str, torch.Tensor] | None,
        optimizers: Mapping[str, Any],
        rng_states: list[RNGState],
        state: Mapping[str, Any],
    ) -> Path:
        """Write checkpoint `step`. `write_model(directory)` exports the tokenizer (its `save_pretrained`)."""
        target = self.root / step_dir_name(step)
        with atomic_directory(target) as staging:
            write_model(staging / MODEL_DIR)
            if discriminator_state is not None:
                save_file(_contiguous(discriminator_state), str(staging / DISCRIMINATOR_FILE))
            torch.save(dict(optimizers), staging / OPTIMIZERS_FILE)
            _maybe_pause(step)
            tensors: dict[str, torch.Tensor] = {}
            for rank, rng in enumerate(rng_states):
                tensors.update(rng.tensors(f"rank{rank}"))
            save_file(_contiguous(tensors), str(staging / RNG_FILE))
            payload = dict(state)
            payload["step"] = int(step)
            payload["rng"] = [rng.json_part() for rng in rng_states]
            payload["files"] = file_digests(staging)
            # Written last: a directory with trainer_state.json is a complete checkpoint (`list` relies on it),
            # and its "files" let `verify` catch any file damaged after the fact.
            (staging / STATE_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
        self.prune()
        return target

    def prune(self) -> None:
        found = self.list()
        for _, path in found[: max(0, len(found) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)

    def load_latest(self) -> TrainingCheckpoint | None:
        """The newest checkpoint that verifies and loads; each one skipped is named in a warning. None when
        there is none at all; `CorruptCheckpointError` naming every damaged file when none is usable."""
        return newest_usable(
            [path for _, path in reversed(self.list())],
            self.load,
            where=self.root,
            advice="Delete the damaged checkpoints and resume from an earlier one (--resume DIR), or start afresh "
            "with --overwrite",
        )

    @staticmethod
    def load(path: str | os.PathLike) -> TrainingCheckpoint:
        """Read a checkpoint after `verify`; any damage is a `CorruptCheckpointError` naming the file."""
        path = Path(path)
        state = CheckpointManager.verify(path)
        try:
            return CheckpointManager._read(path, state)
        except (OSError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError, SafetensorError) as err:
            # Checkpoints written before sizes and checksums were recorded reach here when damaged.
            raise CorruptCheckpointError(f"{path} could not be read ({type(err).__name__}: {err})") from err

    @staticmethod
    def verify(path: str | os.PathLike) -> dict[str, Any]:
        """The parsed state file, once every file it records has its recorded size and SHA-256."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} is not a complete training checkpoint (no {STATE_FILE})")
        try:
            state = json.loads(state_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CorruptCheckpointError(f"{state_file} is not valid JSON: {err}") from err
        if not isinstance(state, dict) or not {"step", "rng"} <= state.keys():
            raise CorruptCheckpointError(f"{state_file} lacks the step and RNG records of a checkpoint")
        check_file_digests(path, state.get("files") or {})
        return state

    @staticmethod
    def _read(path: Path, state: dict[str, Any]) -> TrainingCheckpoint:
        state = dict(state)
        state.pop("files", None)
        tensors = load_file(str(path / RNG_FILE))
        rng = [RNGState.from_parts(part, tensors, f"rank{rank}") for rank, part in enumerate(state.pop("rng"))]
        disc_file = path / DISCRIMINATOR_FILE
        return TrainingCheckpoint(
            path=path,
            step=int(state["step"]),
            model_dir=path / MODEL_DIR,
            discriminator=load_file(str(disc_file)) if disc_file.is_file() else {},
            optimizers=torch.load(path / OPTIMIZERS_FILE, map_location="cpu", weights_only=True),
            rng=rng,
            state=state,
        )


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or altered since it was written."""


def newest_usable(
    candidates: Sequence[Path], open_checkpoint: Callable[[Path], T], where: str | os.PathLike, advice: str
) -> T | None:
    """`open_checkpoint` of the first candidate (newest first) that opens without `CorruptCheckpointError`.

    Each damaged one is skipped with a warning naming it, so a run resumes from the checkpoint before a
    damaged newest one; None when there are no candidates; when none is usable, the error names every
    damaged file and ends with `advice`."""
    problems = []
    for path in candidates:
        try:
            return open_checkpoint(path)
        except CorruptCheckpointError as err:
            logger.warning("skipping checkpoint %s: %s; trying the one before it", path, err)
            problems.append(f"{path.name}: {err}")
    if problems:
        raise CorruptCheckpointError(f"no usable checkpoint in {where}: " + "; ".join(problems) + ". " + advice)
    return None


FULL_HASH_LIMIT = 256 * 2**20  # files up to this size are hashed whole
EDGE_BYTES = 2**20  # larger ones by their first and last MiB


def file_digests(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file under `directory`, by relative path.

    Files over `FULL_HASH_LIMIT` are hashed over their first and last `EDGE_BYTES` only: a large model's
    optimiser shards run to tens of GB, and hashing them whole would add minutes to every save and every
    resume. The size catches what a killed or interrupted write leaves (a short file), the edges what an
    overwritten header or tail leaves; a flipped byte in the middle of a large file goes unseen.
    """
    directory = Path(directory)
    return {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def check_file_digests(directory: str | os.PathLike, recorded: Mapping[str, Mapping[str, Any]]) -> None:
    """Raise `CorruptCheckpointError` naming the first file that is missing or differs from `file_digests`."""
    directory = Path(directory)
    for rel, expected in recorded.items():
        file = directory / rel
        if not file.is_file():
            raise CorruptCheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != expected["size"]:
            raise CorruptCheckpointError(f"{file} has {size} bytes, {expected['size']} were written")
        if _sha256(file) != expected["sha256"]:
            raise CorruptCheckpointError(f"{file} does not have the checksum it was written with")


def _sha256(path: Path) -> str:
    """The whole file's SHA-256, or for a file over `FULL_HASH_LIMIT` that of its first and last MiB."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size > FULL_HASH_LIMIT:
            digest.update(handle.read(EDGE_BYTES))
            handle.seek(size - EDGE_BYTES)
            digest.update(handle.read(EDGE_BYTES))
        else:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def _maybe_pause(step: int) -> None:
    spec = os.environ.get(SLOW_WRITE_ENV)
    if not spec:
        return
    try:
        at, seconds = spec.split(":")
        at_step, delay = int(at), float(seconds)
    except ValueError:
        raise ValueError(f"{SLOW_WRITE_ENV} must look like STEP:SECONDS, got {spec!r}") from None
    if step == at_step:
        time.sleep(delay)
