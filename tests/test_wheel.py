"""A wheel built from the repository and installed non-editable, used from outside the repository: the files
the commands read besides code (lmms-eval task folders, DeepSpeed configs) must travel inside the package.

The fresh venv sees this interpreter's site-packages (for torch and the other dependencies) through a plain
`.pth` line, which adds the directory without running the `.pth` files inside it, so an editable dove-vlm
installed there stays inactive and `import dove_vlm` finds the wheel's copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dove_vlm", "llava_adapter", "tokenizer")


def run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv holding dove-vlm installed from a wheel of this repository."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build writes nothing into the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = root / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(source)],
        cwd=root,
    )  # fmt: skip
    (wheel,) = wheels.glob("dove_vlm-*.whl")

    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=root)
    Path(purelib.stdout.strip(), "shared_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # pip itself comes from the shared site-packages; --force-reinstall because a dove-vlm of the same
    # version may be installed there (pip leaves it alone: it lies outside this venv)
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", "-q", str(wheel)], root)
    found = run([str(python), "-c", "import dove_vlm; print(dove_vlm.__file__)"], cwd=root).stdout.strip()
    assert Path(found).is_relative_to(venv), found
    return venv / "bin"


@pytest.fixture(scope="module")
def tiny_vlm_and_shapes(tmp_path_factory) -> tuple[Path, Path]:
    from dove_vlm.shapes import make_shapes
    from llava_adapter import DoveLlavaForCausalLM
    from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer
    from tokenizer import DoveTokenizer

    root = tmp_path_factory.mktemp("wheel_data")
    shapes = make_shapes(root / "shapes", n=10, seed=0, progress=False).out_dir
    train = json.loads((shapes / "train" / "annotations.json").read_text())
    llm_tokenizer = train_tiny_tokenizer([f"{r['question']} {r['answer']}" for r in train], vocab_size=320)
    torch.manual_seed(0)
    model = DoveLlavaForCausalLM.from_components(
        build_tiny_llm(llm_tokenizer), DoveTokenizer.from_preset("dove-tiny").eval(), tokenizer=llm_tokenizer
    )
    model.save_pretrained(root / "vlm", tokenizer=llm_tokenizer)
    return root / "vlm", shapes


@pytest.mark.slow
def test_an_installed_wheel_runs_eval_vqa_and_finds_the_demo_deepspeed_config(installed, tiny_vlm_and_shapes, tmp_path):
    vlm, shapes = tiny_vlm_and_shapes
    outside = tmp_path / "elsewhere"  # not the repository, not a parent of it
    outside.mkdir()

    run(
        [str(installed / "dove-vlm"), "eval-vqa", "--model", str(vlm), "--tasks", "dove_shapes_vqa",
         "--shapes-dir", str(shapes), "--budgets", "auto", "--query", "on", "--limit", "2", "--batch-size", "2",
         "--device", "cpu", "--output", str(outside / "eval")],
        cwd=outside,
    )  # fmt: skip
    rows = (outside / "eval" / "results.csv").read_text().splitlines()
    assert any(row.startswith("query-on_budget-auto,dove_shapes_vqa,") for row in rows), rows

    # The demo builds every step's command (the DeepSpeed config included) before running the first.
    run([str(installed / "dove-vlm"), "demo", "--fast", "--steps", "data", "--no-progress", "--out", "demo"], outside)
    assert (outside / "demo" / "data" / "test" / "vqa.parquet").is_file()
    script = (
        "from dove_vlm.demo import DEEPSPEED_CONFIG; from llava_adapter.train import deepspeed_config; "
        "print(deepspeed_config(DEEPSPEED_CONFIG, bf16=False)['zero_optimization']['stage'])"
    )
    read = run([str(installed / "python"), "-c", script], cwd=outside)
    assert read.stdout.strip().splitlines()[-1] == "2"
