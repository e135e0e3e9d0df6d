"""The tokenizer training loop: configs, parameter groups, a short real run, exact resume after SIGKILL, DDP."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizer_training_helpers import MICRO_MODEL, cli_command, cli_env, make_shapes_data, run_cli, write_config

from tokenizer import DoveTokenizer
from tokenizer.training import loop
from tokenizer.training.checkpointing import CheckpointManager
from tokenizer.training.config import TrainConfig, load_training_file, parse_training_setup
from tokenizer.training.loop import TokenizerTrainer, parameter_groups, warmup_cosine


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_data(tmp_path_factory.mktemp("shapes"), n=16)


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="lr_genrator"):
        parse_training_setup({"model": "dove-tiny", "train": {"lr_genrator": 1e-3}}, where="x.yaml")
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="perceptual_weights"):
        TrainConfig(perceptual_weight=0.1)
    with pytest.raises(ValueError, match="'nope' is unknown"):
        parse_training_setup({"model": "nope"}, where="x.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_training_file(tmp_path / "missing.yaml")


def test_training_recipes_parse():
    from tokenizer.training.recipes import available_recipes, recipe_path

    names = available_recipes()
    assert {"dove-tiny", "dove-pythia14m-amused256", "dove-pythia70m-amused256"} <= set(names)
    for name in names:  # the full presets train with LPIPS, so they need VGG16 weights named
        setup = load_training_file(recipe_path(name), overrides={"perceptual_weights": "vgg16.pth"})
        assert setup.train.max_steps > 0
    with pytest.raises(ValueError, match="perceptual_weights"):
        load_training_file(recipe_path("dove-pythia70m-amused256"))


def test_parameter_groups_and_frozen_vq():
    setup = parse_training_setup({"model": MICRO_MODEL, "train": {"lr_vq": 1e-5, "lr_decoder": 2e-4}}, where="t")
    from tokenizer.training.loop import build_tokenizer

    model = build_tokenizer(setup.model)
    groups = {g["name"]: g for g in parameter_groups(model, setup.train)}
    assert groups["vq"]["lr"] == 1e-5 and groups["decoder"]["lr"] == 2e-4
    assert groups["decoder_no_decay"]["weight_decay"] == 0.0
    grouped = sum(p.numel() for g in groups.values() for p in g["params"])
    assert grouped == sum(p.numel() for p in model.parameters())

    frozen = TrainConfig(freeze_vq=True)
    model.vq.requires_grad_(False)
    names = {g["name"] for g in parameter_groups(model, frozen)}
    assert not any(n.startswith("vq") for n in names)


def test_warmup_then_cosine_to_the_floor():
    values = [warmup_cosine(s, warmup_steps=4, total_steps=20, min_ratio=0.1) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in itertools.pairwise(values[3:]))
    assert values[-1] == pytest.approx(0.1)


@pytest.mark.slow
def test_short_run_writes_everything_and_the_export_loads(tmp_path, shapes):
    config = write_config(
        tmp_path / "run.yaml", max_steps=4, gradient_accumulation_steps=2, grid_every=2, grid_images=2,
        tracker="tensorboard", checkpoint_every=1, keep_checkpoints=2,
    )  # fmt: skip
    setup = load_training_file(config)
    out = tmp_path / "run"
    trainer = TokenizerTrainer(
        setup, shapes / "images", out, annotations=shapes / "train" / "annotations.json", progress=False
    )
    summary = trainer.train()
    assert summary.steps == 4
    assert [s for s, _ in CheckpointManager(out).list()] == [3, 4]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "loss/discriminator" in records[-1] and "loss/generator_adversarial" in records[-1]
    assert all(torch.isfinite(torch.tensor(r["loss/total"])) for r in records)
    with Image.open(out / "logs" / "loss_curve.png") as curve:
        assert curve.format == "PNG" and curve.width > 100
    loaded = DoveTokenizer.from_pretrained(out / "final")
    for name, tensor in trainer.tokenizer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.slow
def test_frozen_vq_stays_put_and_the_rest_trains(tmp_path, shapes):
    config = write_config(tmp_path / "run.yaml", max_steps=2, freeze_vq=True, checkpoint_every=0)
    setup = load_training_file(config)
    trainer = TokenizerTrainer(setup, shapes / "images", tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.tokenizer.state_dict().items()}
    trainer.train()
    after = trainer.tokenizer.state_dict()
    vq_changed = [k for k in before if k.startswith("vq.") and not torch.equal(before[k], after[k])]
    assert not vq_changed
    assert not torch.equal(before["decoder.latent_out.weight"], after["decoder.latent_out.weight"])
    assert all(not p.requires_grad for p in trainer.tokenizer.vq.parameters())


def test_vq_warmup_trains_only_the_vq_then_freezes_its_encoder(tmp_path, shapes):
    config = write_config(
        tmp_path / "run.yaml", max_steps=4, vq_warmup_steps=2, freeze_vq_encoder=True, checkpoint_every=0,
        adversarial_start_step=100,
    )  # fmt: skip
    trainer = TokenizerTrainer(load_training_file(config), shapes / "images", tmp_path / "run", progress=False)
    encoder = "vq.model.encoder.conv_in.weight"
    start = {k: v.clone() for k, v in trainer.tokenizer.state_dict().items()}
    trainer.config.max_steps = 2
    trainer.train()
    warmed = {k: v.clone() for k, v in trainer.tokenizer.state_dict().items()}
    assert not torch.equal(start[encoder], warmed[encoder])  # the encoder trains in the warm-up
    untouched = [k for k in start if k.startswith(("generator.", "decoder.")) and not torch.equal(start[k], warmed[k])]
    assert not untouched  # nothing but the VQ has a loss in the warm-up
    assert "loss/vq_reconstruction" in trainer_history(tmp_path / "run")[0]

    trainer.config.max_steps = 4
    trainer.train()
    after = trainer.tokenizer.state_dict()
    assert torch.equal(warmed[encoder], after[encoder])  # frozen once the warm-up is over
    assert not torch.equal(warmed["decoder.latent_out.weight"], after["decoder.latent_out.weight"])
    assert not torch.equal(warmed["vq.model.decoder.conv_out.weight"], after["vq.model.decoder.conv_out.weight"])


def test_full_length_steps_decode_from_every_token_before_lengths_vary(tmp_path, shapes):
    config = write_config(
        tmp_path / "run.yaml", max_steps=5, vq_warmup_steps=1, full_length_steps=2, uniform_length_fraction=1.0,
        checkpoint_every=0, adversarial_start_step=100, log_every=1,
    )  # fmt: skip
    trainer = TokenizerTrainer(load_training_file(config), shapes / "images", tmp_path / "run", progress=False)
    max_tokens = trainer.tokenizer.config.max_tokens
    tau_before = trainer.objective.length_control.threshold
    trainer.config.max_steps = 3  # the warm-up step and both full-length steps
    trainer.train()
    history = trainer_history(tmp_path / "run")
    assert [r.get("length/trained_mean") for r in history[1:3]] == [max_tokens, max_tokens]
    assert all("loss/length" not in r for r in history[1:3])
    assert trainer.objective.length_control.threshold == tau_before  # full-length errors would bias the threshold low

    trainer.config.max_steps = 5
    trainer.train()
    history = trainer_history(tmp_path / "run")
    assert all("loss/length" in r for r in history[3:5])
    lengths = torch.stack([trainer._choose_lengths(torch.ones(64, dtype=torch.long)) for _ in range(2)])
    assert lengths.min() < max_tokens  # uniform draws again


def trainer_history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_corrupt_image_is_skipped_and_counted_or_fails_with_strict(tmp_path):
    data = make_shapes_data(tmp_path / "shapes", n=8)
    (data / "images" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = write_config(tmp_path / "run.yaml", max_steps=3, batch_size=3, checkpoint_every=0)
    result = run_cli("train-tokenizer", "--config", str(config), "--data", str(data / "images"),
                     "--output", str(tmp_path / "run"), "--no-progress")  # fmt: skip
    assert "skipped 1 unreadable images" in result.stdout
    strict = subprocess.run(
        cli_command("train-tokenizer", "--config", str(config), "--data", str(data / "images"),
                    "--output", str(tmp_path / "strict"), "--strict", "--no-progress"),
        env=cli_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert strict.returncode != 0 and "zz_broken.png" in strict.stderr


@pytest.mark.slow
def test_a_folder_where_no_image_decodes_stops_with_an_error_instead_of_hanging(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for k in range(5):
        (folder / f"bad{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = write_config(tmp_path / "run.yaml", max_steps=3, batch_size=2, checkpoint_every=0)
    # A regression hangs; the timeout turns that into a failure.
    result = subprocess.run(
        cli_command("train-tokenizer", "--config", str(config), "--data", str(folder),
                    "--output", str(tmp_path / "run"), "--no-progress"),
        env=cli_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: a whole epoch over" in result.stderr and str(folder) in result.stderr
    assert "5 of 5 images were unreadable" in result.stderr


def test_a_mostly_unreadable_folder_is_warned_about(tmp_path, caplog):
    data = make_shapes_data(tmp_path / "shapes", n=4)
    for k in range(2):
        (data / "images" / f"zz_bad{k}.png").write_bytes(b"not an image")
    config = write_config(tmp_path / "run.yaml", max_steps=1, batch_size=6, checkpoint_every=0, codebook_init_images=0)
    setup = load_training_file(config)
    trainer = TokenizerTrainer(setup, data / "images", tmp_path / "run", progress=False)
    with caplog.at_level("WARNING", logger="tokenizer.training.loop"):
        trainer.train()
    assert any("2 of 6 images" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def _all_tensors(run: Path) -> dict[str, torch.Tensor]:
    checkpoint = CheckpointManager(run).latest()
    tensors = {f"model.{k}": v for k, v in load_file(str(checkpoint / "model" / "model.safetensors")).items()}
    tensors.update({f"disc.{k}": v for k, v in load_file(str(checkpoint / "discriminator.safetensors")).items()})
    optimizers = torch.load(checkpoint / "optimizers.pt", weights_only=True)
    for name in ("generator", "discriminator"):
        for index, state in optimizers[name]["state"].items():
            for key, value in state.items():
                tensors[f"{name}.{index}.{key}"] = torch.as_tensor(value)
    return tensors


# Phases that the resume has to cross: a VQ warm-up of 3 steps, then 3 full-length steps, then length control,
# each optimiser step accumulating two micro-batches.
PHASES = {"max_steps": 7, "vq_warmup_steps": 3, "full_length_steps": 3, "gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict:
    """One uninterrupted run per training config, shared by the kill points that use it."""
    return {"root": tmp_path_factory.mktemp("reference"), "runs": {}}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("train", "kill_after"),
    [({"max_steps": 6}, 2), (PHASES, 2), (PHASES, 4)],
    ids=["length-control", "in-vq-warmup-accumulating", "in-full-length-accumulating"],
)
def test_sigkill_and_resume_reaches_the_same_parameters(tmp_path, reference_runs, train, kill_after):
    """Q-DOVE data (query dropping), adversarial loss on, length control: every random stream is exercised.
    Killed once checkpoint `kill_after` is written, the run resumes from it: inside the VQ warm-up (step 2 of 3),
    inside the full-length phase (step 4, the phase being steps 3-5) or under length control. Every parameter
    and optimiser state comes back bitwise equal (single-threaded CPU runs are deterministic)."""
    data = make_shapes_data(tmp_path / "shapes", n=16)
    config = write_config(tmp_path / "run.yaml", checkpoint_every=2, keep_checkpoints=3, **train)

    def args(out: Path) -> list[str]:
        return ["train-tokenizer", "--config", str(config), "--data", str(data / "images"), "--annotations",
                str(data / "train" / "annotations.json"), "--output", str(out), "--no-progress"]  # fmt: skip

    key = json.dumps(train, sort_keys=True)
    if key not in reference_runs["runs"]:
        reference_runs["runs"][key] = reference_runs["root"] / f"run{len(reference_runs['runs'])}"
        run_cli(*args(reference_runs["runs"][key]))
    reference = reference_runs["runs"][key]

    interrupted = tmp_path / "interrupted"
    checkpoint = interrupted / "checkpoints" / f"step-{kill_after:08d}"
    process = subprocess.Popen(cli_command(*args(interrupted)), env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not checkpoint.is_dir():
            assert process.poll() is None, f"the run ended before {checkpoint.name} appeared"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    steps_at_kill = [s for s, _ in CheckpointManager(interrupted).list()]
    assert steps_at_kill and steps_at_kill[-1] == kill_after, steps_at_kill  # resumed from inside its phase
    result = run_cli(*args(interrupted), "--resume")
    assert "resumed from" in result.stdout

    expected, got = _all_tensors(reference), _all_tensors(interrupted)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    state = json.loads((CheckpointManager(interrupted).latest() / "trainer_state.json").read_text())
    reference_state = json.loads((CheckpointManager(reference).latest() / "trainer_state.json").read_text())
    assert state["length_control"] == reference_state["length_control"]
    assert state["sampler"] == reference_state["sampler"]


@pytest.mark.slow
def test_two_gloo_processes_agree(tmp_path):
    data = make_shapes_data(tmp_path / "shapes", n=16)
    config = write_config(tmp_path / "run.yaml", max_steps=3, checkpoint_every=0)
    out = tmp_path / "ddp"
    probe = tmp_path / "params"
    script = Path(__file__).parent / "ddp_dump_params.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531", str(script),
               str(config), str(data / "images"), str(data / "train" / "annotations.json"), str(out), str(probe)]  # fmt: skip
    env = cli_env()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [load_file(str(probe / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    final = DoveTokenizer.from_pretrained(out / "final").state_dict()
    for name, tensor in final.items():
        assert torch.equal(tensor, ranks[0][f"model.{name}"]), name


def test_the_loss_curve_draws_each_step_once_from_the_run_that_kept_it(tmp_path, monkeypatch):
    """A resumed run logs again the steps after its checkpoint: the curve takes each step's last record."""
    metrics = tmp_path / "logs" / "metrics.jsonl"
    metrics.parent.mkdir()
    rows = [{"step": 1, "loss/total": 3.0}, {"step": 2, "loss/total": 9.0}, {"step": 2, "loss/total": 2.0},
            {"step": 3, "loss/total": 1.0, "loss/length": 0.5}]  # fmt: skip
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = {}
    monkeypatch.setattr(loop, "plot_loss_curve", lambda history, path, keys, title: drawn.update(h=history, k=keys))
    loop.write_loss_curve(metrics)
    assert [(r["step"], r["loss/total"]) for r in drawn["h"]] == [(1, 3.0), (2, 2.0), (3, 1.0)]
    assert drawn["k"] == ["loss/total", "loss/length"]
    assert loop.write_loss_curve(tmp_path / "absent.jsonl") is None
