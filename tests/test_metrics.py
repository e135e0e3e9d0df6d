"""Reconstruction metrics, eval-recon and the linear probe."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from tokenizer_training_helpers import make_shapes_data, run_cli

from tokenizer.evaluation.metrics import RFID, psnr, ssim
from tokenizer.evaluation.probe import fit_linear_probe, token_features


def test_psnr_and_ssim_per_image():
    torch.manual_seed(0)
    target = torch.rand(3, 3, 32, 32) * 0.8 + 0.1
    noisy = target + 0.1 * torch.where(torch.rand_like(target) < 0.5, -1.0, 1.0)  # MSE exactly 0.01 -> 20 dB
    assert psnr(noisy, target) == pytest.approx(torch.full((3,), 20.0), abs=1e-3)
    assert ssim(target, target) == pytest.approx(torch.ones(3), abs=1e-5)
    worse = target + 0.3 * torch.randn_like(target)
    assert (ssim(worse, target) < ssim(noisy, target)).all()


def test_rfid_needs_inception_weights(tmp_path):
    with pytest.raises(ValueError, match="Inception weights"):
        RFID(None)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        RFID(tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        RFID(tmp_path / "bad.pth")


@pytest.mark.slow
def test_rfid_reads_the_inception_weights_from_the_file(tmp_path):
    """The features FID compares are those of the network in the file (FID itself needs thousands of images
    to be meaningful, more than a unit test can afford)."""
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from torchvision.models import inception_v3

    from tokenizer.evaluation.metrics import TorchvisionInceptionFeatures

    torch.manual_seed(0)
    network = inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    images = torch.rand(2, 3, 32, 32)
    features = TorchvisionInceptionFeatures(path)(images)
    network.fc = torch.nn.Identity()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    resized = F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        expected = network((resized - mean) / std)
    assert features.shape == (2, 2048) and torch.allclose(features, expected, atol=1e-5)
    rfid = RFID(path)
    assert rfid.backend == "torchvision inception_v3"
    rfid.update(images, images)
    assert int(rfid.metric.real_features_num_samples) == 2 and int(rfid.metric.fake_features_num_samples) == 2


def test_linear_probe_separates_separable_labels():
    torch.manual_seed(0)
    labels = [i % 3 for i in range(90)]
    centres = torch.randn(3, 5) * 4
    features = torch.stack([centres[y] + torch.randn(5) for y in labels])
    result = fit_linear_probe(features[:60], labels[:60], features[60:], labels[60:])
    assert result.test_accuracy > 0.9 and result.majority_accuracy < 0.5
    shuffled = fit_linear_probe(torch.randn(60, 5), labels[:60], torch.randn(30, 5), labels[60:])
    assert shuffled.test_accuracy < 0.8


def test_token_features_shapes(tiny_tokenizer):
    pixels = torch.rand(2, 3, 64, 64)
    assert token_features(tiny_tokenizer, pixels, "mean").shape == (2, tiny_tokenizer.token_dim)
    assert token_features(tiny_tokenizer, pixels, "budget", budget=4).shape == (2, 4 * tiny_tokenizer.token_dim)
    with pytest.raises(ValueError, match="budget"):
        token_features(tiny_tokenizer, pixels, "budget")


@pytest.mark.slow
def test_eval_recon_and_linear_probe_commands(tmp_path, tiny_tokenizer):
    from tokenizer import DoveTokenizer

    data = make_shapes_data(tmp_path / "shapes", n=12)
    checkpoint = tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "eval"
    run_cli("eval-recon", "--checkpoint", str(checkpoint), "--data", str(data / "images"), "--budgets", "2,8",
            "--out", str(out), "--batch-size", "5")  # fmt: skip
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["budget"] for r in rows] == ["2", "8", "auto"]
    assert float(rows[0]["tokens"]) == 2.0 and float(rows[1]["tokens"]) == 8.0
    assert (out / "quality_vs_tokens.png").stat().st_size > 0 and "| budget |" in (out / "metrics.md").read_text()
    # The table's PSNR is the mean per-image PSNR of the same reconstructions computed here.
    model = DoveTokenizer.from_pretrained(checkpoint).eval()
    images = sorted((data / "images").glob("*.png"))
    with torch.no_grad():
        result = model.reconstruct([str(p) for p in images], budgets=[8])
    expected = psnr(result.by_budget[8].clamp(0, 1), result.inputs).mean().item()
    assert float(rows[1]["psnr"]) == pytest.approx(expected, rel=1e-4)

    probe = run_cli("linear-probe", "--checkpoint", str(checkpoint), "--images", str(data / "images"),
                    "--labels", str(data / "scenes.json"), "--features", "budget", "--budget", "4")  # fmt: skip
    summary = json.loads(probe.stdout)
    assert summary["n_train"] + summary["n_test"] == 12
    # The figures are the probe's on the same tokens, split as scenes.json says, fitted here in-process.
    records = json.loads((data / "scenes.json").read_text())
    with torch.no_grad():
        x = token_features(model, model.pixels([str(data / "images" / f"{r['image_id']}.png") for r in records]),
                           "budget", budget=4)  # fmt: skip
    train = [i for i, r in enumerate(records) if r["split"] != "test"]
    test = [i for i, r in enumerate(records) if r["split"] == "test"]
    labels = [r["n_objects"] for r in records]
    expected = fit_linear_probe(x[train], [labels[i] for i in train], x[test], [labels[i] for i in test])
    assert (summary["n_train"], summary["n_test"]) == (len(train), len(test))
    assert summary["test_accuracy"] == pytest.approx(expected.test_accuracy)
    assert summary["train_accuracy"] == pytest.approx(expected.train_accuracy)
    assert summary["majority_baseline"] == pytest.approx(expected.majority_accuracy)
