"""`finetune --output` reused: a fresh run refuses an earlier run's checkpoints, `overwrite` discards only what
that run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llava_workspace import build_workspace

from llava_adapter.train import FinetuneArguments, finetune
from tokenizer.checkpointing import ExistingRunError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp("runs"), n_images=4)
    subset = ws.root / "train8.json"
    subset.write_text(json.dumps(ws.records()[:8]))
    ws.subset = subset
    return ws


def stage1(workspace, output: Path, **overrides) -> FinetuneArguments:
    values = dict(
        stage=1, data=str(workspace.subset), image_folder=str(workspace.images), output_dir=str(output),
        llm=str(workspace.llm_dir), tower=str(workspace.tower_dir), per_device_train_batch_size=2, max_steps=4,
        learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler_type="constant", group_by_visual_length=False,
        save_steps=2, save_total_limit=2,
    )  # fmt: skip
    values.update(overrides)
    return FinetuneArguments(**values)


def test_fresh_finetune_refuses_an_earlier_run_and_overwrite_discards_only_that_run(workspace, tmp_path):
    out = tmp_path / "run"
    finetune(stage1(workspace, out))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExistingRunError, match="checkpoint-2.*use --resume to continue it, or --overwrite"):
        finetune(stage1(workspace, out, max_steps=2, seed=7))
    with pytest.raises(ValueError, match="pass one of them"):
        finetune(stage1(workspace, out, resume=True, overwrite=True))
    finetune(stage1(workspace, out, max_steps=2, seed=7, save_steps=None, overwrite=True))
    assert not list(out.glob("checkpoint-*"))
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "finetune_log.json").read_text())["arguments"]["seed"] == 7
