"""Projectors under LLaVA's names and loading `mm_projector.*` weight files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from llava_adapter.projectors import build_projector, load_projector_weights, projector_state_dict


@pytest.mark.parametrize(
    ("name", "linears"),
    [("linear", 1), ("mlp1x_gelu", 1), ("mlp2x_gelu", 2), ("mlp3x_gelu", 3)],
)
def test_named_projectors_map_tower_width_to_llm_width(name, linears):
    torch.manual_seed(0)
    projector = build_projector(name, 32, 48)
    assert projector(torch.randn(5, 32)).shape == (5, 48)
    assert sum(isinstance(m, nn.Linear) for m in projector.modules()) == linears
    gelus = sum(isinstance(m, nn.GELU) for m in projector.modules())
    assert gelus == linears - 1


def test_identity_passes_features_through_and_checks_widths():
    features = torch.randn(3, 16)
    assert torch.equal(build_projector("identity", 16, 16)(features), features)
    with pytest.raises(ValueError, match="identity"):
        build_projector("identity", 16, 32)


@pytest.mark.parametrize("name", ["mlp", "mlp2x_relu", "conv", "mlp0x_gelu"])
def test_unknown_projector_names_are_refused(name):
    with pytest.raises(ValueError, match=name):
        build_projector(name, 8, 8)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_projector("mlp2x_gelu", 32, 48)
    state = projector_state_dict(source)
    assert sorted(state) == [
        "mm_projector.0.bias",
        "mm_projector.0.weight",
        "mm_projector.2.bias",
        "mm_projector.2.weight",
    ]
    path = tmp_path / "mm_projector.safetensors"
    save_file(state, str(path))
    target = build_projector("mlp2x_gelu", 32, 48)
    features = torch.randn(4, 32)
    assert not torch.allclose(source(features), target(features))
    load_projector_weights(target, path)
    assert torch.equal(source(features), target(features))


def test_llava_style_bin_file_with_model_prefix_loads(tmp_path):
    torch.manual_seed(0)
    source = build_projector("linear", 8, 12)
    path = tmp_path / "mm_projector.bin"
    torch.save({f"model.mm_projector.{k}": v for k, v in source.state_dict().items()}, path)
    target = build_projector("linear", 8, 12)
    load_projector_weights(target, path)
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)


def test_mismatched_weights_are_refused_by_name(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file(projector_state_dict(build_projector("mlp2x_gelu", 8, 12)), str(path))
    with pytest.raises(ValueError, match="unexpected"):
        load_projector_weights(build_projector("linear", 8, 12), path)
    with pytest.raises(ValueError, match="misshapen"):
        load_projector_weights(build_projector("mlp2x_gelu", 8, 16), path)


def test_files_without_projector_keys_or_missing_files_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="mm_projector"):
        load_projector_weights(build_projector("linear", 2, 2), path)
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        load_projector_weights(build_projector("linear", 2, 2), tmp_path / "absent.safetensors")
