"""Shared pieces of the tokenizer-training tests: a micro architecture, shapes data, and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

# 32 px, a 4x4x8 latent grid, 8 tokens: small enough that a CPU step takes a fraction of a second.
MICRO_MODEL = {
    "preset": "dove-tiny",
    "overrides": {
        "image_size": 32,
        "max_tokens": 8,
        "token_dim": 16,
        "decoder_hidden_size": 32,
        "decoder_layers": 1,
        "decoder_heads": 2,
        "vq": {
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [8, 16, 16, 16],
            "latent_channels": 8,
            "num_vq_embeddings": 32,
            "norm_num_groups": 8,
            "sample_size": 32,
        },
        "generator": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
    },
}

MICRO_TRAIN = {
    "batch_size": 4,
    "warmup_steps": 2,
    "lr_vq": 1e-3,
    "lr_generator": 1e-3,
    "lr_decoder": 1e-3,
    "lr_discriminator": 1e-3,
    "adversarial_start_step": 2,
    "discriminator_channels": 8,
    "discriminator_layers": 2,
    "length_ramp_steps": 4,
    "log_every": 1,
    "grid_every": 0,
    "checkpoint_every": 2,
    "keep_checkpoints": 2,
    "num_workers": 0,
    "tracker": "none",
    "torch_threads": 1,
    "codebook_init_images": 8,
}


def write_config(path: Path, model: dict | None = None, **train) -> Path:
    path.write_text(yaml.safe_dump({"model": model or MICRO_MODEL, "train": {**MICRO_TRAIN, **train}}))
    return path


def make_shapes_data(out: Path, n: int = 24, seed: int = 0, **kwargs) -> Path:
    from dove_vlm.shapes import make_shapes

    make_shapes(out, n, seed, image_size=32, progress=False, **kwargs)
    return out


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dove_vlm.cli", *args]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra})
    repo = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        cli_command(*args), env=cli_env(**env), capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"dove-vlm {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result
