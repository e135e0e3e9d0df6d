"""`--perceptual-weights torchvision`: torchvision's own ImageNet VGG16 through torchvision's loader and cache."""

from __future__ import annotations

import pytest
import torch
from test_losses import random_vgg16_features

from tokenizer.training.config import TrainConfig
from tokenizer.training.perceptual import PerceptualLoss

TORCHVISION_FILE = "vgg16-397923af.pth"  # VGG16_Weights.IMAGENET1K_V1's file name in torchvision's cache


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty torch cache and a network that refuses every connection (a proxy on a closed port): what an
    offline training machine sees, and a guarantee that no test downloads the real 528 MB file."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "torch"


def test_torchvision_shorthand_offline_names_the_flag_and_the_way_out(no_network):
    with pytest.raises(FileNotFoundError) as err:
        PerceptualLoss("torchvision")
    message = str(err.value)
    assert "--perceptual-weights torchvision" in message
    assert f"--perceptual-weights /path/to/{TORCHVISION_FILE}" in message
    assert str(no_network / "hub" / "checkpoints") in message
    TrainConfig(perceptual_weight=0.1, perceptual_weights="torchvision")  # an accepted value


def test_torchvision_shorthand_reads_torchvisions_cached_weights(no_network):
    features = random_vgg16_features(seed=3)
    cached = no_network / "hub" / "checkpoints" / TORCHVISION_FILE
    cached.parent.mkdir(parents=True)
    torch.save({f"features.{k}": v for k, v in features.items()}, cached)  # torchvision's own key names
    loss = PerceptualLoss("torchvision")
    loaded = loss.backbone_state_dict()
    assert loaded.keys() == features.keys()
    for name, tensor in features.items():
        torch.testing.assert_close(loaded[name], tensor)
