"""The `dove-vlm` command line, run in-process through its real argument parser."""

from __future__ import annotations

from PIL import Image

from dove_vlm.cli import main


def test_reconstruct_writes_a_labelled_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["reconstruct", "tests/assets/scene.png", "tests/assets/scene.png", "--checkpoint", "dove-tiny",
                 "--budgets", "4,8,32", "--query", "what colour is the circle?", "--out", str(out)])
    assert code == 0
    grid = Image.open(out)
    # two rows (images) of five cells (input, three budgets, automatic), 128 px + an 18 px caption each
    assert grid.size == (5 * 128, 2 * (128 + 18))
    assert "automatic lengths" in capsys.readouterr().out


def test_reconstruct_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    assert main(["reconstruct", str(tmp_path / "missing.png"), "--checkpoint", "dove-tiny", "--out", str(tmp_path / "x.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["reconstruct", "tests/assets/scene.png", "--checkpoint", "dove-tiny", "--budgets", "64",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["info", "dove-unknown"]) == 2
    assert "known presets" in capsys.readouterr().err


def test_info_prints_config_and_parameter_counts(capsys):
    assert main(["info", "dove-tiny"]) == 0
    out = capsys.readouterr().out
    assert "latent grid: 8x8x16; max tokens 32" in out
    assert "total:" in out
