"""Checkpoints: exact RNG round trips, keep-last-K, and a kill in the middle of a write."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizer_training_helpers import cli_command, cli_env, make_shapes_data, run_cli, write_config

from tokenizer import DoveTokenizer
from tokenizer.training.checkpointing import SLOW_WRITE_ENV, CheckpointManager, CorruptCheckpointError, RNGState


def _draw(generator: torch.Generator) -> tuple:
    return (random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=generator)))


def test_rng_state_restores_every_stream():
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    _draw(generator)
    state = RNGState.capture({"loop": generator})
    first = _draw(generator)
    _draw(generator)
    state.restore({"loop": generator})
    assert _draw(generator) == first


def _save(manager: CheckpointManager, step: int) -> Path:
    model_state = {"w": torch.full((2,), float(step))}

    def write_model(directory: Path) -> None:
        directory.mkdir(parents=True)
        from safetensors.torch import save_file

        save_file(model_state, str(directory / "model.safetensors"))

    optimizers = {"generator": {"state": {0: {"exp_avg": torch.ones(2) * step}}, "param_groups": [{"lr": 0.1}]}}
    return manager.save(
        step, write_model, {"d": torch.zeros(1)}, optimizers, [RNGState.capture()], {"sampler": {"epoch": 0}}
    )


def test_manager_keeps_the_newest_and_loads_back(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4, 6):
        _save(manager, step)
    assert [s for s, _ in manager.list()] == [4, 6]
    (manager.root / ".step-00000008.tmp-abc").mkdir()  # an interrupted write is never "latest"
    loaded = CheckpointManager.load(manager.latest())
    assert loaded.step == 6
    assert torch.equal(loaded.optimizers["generator"]["state"][0]["exp_avg"], torch.full((2,), 6.0))
    assert loaded.state["sampler"] == {"epoch": 0}
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        CheckpointManager.load(manager.root / ".step-00000008.tmp-abc")


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_previous_checkpoint_loadable(tmp_path):
    data = make_shapes_data(tmp_path / "shapes", n=16)
    config = write_config(tmp_path / "run.yaml", max_steps=6, checkpoint_every=2)
    out = tmp_path / "run"
    args = [
        "train-tokenizer",
        "--config",
        str(config),
        "--data",
        str(data / "images"),
        "--output",
        str(out),
        "--no-progress",
    ]
    process = subprocess.Popen(
        cli_command(*args), env=cli_env(**{SLOW_WRITE_ENV: "4:120"}), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    root = out / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        staging = []
        while time.monotonic() < deadline and process.poll() is None:
            staging = [p for p in root.glob(".step-00000004.tmp-*") if (p / "optimizers.pt").is_file()]
            if staging:
                break
            time.sleep(0.2)
        assert staging, (
            f"checkpoint 4 never started writing: {process.stderr.read().decode()[-2000:] if process.poll() is not None else ''}"
        )
        os.kill(process.pid, signal.SIGKILL)  # a real kill, halfway through writing step 4
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    manager = CheckpointManager(out)
    assert manager.latest() == root / "step-00000002"
    checkpoint = CheckpointManager.load(manager.latest())
    assert checkpoint.step == 2
    DoveTokenizer.from_pretrained(checkpoint.model_dir)  # the model export inside it loads on its own
    run_cli(*args, "--resume")  # and training picks up from it and finishes
    assert [s for s, _ in manager.list()] == [4, 6]
    assert not list(root.glob(".step-*"))  # the half-written directory was cleaned up


# ------------------------------------------------------------------------------------------ reused output folders


def _train(config: Path, data: Path, out: Path, **kwargs):
    from tokenizer.training.config import load_training_file
    from tokenizer.training.loop import train_tokenizer

    return train_tokenizer(load_training_file(config), data / "images", out, progress=False, **kwargs)


def test_a_fresh_run_refuses_an_earlier_runs_output_unless_told_to_overwrite(tmp_path, capsys):
    from dove_vlm.cli import main as cli_main
    from tokenizer.training.checkpointing import ExistingRunError

    data = make_shapes_data(tmp_path / "shapes", n=8)
    config = write_config(tmp_path / "run.yaml", max_steps=4, checkpoint_every=2, codebook_init_images=0)
    out = tmp_path / "run"
    _train(config, data, out)
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "README").write_text("mine too")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ExistingRunError, match="use --resume to continue it, or --overwrite to discard it"):
        _train(config, data, out)
    args = ["train-tokenizer", "--config", str(config), "--data", str(data / "images"), "--output", str(out)]
    assert cli_main([*args, "--no-progress", "--max-steps", "2"]) == 2
    assert "step-00000004" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing was touched

    config2 = write_config(tmp_path / "run2.yaml", max_steps=2, checkpoint_every=2, codebook_init_images=0, seed=7)
    summary = _train(config2, data, out, overwrite=True)
    assert summary.steps == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["README", "step-00000002"]
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # only the new run's metrics
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoints" / "README").read_text() == "mine too"
    with pytest.raises(ValueError, match="pass one of them"):
        _train(config2, data, out, overwrite=True, resume=True)


# ------------------------------------------------------------------------------------------ damaged checkpoints


def test_resume_skips_a_damaged_newest_checkpoint_file_by_file(tmp_path, caplog):
    """Truncate each file of the newest checkpoint in turn: the run resumes from the one before it, says so,
    and ends with the parameters of the uninterrupted run."""
    data = make_shapes_data(tmp_path / "shapes", n=8)
    config = write_config(tmp_path / "run.yaml", max_steps=4, checkpoint_every=2, codebook_init_images=0)
    out = tmp_path / "run"
    _train(config, data, out)
    reference = load_file(str(out / "final" / "model.safetensors"))
    root = out / "checkpoints"
    newest, previous = root / "step-00000004", root / "step-00000002"
    pristine = tmp_path / "pristine"
    shutil.copytree(newest, pristine)
    recorded = json.loads((newest / "trainer_state.json").read_text())["files"]
    names = [name for name, entry in recorded.items() if entry["size"] > 1] + ["trainer_state.json"]
    assert {"optimizers.pt", "rng.safetensors", "discriminator.safetensors", "model/model.safetensors"} <= set(names)
    for name in names:
        shutil.rmtree(newest)
        shutil.copytree(pristine, newest)
        victim = newest / name
        with open(victim, "r+b") as handle:
            handle.truncate(victim.stat().st_size // 2)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tokenizer.training.checkpointing"):
            summary = _train(config, data, out, resume=True)
        assert summary.resumed_from == previous, name
        assert f"skipping checkpoint {newest}" in caplog.text and name in caplog.text, caplog.text
        final = load_file(str(out / "final" / "model.safetensors"))
        assert final.keys() == reference.keys()
        assert all(torch.equal(final[k], reference[k]) for k in reference), f"{name}: parameters differ"

    for path in (newest, previous):  # nothing usable left: the error names every damaged file
        (path / "optimizers.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match=r"no usable checkpoint.*step-00000004.*optimizers\.pt.*"
                       r"step-00000002.*optimizers\.pt"):  # fmt: skip
        _train(config, data, out, resume=True)
    with pytest.raises(CorruptCheckpointError, match=r"step-00000002/optimizers\.pt has 7 bytes"):
        _train(config, data, out, resume=str(previous))


def test_file_digests_catch_truncation_and_altered_bytes_and_hash_large_files_by_their_edges(tmp_path, monkeypatch):
    from tokenizer.training import checkpointing

    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(bytes(range(256)) * 8)
    large.write_bytes(os.urandom(64 * 1024))
    monkeypatch.setattr(checkpointing, "FULL_HASH_LIMIT", 16 * 1024)
    monkeypatch.setattr(checkpointing, "EDGE_BYTES", 1024)
    recorded = checkpointing.file_digests(tmp_path)
    checkpointing.check_file_digests(tmp_path, recorded)  # untouched: accepted

    def altered(path: Path, offset: int) -> None:
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))

    original = {p: p.read_bytes() for p in (small, large)}
    cases = [
        (lambda: altered(small, 1000), "small.bin does not have the checksum"),  # a small file is hashed whole
        (lambda: altered(large, 10), "large.bin does not have the checksum"),  # a large file's head
        (lambda: altered(large, 64 * 1024 - 10), "large.bin does not have the checksum"),  # and its tail
        (lambda: large.write_bytes(original[large][:-1]), "large.bin has 65535 bytes, 65536 were written"),
    ]
    for damage, message in cases:
        damage()
        with pytest.raises(CorruptCheckpointError, match=message):
            checkpointing.check_file_digests(tmp_path, recorded)
        for path, data in original.items():
            path.write_bytes(data)
    # The middle of a large file is what this trades away for a save that does not read tens of GB.
    altered(large, 32 * 1024)
    checkpointing.check_file_digests(tmp_path, recorded)
