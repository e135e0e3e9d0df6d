"""Bad input gets a clear error naming the argument or file; odd-but-valid images are converted, not refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dove_vlm import CheckpointMismatchError, DoveTokenizer, ImageLoadError, available_presets, preset_config
from dove_vlm.lmms_tasks import TASKS_DIR


def _write(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return path


def test_missing_path_names_the_file(tiny_tokenizer, tmp_path):
    with pytest.raises(ImageLoadError, match="nope.png"):
        tiny_tokenizer.encode([str(tmp_path / "nope.png")])


def test_a_text_file_is_not_an_image(tiny_tokenizer, tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture")
    with pytest.raises(ImageLoadError, match="notes.png"):
        tiny_tokenizer.encode([path])


def test_a_truncated_image_is_refused_with_its_name(tiny_tokenizer, tmp_path):
    full = _write(tmp_path, "full.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.png"):
        tiny_tokenizer.encode([cut])


@pytest.mark.parametrize(
    "mode_image",
    [
        Image.new("L", (80, 64), 128),
        Image.new("RGBA", (64, 64), (255, 0, 0, 128)),
        Image.new("RGB", (64, 64), (0, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE),
        Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)),
        Image.new("CMYK", (64, 96), (0, 255, 255, 0)),
        Image.new("1", (64, 64), 1),
    ],
    ids=["gray", "rgba", "palette", "16bit", "cmyk", "bilevel"],
)
def test_unusual_modes_are_converted(tiny_tokenizer, tmp_path, mode_image):
    suffix = ".tiff" if mode_image.mode == "CMYK" else ".png"
    path = _write(tmp_path, f"img{suffix}", mode_image)
    pixels = tiny_tokenizer.pixels([path])
    assert pixels.shape == (1, 3, 64, 64)
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0
    if mode_image.mode == "I;16" or mode_image.mode.startswith("I"):
        assert abs(pixels.mean().item() - 40000 / 65535) < 0.01  # rescaled, not clipped to white
    if mode_image.mode == "RGBA":
        # half-transparent red over white
        assert pixels[0, 0].mean() > 0.95 and 0.4 < pixels[0, 1].mean() < 0.6


def test_pil_images_and_paths_give_the_same_pixels(tiny_tokenizer):
    image = Image.open("tests/assets/scene.png")
    torch.testing.assert_close(tiny_tokenizer.pixels([image]), tiny_tokenizer.pixels(["tests/assets/scene.png"]))


@pytest.mark.parametrize(
    "tensor, message",
    [
        (torch.rand(2, 64, 64), r"shape \[B, 3, H, W\]"),
        (torch.rand(2, 4, 64, 64), r"shape \[B, 3, H, W\]"),
        (torch.randint(0, 255, (1, 3, 64, 64)), "floating-point"),
        (torch.rand(1, 3, 64, 64) * 255, r"\[0, 1\]"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
    ],
    ids=["3d-not-rgb", "4-channels", "integer", "0-255", "nan"],
)
def test_bad_tensors_are_refused(tiny_tokenizer, tensor, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_tokenizer.encode(tensor)


def test_tensors_of_another_size_are_resized(tiny_tokenizer):
    assert tiny_tokenizer.pixels(torch.rand(2, 3, 100, 80)).shape == (2, 3, 64, 64)


@pytest.mark.parametrize("budget", [0, -3, 33])
def test_budget_out_of_range(tiny_tokenizer, budget):
    with pytest.raises(ValueError, match=r"outside \[1, max_tokens=32\]"):
        tiny_tokenizer.encode(torch.rand(1, 3, 64, 64), budget=budget)


def test_budget_and_query_lists_must_match_the_batch(tiny_tokenizer):
    images = torch.rand(3, 3, 64, 64)
    with pytest.raises(ValueError, match="budget has 2 entries but the batch has 3"):
        tiny_tokenizer.encode(images, budget=[4, 8])
    with pytest.raises(ValueError, match="queries has 1 entries but the batch has 3"):
        tiny_tokenizer.encode(images, queries=["only one"])
    with pytest.raises(ValueError, match="outside"):
        tiny_tokenizer.reconstruct(images, budgets=[4, 40])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        DoveTokenizer.from_preset("dove-huge")
    for name in available_presets():
        assert name in str(info.value)


def test_checkpoint_of_another_preset_names_the_mismatched_keys(tmp_path):
    torch.manual_seed(0)
    tiny = DoveTokenizer.from_preset("dove-tiny")
    tiny.save_pretrained(tmp_path / "tiny")
    config = preset_config("dove-tiny")
    config.token_dim = 48  # same family, another width: a different preset's checkpoint
    other = DoveTokenizer(config)
    with pytest.raises(CheckpointMismatchError) as info:
        other.load_weights(tmp_path / "tiny")
    assert "generator.token_head.weight" in str(info.value)
    assert "decoder.token_in.weight" in str(info.value)
    with pytest.raises(CheckpointMismatchError, match=r"decoder.grid_queries \(64, 128\) vs \(256, 512\)"):
        DoveTokenizer.from_pretrained(tmp_path / "tiny", preset="dove-pythia14m-amused256")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        DoveTokenizer.from_pretrained(tmp_path / "does-not-exist")


def _png_bomb(path, side=14000):
    """A 1-bit PNG of side x side zero pixels: tens of KB on disk, far past PIL's pixel limit."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_with_its_name_everywhere(tiny_tokenizer, tmp_path, capsys):
    import importlib.util

    from dove_vlm.cli import main
    from tokenizer.modeling.image_processing import load_image

    bomb = _png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match="bomb.png.*decompression bomb"):
        tiny_tokenizer.encode([bomb])
    with pytest.raises(ImageLoadError, match="cell 7.*decompression bomb"):
        load_image(bomb.read_bytes(), "cell 7")
    assert main(["reconstruct", str(bomb), "--checkpoint", "dove-tiny", "--out", str(tmp_path / "grid.png")]) == 2
    assert "bomb.png" in capsys.readouterr().err
    # The evaluation task decodes embedded bytes through the same decoder.
    spec = importlib.util.spec_from_file_location("shapes_task_utils", TASKS_DIR / "dove_shapes_vqa" / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    with pytest.raises(ImageLoadError, match="question 3.*decompression bomb"):
        task_utils.doc_to_visual({"question_id": 3, "image": {"bytes": bomb.read_bytes(), "path": None}})


@pytest.mark.parametrize("shape", [(0, 3, 64, 64), (1, 3, 0, 64)])
def test_an_empty_tensor_is_refused_naming_the_argument(tiny_tokenizer, shape):
    with pytest.raises(ValueError, match=r"images is empty: shape \(" + ", ".join(map(str, shape))):
        tiny_tokenizer.encode(torch.rand(*shape))


def test_a_damaged_config_or_text_tokenizer_names_the_file_and_the_field(tiny_tokenizer, tmp_path, capsys):
    import json

    from dove_vlm.cli import main

    saved = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(saved)
    config = json.loads((saved / "config.json").read_text())

    (saved / "config.json").write_text(json.dumps([config]))
    with pytest.raises(TypeError, match=r"config\.json: must be a JSON object.*got a list"):
        DoveTokenizer.from_pretrained(saved)
    (saved / "config.json").write_text(json.dumps({**config, "max_tokens": "32"}))
    with pytest.raises(ValueError, match=r"config\.json: field 'max_tokens' must be an integer, got '32'"):
        DoveTokenizer.from_pretrained(saved)
    assert main(["info", str(saved)]) == 2
    assert "'max_tokens'" in capsys.readouterr().err

    (saved / "config.json").write_text(json.dumps(config))
    text_file = saved / "text_tokenizer" / "tokenizer.json"
    text_file.write_text(text_file.read_text()[:100])
    with pytest.raises(ValueError, match=r"text_tokenizer/tokenizer\.json is not valid JSON \(line"):
        DoveTokenizer.from_pretrained(saved)


def test_output_arguments_of_the_wrong_kind_are_named(tmp_path, capsys):
    from dove_vlm.cli import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:  # --out must be a file: a folder is refused up front
        main(["reconstruct", "tests/assets/scene.png", "--checkpoint", "dove-tiny", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"argument --out: {tmp_path} is a directory" in capsys.readouterr().err
    for command in (["train-tokenizer", "--recipe", "dove-tiny", "--data", str(tmp_path), "--output"],
                    ["make-shapes", "--n", "2", "--out"]):  # fmt: skip
        for target in (a_file, a_file / "sub"):
            with pytest.raises(SystemExit):
                main([*command, str(target)])
            err = capsys.readouterr().err
            assert f"argument {command[-1]}: {a_file} is a file" in err
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize(
    ("budget", "error", "message"),
    [
        ([None], TypeError, r"budget\[0\] must be an integer number of tokens, got None"),
        (["abc"], TypeError, r"budget\[0\] must be an integer number of tokens, got 'abc'"),
        ([float("nan")], TypeError, r"budget\[0\] must be an integer number of tokens, got nan"),
        ([4.5], TypeError, r"budget\[0\] must be an integer number of tokens, got 4.5"),
        (0, ValueError, r"budget=0 is outside \[1, max_tokens=32\]"),
        ("8", TypeError, r"budget must be an int, a list of ints or None; got str '8'"),
    ],
)
def test_a_bad_budget_is_named(tiny_tokenizer, budget, error, message):
    with pytest.raises(error, match=message):
        tiny_tokenizer.encode(torch.rand(1, 3, 64, 64), budget=budget)


def test_numpy_integers_are_budgets_and_decode_names_lengths(tiny_tokenizer):
    pixels = torch.rand(2, 3, 64, 64)
    assert tiny_tokenizer.encode(pixels, budget=np.int64(4)).lengths.tolist() == [4, 4]
    assert tiny_tokenizer.encode(pixels, budget=[np.int32(3), 5]).lengths.tolist() == [3, 5]
    assert tiny_tokenizer.encode(pixels, budget=np.array([2, 6])).lengths.tolist() == [2, 6]
    tokens = tiny_tokenizer.encode(pixels, budget=8).tokens
    with pytest.raises(ValueError, match=r"^lengths=0 is outside"):
        tiny_tokenizer.decode(tokens, lengths=0)
    with pytest.raises(ValueError, match=r"^lengths\[1\]=0 is outside"):
        tiny_tokenizer.decode(tokens, lengths=[3, 0])
