"""A saved tiny VLM on procedural shapes data, for tests that load a model the way a user's checkpoint loads.

The tower is a random dove-tiny whose EOS head is calibrated to read its inputs (so lengths vary with the
image and the query), the LLM a tiny LLaMA with a tokenizer trained on the shapes questions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from dove_vlm.shapes import make_shapes
from llava_adapter import DoveLlavaForCausalLM
from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer
from tokenizer import DoveTokenizer
from tokenizer.evaluation.stand_ins import calibrate_eos_head

SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."


def make_shapes_dir(out: Path, n: int = 30) -> Path:
    make_shapes(out, n=n, seed=0, progress=False)
    return out


def save_tiny_vlm(shapes_dir: Path, out: Path) -> Path:
    train = json.loads((shapes_dir / "train" / "annotations.json").read_text())
    test_records = json.loads((shapes_dir / "test" / "annotations.json").read_text())
    llm_tokenizer = train_tiny_tokenizer([f"{r['question']} {r['answer']}" for r in train], vocab_size=320)
    torch.manual_seed(0)
    tower = DoveTokenizer.from_preset("dove-tiny").eval()
    images = tower.pixels([Image.open(shapes_dir / "images" / f"{r['image_id']}.png") for r in test_records])
    # Calibrated on the bare questions and on the full task prompts, so lengths vary whichever of the two
    # the tower is given as its query.
    questions = [r["question"] for r in test_records]
    prompts = [q + SHORT_ANSWER_SUFFIX for q in questions]
    calibrate_eos_head(tower, torch.cat([images] * 3), [None] * len(questions) + questions + prompts)
    llm = build_tiny_llm(llm_tokenizer, "llama")
    model = DoveLlavaForCausalLM.from_components(llm, tower, tokenizer=llm_tokenizer)
    model.save_pretrained(out, tokenizer=llm_tokenizer)
    return out
