"""A small offline workspace for the data, sampler and fine-tuning tests: shapes-VQA data, a tiny LLaMA-style
LLM with a tokenizer trained on the data's own text (saved as a hub-style directory), and a dove-tiny
tower whose EOS head reads its inputs (so visual lengths differ across images and questions)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from dove_vlm.shapes import make_shapes
from llava_adapter.conversation import tower_query
from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer
from tokenizer import DoveTokenizer
from tokenizer.evaluation.stand_ins import calibrate_eos_head


@dataclass
class Workspace:
    root: Path
    train_json: Path
    images: Path
    llm_dir: Path
    tower_dir: Path

    def records(self) -> list[dict]:
        return json.loads(self.train_json.read_text())


def build_workspace(root: Path, n_images: int = 16, seed: int = 0, arch: str = "llama") -> Workspace:
    summary = make_shapes(root / "shapes", n=n_images, seed=seed, test_fraction=0.0, progress=False)
    records = json.loads(summary.llava["train"].read_text())
    texts = [turn["value"] for record in records for turn in record["conversations"]]
    tokenizer = train_tiny_tokenizer(texts, vocab_size=384)
    torch.manual_seed(seed)
    llm = build_tiny_llm(tokenizer, arch, init_std=0.2)
    llm_dir = root / "llm"
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)

    torch.manual_seed(seed)
    tower = DoveTokenizer.from_preset("dove-tiny").eval()
    sample = records[: min(len(records), 24)]
    pixels = torch.cat(
        [tower.image_processor.preprocess(str(summary.images_dir / r["image"]))["pixel_values"] for r in sample]
    )
    # The tower's queries as the dataset builds them (answer-format instructions stripped), with and without.
    questions = [tower_query(r["conversations"][0]["value"].replace("<image>", "").strip()) for r in sample]
    calibrate_eos_head(tower, torch.cat([pixels, pixels]), [None] * len(questions) + questions, seed=seed)
    tower_dir = root / "tower"
    tower.save_pretrained(tower_dir)
    return Workspace(root, summary.llava["train"], summary.images_dir, llm_dir, tower_dir)


class OutputDtypes(TrainerCallback):
    """Forward hooks, put on the model the Trainer trains when training begins, that record the dtype each watched
    module outputs and whether CPU autocast was on around it, and count its forward calls (gradient checkpointing
    runs a checkpointed layer's forward again in the backward pass, so it shows as twice the projector's count)."""

    def __init__(self) -> None:
        self.watched = {"llm": ".layers.0.self_attn.q_proj", "generator": "vision_tower.tokenizer.generator",
                        "vq": "vision_tower.tokenizer.vq.model.encoder", "projector": "mm_projector"}  # fmt: skip
        self.seen: dict[str, set[tuple[str, bool]]] = {}
        self.calls: dict[str, int] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        for part, suffix in self.watched.items():
            modules = [m for name, m in model.named_modules() if name.endswith(suffix)]
            assert len(modules) == 1, (part, suffix)
            modules[0].register_forward_hook(self._record(part))

    def _record(self, part: str):
        def hook(module, inputs, output) -> None:
            tensor = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
            self.seen.setdefault(part, set()).add((str(tensor.dtype), torch.is_autocast_enabled("cpu")))
            self.calls[part] = self.calls.get(part, 0) + 1

        return hook
