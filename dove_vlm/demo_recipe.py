"""The demo's recipe: what each step is given (`DemoRecipe`), where it writes (`DemoPaths`) and the commands
in order (`build_steps`).

Every step is one ordinary `dove-vlm` command (stage 1 and 2 under the `deepspeed` launcher, ZeRO-2 on the
CPU), so a reader can copy any line of the report and re-run that step alone. Nothing here trains or
measures: `dove_vlm.demo` runs the commands, `dove_vlm.demo_measure` measures what they wrote and
`dove_vlm.report` renders it. How each choice of the recipe moved the numbers is in docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "demo.json"
REPORT_FILE = "report.md"
SHAPES_TASK = "dove_shapes_vqa"


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo's commands are given. `FULL` is the README's demo, `FAST` the CI one."""

    name: str
    # data (dove-vlm make-shapes)
    n_images: int
    questions_per_image: int
    max_objects: int
    question_types: tuple[str, ...] | None = None  # None: all of them
    seed: int = 0
    textured_fraction: float = 0.0
    test_fraction: float = 0.2
    object_scale: float = 1.0
    # tokenizer (dove-vlm train-tokenizer): the training YAML's `model:` and `train:` sections
    tokenizer_model: dict[str, Any] = field(default_factory=dict)
    tokenizer_train: dict[str, Any] = field(default_factory=dict)
    # the tiny LLM (dove-vlm make-tiny-llm)
    llm_hidden: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_vocab_size: int = 512
    # stage 1: projector only (dove-vlm finetune --stage 1)
    stage1_epochs: float = 1.0
    stage1_lr: float = 1e-3
    stage1_batch_size: int = 32
    # stage 2: full LLM + projector (dove-vlm finetune --stage 2)
    stage2_epochs: float = 2.0
    stage2_lr: float = 1e-3
    stage2_projector_lr: float | None = None
    stage2_batch_size: int = 32
    stage2_lora: bool = False
    stage2_train_lengths: str = "auto"  # finetune --train-lengths: "uniform" shows the LLM every prefix length
    tower_trainable: str = "none"
    # evaluation (dove-vlm eval-vqa)
    eval_budgets: tuple[int, ...] = (1, 2, 4)
    eval_batch_size: int = 64
    eval_limit: int | None = None
    # the report
    report_examples: int = 6
    report_budgets: tuple[int, ...] = (1, 2, 4, 8)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer_model.get("preset", "dove-tiny") + (
            " (resized)" if "overrides" in self.tokenizer_model else ""
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# dove-tiny shrunk to what 2 CPU cores train in minutes: 32 px images, an 8x8 grid of continuous latents,
# at most 8 tokens of 16 dimensions. The continuous (unquantised) latents and the long autoencoder
# warm-up are what let the objects survive: the background is learnt within a few hundred steps, the
# objects' colours and shapes only after ~1200 (at the default object size, ~5% of the pixels).
DEMO_TOKENIZER_MODEL: dict[str, Any] = {
    "preset": "dove-tiny",
    "overrides": {
        "image_size": 32,
        "max_tokens": 8,
        "token_dim": 16,
        "quantize_latents": False,
        "decoder_hidden_size": 64,
        "decoder_layers": 2,
        "decoder_heads": 2,
        "vq": {
            "down_block_types": ["DownEncoderBlock2D"] * 3,
            "up_block_types": ["UpDecoderBlock2D"] * 3,
            "block_out_channels": [8, 16, 16],
            "latent_channels": 8,
            "num_vq_embeddings": 32,
            "norm_num_groups": 8,
            "sample_size": 32,
        },
        "generator": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2},
    },
}

_TOKENIZER_COMMON: dict[str, Any] = {
    "batch_size": 16,
    "warmup_steps": 20,
    "min_lr_ratio": 0.3,
    "lr_vq": 3.0e-3,
    "lr_generator": 3.0e-3,
    "lr_decoder": 3.0e-3,
    "freeze_vq_encoder": True,
    "latent_weight": 1.0,
    "adversarial_weight": 0.0,
    # Q-DOVE: one weighted mean (outside the boxes at 0.1), each sample judged by it times the weighted area:
    # on shapes this gave a larger spread of lengths with object count and shorter single-object queries
    # than the paper's loss (docs/benchmarks.md, the method test with both).
    "region_loss": "weighted_mean",
    "region_lambda": 0.1,
    "length_weight_start": 0.01,
    # The EOS head shares the generator with the tokens: at weight 1 its loss outweighed reconstruction and
    # every token after the first carried nothing (latent error flat in the budget); at 0.1 they do.
    "length_weight_max": 0.1,
    # Train on uniformly drawn lengths only, so every prefix learns to decode from the start.
    "uniform_length_fraction": 1.0,
    # No clipping: with it the token path's error fell a little less in the same steps (measured).
    "max_grad_norm": 0.0,
    "num_workers": 0,
    "log_every": 10,
    "checkpoint_every": 500,
    "tracker": "none",
}

FULL = DemoRecipe(
    name="full",
    n_images=6000,
    questions_per_image=3,
    max_objects=2,
    question_types=("colour", "count"),
    object_scale=2.0,
    tokenizer_model=DEMO_TOKENIZER_MODEL,
    # The token path keeps improving long after the autoencoder has converged: 3200 token-path steps instead
    # of 1200 took the 1 -> 8 token PSNR gap from 0.9 to 2.6 dB (docs/benchmarks.md).
    tokenizer_train={**_TOKENIZER_COMMON, "max_steps": 4800, "vq_warmup_steps": 1600, "length_ramp_steps": 300,
                     "grid_every": 1600},
    stage1_epochs=0.5,
    # The count questions ("How many circles are there?") are learnt last and, at five epochs, on some seeds
    # hardly at all: eight took seed 2's from 65-67% to 76-81% and its margin from +30.2 to +38.8, and every
    # seed's margin past +35 (docs/benchmarks.md).
    stage2_epochs=8.0,
    # Trained on the EOS head's lengths alone, the LLM mostly sees one or two tokens and reads eight worse
    # than one; drawing every length lets a larger budget buy accuracy and lifted the check by 6 points.
    stage2_train_lengths="uniform",
    eval_budgets=(1, 2, 4, 8),
    eval_limit=600,
)  # fmt: skip

FAST = DemoRecipe(
    name="fast",
    n_images=300,
    questions_per_image=3,
    max_objects=2,
    question_types=("colour", "count"),
    object_scale=2.0,
    tokenizer_model=DEMO_TOKENIZER_MODEL,
    tokenizer_train={**_TOKENIZER_COMMON, "max_steps": 120, "vq_warmup_steps": 60, "length_ramp_steps": 30,
                     "grid_every": 0, "checkpoint_every": 0},
    stage2_epochs=1.0,
    stage2_train_lengths="uniform",
    eval_budgets=(1, 4, 8),
    report_budgets=(1, 4, 8),
)  # fmt: skip

RECIPES = {"full": FULL, "fast": FAST}


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class DemoPaths:
    """Where each step writes, under the demo's output directory."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def images(self) -> Path:
        return self.data / "images"

    @property
    def configs(self) -> Path:
        return self.root / "configs"

    @property
    def tokenizer_config(self) -> Path:
        return self.configs / "tokenizer.yaml"

    @property
    def tokenizer_run(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer(self) -> Path:
        return self.tokenizer_run / "final"

    @property
    def llm(self) -> Path:
        return self.root / "tiny-llm"

    @property
    def stage1(self) -> Path:
        return self.root / "vlm-stage1"

    @property
    def stage2(self) -> Path:
        return self.root / "vlm-stage2"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    def split_file(self, split: str, name: str) -> Path:
        return self.data / split / name


# ---------------------------------------------------------------------------------------------- steps


@dataclass
class DemoStep:
    """One step: the command a user would type (`display`), and how the demo runs it (`argv`).

    `before` runs in the demo process first (e.g. writing the training YAML the command reads). A step
    without `argv` runs `action` in the demo process instead (the report).
    """

    name: str
    title: str
    display: list[str]
    argv: list[str] | None = None
    before: Callable[[], None] | None = None
    action: Callable[[], Any] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command_line(self) -> str:
        return shlex.join(self.display)


STEP_NAMES = ("data", "tokenizer", "llm", "stage1", "stage2", "eval", "report")


DEEPSPEED_CONFIG = "zero2"  # a config shipped with the package, named as `finetune --deepspeed` accepts it


def deepspeed_config() -> Path:
    """The file behind `DEEPSPEED_CONFIG`, wherever dove-vlm is installed."""
    from llava_adapter.deepspeed_configs import resolve_deepspeed_config

    return resolve_deepspeed_config(DEEPSPEED_CONFIG)


def _fmt(value: float) -> str:
    return f"{value:g}"


def build_steps(recipe: DemoRecipe, paths: DemoPaths, progress: bool = True) -> list[DemoStep]:
    """The demo's commands, in order. `display` is what the report prints; `argv` swaps `dove-vlm` for this
    interpreter's `-m dove_vlm.cli` so the demo runs in whichever environment it was started from."""
    python_cli = [sys.executable, "-m", "dove_vlm.cli"]
    quiet = [] if progress else ["--no-progress"]

    def cli(*args: str, extra: Sequence[str] = ()) -> tuple[list[str], list[str]]:
        return ["dove-vlm", *args], [*python_cli, *args, *extra]

    steps: list[DemoStep] = []
    display, argv = cli(
        "make-shapes", "--out", str(paths.data), "--n", str(recipe.n_images), "--seed", str(recipe.seed),
        "--questions-per-image", str(recipe.questions_per_image), "--max-objects", str(recipe.max_objects),
        "--textured-fraction", _fmt(recipe.textured_fraction), "--test-fraction", _fmt(recipe.test_fraction),
        "--object-scale", _fmt(recipe.object_scale),
        *(["--question-types", ",".join(recipe.question_types)] if recipe.question_types else []),
        extra=quiet,
    )  # fmt: skip
    steps.append(DemoStep("data", "Generate shapes-VQA data", display, argv))

    display, argv = cli(
        "train-tokenizer", "--config", str(paths.tokenizer_config), "--data", str(paths.images),
        "--annotations", str(paths.split_file("train", "annotations.json")), "--output", str(paths.tokenizer_run),
        "--overwrite", extra=quiet,
    )  # fmt: skip
    steps.append(
        DemoStep(
            "tokenizer",
            f"Train the {recipe.tokenizer_name} Q-DOVE tokenizer",
            display,
            argv,
            before=lambda: write_tokenizer_config(recipe, paths.tokenizer_config),
        )
    )

    display, argv = cli(
        "make-tiny-llm", "--data", str(paths.split_file("train", "llava.json")), "--output", str(paths.llm),
        "--hidden", str(recipe.llm_hidden), "--layers", str(recipe.llm_layers), "--heads", str(recipe.llm_heads),
        "--vocab-size", str(recipe.llm_vocab_size), "--seed", str(recipe.seed),
    )  # fmt: skip
    steps.append(DemoStep("llm", "Build a tiny LLaMA-style LLM and train its tokenizer", display, argv))

    launcher = ["deepspeed", "--num_gpus", "1", "--master_port", "29500", "--no_local_rank", "--module",
                "dove_vlm.cli"]  # fmt: skip
    deepspeed_config()  # fail before any step runs if the install lacks it
    common = [
        "--data", str(paths.split_file("train", "llava.json")), "--image-folder", str(paths.images),
        "--deepspeed", DEEPSPEED_CONFIG, "--no-bf16", "--visual-length-cache", str(paths.cache),
        "--seed", str(recipe.seed), "--logging-steps", "10", "--cache-dataset",
    ]  # fmt: skip
    stage1 = [
        "finetune", "--stage", "1", "--llm", str(paths.llm), "--tower", str(paths.tokenizer),
        "--output", str(paths.stage1), "--overwrite", "--epochs", _fmt(recipe.stage1_epochs),
        "--lr", _fmt(recipe.stage1_lr), "--batch-size", str(recipe.stage1_batch_size), *common,
    ]  # fmt: skip
    steps.append(_deepspeed_step("stage1", "VLM stage 1: align the projector (DeepSpeed ZeRO-2)", launcher, stage1))

    stage2 = [
        "finetune", "--stage", "2", "--model", str(paths.stage1), "--output", str(paths.stage2), "--overwrite",
        "--epochs", _fmt(recipe.stage2_epochs), "--lr", _fmt(recipe.stage2_lr),
        "--batch-size", str(recipe.stage2_batch_size), "--lora" if recipe.stage2_lora else "--no-lora", *common,
    ]  # fmt: skip
    if recipe.stage2_projector_lr is not None:
        stage2 += ["--projector-lr", _fmt(recipe.stage2_projector_lr)]
    if recipe.stage2_train_lengths != "auto":
        stage2 += ["--train-lengths", recipe.stage2_train_lengths]
    title = "VLM stage 2: " + ("LoRA" if recipe.stage2_lora else "the full LLM") + " + projector (DeepSpeed ZeRO-2)"
    steps.append(_deepspeed_step("stage2", title, launcher, stage2))

    budgets = ",".join(["auto", *(str(b) for b in recipe.eval_budgets)])
    eval_args = [
        "eval-vqa", "--model", str(paths.stage2), "--tasks", SHAPES_TASK, "--budgets", budgets, "--query", "both",
        "--shapes-dir", str(paths.data), "--output", str(paths.eval), "--batch-size", str(recipe.eval_batch_size),
    ]  # fmt: skip
    if recipe.eval_limit:
        eval_args += ["--limit", str(recipe.eval_limit)]
    display, argv = cli(*eval_args)
    steps.append(DemoStep("eval", "Score with lmms-eval: query on/off, automatic and fixed budgets", display, argv))

    display = ["dove-vlm", "demo", "--out", str(paths.root), "--steps", "report"]
    if recipe.name == "fast":
        display.insert(2, "--fast")
    steps.append(DemoStep("report", "Write report.md and its figures", display, action=lambda: None))
    return steps


def _deepspeed_step(name: str, title: str, launcher: list[str], args: list[str]) -> DemoStep:
    display = [*launcher, *args]
    # the demo picks a free port: a fixed one could be taken by another run on the same machine
    argv = [str(Path(sys.executable).parent / "deepspeed"), *launcher[1:], *args]
    argv[argv.index("--master_port") + 1] = "{port}"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    return DemoStep(name, title, display, argv, env=env)


def write_tokenizer_config(recipe: DemoRecipe, path: Path) -> Path:
    """The training YAML `dove-vlm train-tokenizer --config` reads: the preset and the recipe's `train:` section."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "description": f"dove-vlm demo ({recipe.name}): {recipe.tokenizer_name} trained from scratch on shapes-VQA",
        "model": recipe.tokenizer_model,
        "train": {"seed": recipe.seed, **recipe.tokenizer_train},
    }
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path
