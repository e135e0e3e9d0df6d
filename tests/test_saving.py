"""Saving into a folder that already holds things: only the model's own files change, a kill mid-save leaves the
previous model loadable, and a corrupt weights file is reported by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tokenizer_training_helpers import cli_env

from tokenizer import DoveConfig, DoveTokenizer
from tokenizer.hub import SAVE_MANIFEST, SAVE_PAUSE_ENV, atomic_directory, retired_path
from tokenizer.modeling.presets import preset_config


def tiny_tokenizer(seed: int, max_tokens: int = 32) -> DoveTokenizer:
    """dove-tiny, optionally with another `max_tokens` (other weight shapes, so a mixed folder cannot load)."""
    data = preset_config("dove-tiny").to_dict()
    data["max_tokens"] = max_tokens
    torch.manual_seed(seed)
    return DoveTokenizer(DoveConfig.from_dict(data)).eval()


def add_user_files(folder: Path) -> dict[Path, tuple[bytes, int]]:
    """Files a user keeps next to a model; returns their bytes and modification times."""
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (folder / "README.md").write_text("# my model\n")
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (folder / "notes.txt", folder / "sub" / "data.csv")}


def assert_untouched(files: dict[Path, tuple[bytes, int]]) -> None:
    for path, (content, mtime) in files.items():
        assert path.is_file(), f"{path} was deleted"
        assert (path.read_bytes(), path.stat().st_mtime_ns) == (content, mtime), f"{path} was rewritten"


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tokenizer_save_into_a_folder_keeps_what_else_is_there(tmp_path):
    folder = tmp_path / "model"
    tiny_tokenizer(0).save_pretrained(folder)
    user = add_user_files(folder)
    second = tiny_tokenizer(1, max_tokens=16)
    second.save_pretrained(folder)
    assert_untouched(user)
    assert (folder / "README.md").read_text() == "# my model\n"
    assert same_weights(DoveTokenizer.from_pretrained(folder), second)
    assert not retired_path(folder).exists() and not list(tmp_path.glob(".model.*"))


def test_a_later_save_removes_the_files_only_the_earlier_save_wrote(tmp_path):
    folder = tmp_path / "out"
    with atomic_directory(folder) as staging:
        (staging / "a.bin").write_text("1")
        (staging / "extra").mkdir()
        (staging / "extra" / "b.bin").write_text("1")
    (folder / "extra" / "mine.txt").write_text("keep")
    (folder / "c.bin").write_text("not written by a save")
    with atomic_directory(folder, owned=("gone.json",)) as staging:
        (staging / "a.bin").write_text("2")
    (folder / "gone.json").write_text("an owned name is removed even without a record")
    with atomic_directory(folder, owned=("gone.json",)) as staging:
        (staging / "a.bin").write_text("3")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        SAVE_MANIFEST,
        "a.bin",
        "c.bin",
        "extra/mine.txt",
    ]
    assert (folder / "a.bin").read_text() == "3"


def test_a_file_where_the_model_folder_should_be_is_named(tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(NotADirectoryError, match="model: it is a file"):
        tiny_tokenizer(0).save_pretrained(tmp_path / "model")


def _kill_while_saving(script: str, tmp_path: Path) -> None:
    """Run `script` (which saves a model) with the save paused after its first replaced file, then SIGKILL it."""
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=tmp_path,
        env=cli_env(**{SAVE_PAUSE_ENV: "120"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if f"{SAVE_PAUSE_ENV}: paused" in line:
                break
        assert process.poll() is None, "the save never paused:\n" + "".join(lines[-30:])
        os.kill(process.pid, signal.SIGKILL)  # a real kill, with the folder half replaced
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_kill_during_tokenizer_save_leaves_the_previous_model_and_the_users_files(tmp_path):
    folder = tmp_path / "model"
    first = tiny_tokenizer(0)
    first.save_pretrained(folder)
    user = add_user_files(folder)
    _kill_while_saving(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_saving import tiny_tokenizer
        tiny_tokenizer(1, max_tokens=16).save_pretrained({str(folder)!r})
        """,
        tmp_path,
    )
    assert retired_path(folder).is_dir()  # killed mid-replacement, not before or after
    assert same_weights(DoveTokenizer.from_pretrained(folder), first)
    assert_untouched(user)
    third = tiny_tokenizer(2, max_tokens=16)
    third.save_pretrained(folder)  # the next save puts the previous files back first, then replaces them
    assert same_weights(DoveTokenizer.from_pretrained(folder), third)
    assert not retired_path(folder).exists()
    assert_untouched(user)


VLM_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_saving import tiny_vlm
model, tokenizer = tiny_vlm({seed})
model.save_pretrained({folder!r}, tokenizer=tokenizer)
"""


def tiny_vlm(seed: int):
    from llava_adapter import DoveLlavaForCausalLM, DoveVisionTower
    from llava_adapter.tiny_llm import build_tiny_llm, train_tiny_tokenizer

    texts = ["What color is the circle? The circle is red.", "How many squares? Three squares."] * 10
    tokenizer = train_tiny_tokenizer(texts, vocab_size=300)
    torch.manual_seed(seed)
    llm = build_tiny_llm(tokenizer, "llama", hidden=32 * (1 + seed % 2), layers=1, heads=2)
    tower = DoveVisionTower(tiny_tokenizer(seed))
    model = DoveLlavaForCausalLM.from_components(llm, tower, tokenizer=tokenizer, projector_type="linear")
    return model.eval(), tokenizer


@pytest.mark.slow
def test_kill_during_vlm_save_leaves_the_previous_model_and_the_users_files(tmp_path):
    from llava_adapter import DoveLlavaForCausalLM

    folder = tmp_path / "vlm"
    first, tokenizer = tiny_vlm(0)
    first.save_pretrained(folder, tokenizer=tokenizer)
    user = add_user_files(folder)
    _kill_while_saving(VLM_SCRIPT.format(tests=str(Path(__file__).parent), seed=1, folder=str(folder)), tmp_path)
    assert retired_path(folder).is_dir()
    assert same_weights(DoveLlavaForCausalLM.from_pretrained(folder), first)
    assert_untouched(user)
    third, tokenizer = tiny_vlm(1)
    third.save_pretrained(folder, tokenizer=tokenizer)
    assert same_weights(DoveLlavaForCausalLM.from_pretrained(folder), third)
    assert not retired_path(folder).exists()
    assert_untouched(user)
    assert (folder / "README.md").read_text() == "# my model\n"


def test_saving_into_a_folder_that_holds_only_other_things(tmp_path):
    folder = tmp_path / "model"
    user = add_user_files(folder)
    first = tiny_tokenizer(0)
    first.save_pretrained(folder)
    assert_untouched(user)
    assert same_weights(DoveTokenizer.from_pretrained(folder), first)


# ------------------------------------------------------------------------------------------ damaged weights

DAMAGE = {
    "truncated": lambda data: data[: len(data) // 2],
    "random bytes": lambda data: os.urandom(len(data)),
    "empty": lambda data: b"",
}


def damage(path: Path, how: str) -> None:
    path.write_bytes(DAMAGE[how](path.read_bytes()))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_tokenizer_weights_file_is_named_by_the_api_and_the_commands(how, tmp_path, capsys):
    from dove_vlm.cli import main as cli_main
    from tokenizer.hub import CorruptWeightsError

    folder = tmp_path / "model"
    tiny_tokenizer(0).save_pretrained(folder)
    damage(folder / "model.safetensors", how)
    with pytest.raises(CorruptWeightsError, match="model.safetensors is damaged"):
        DoveTokenizer.from_pretrained(folder)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    commands = [
        ["info", str(folder)],
        ["reconstruct", str(image), "--checkpoint", str(folder), "--out", str(tmp_path / "r.png")],
        ["eval-recon", "--checkpoint", str(folder), "--data", str(tmp_path), "--out", str(tmp_path / "eval")],
    ]
    for argv in commands:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{folder / 'model.safetensors'} is damaged" in err and "save it again" in err, err


@pytest.mark.parametrize(
    "part", ["vision_tower/model.safetensors", "mm_projector.safetensors", "llm/model.safetensors"]
)
def test_a_damaged_vlm_weights_file_is_named(part, tmp_path, capsys):
    from dove_vlm.cli import main as cli_main
    from llava_adapter import DoveLlavaForCausalLM
    from tokenizer.hub import CorruptWeightsError

    folder = tmp_path / "vlm"
    model, tokenizer = tiny_vlm(0)
    model.save_pretrained(folder, tokenizer=tokenizer)
    damage(folder / part, "random bytes")
    with pytest.raises(CorruptWeightsError, match=f"{part} is damaged"):
        DoveLlavaForCausalLM.from_pretrained(folder)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(image)
    assert cli_main(["chat", "--model", str(folder), "--image", str(image), "--question", "What color?"]) == 2
    assert f"{folder / part} is damaged" in capsys.readouterr().err
