"""Building from pretrained components (the paper's initialisation) and the full-size presets."""

from __future__ import annotations

import pytest
import torch
from diffusers import VQModel
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from dove_vlm import DoveTokenizer, preset_config
from tokenizer.modeling.text import byte_level_text_tokenizer


@pytest.fixture
def saved_components(tmp_path):
    """A tiny VQModel saved as a hub pipeline lays it out (`vqvae/` subfolder) and a tiny Pythia-style LM."""
    torch.manual_seed(0)
    tiny = preset_config("dove-tiny")
    vq = VQModel(**tiny.vq)
    vq.save_pretrained(tmp_path / "amused-like" / "vqvae")
    lm = GPTNeoXForCausalLM(GPTNeoXConfig(**tiny.generator))
    lm.save_pretrained(tmp_path / "pythia-like")
    byte_level_text_tokenizer().save_pretrained(tmp_path / "pythia-like")
    return tmp_path / "amused-like", tmp_path / "pythia-like", vq, lm


@torch.no_grad()
def test_from_components_loads_the_pretrained_weights(saved_components, tmp_path):
    vq_dir, lm_dir, vq, lm = saved_components
    model = DoveTokenizer.from_components(vq=vq_dir, generator=lm_dir, preset="dove-tiny").eval()
    torch.testing.assert_close(model.vq.model.encoder.conv_in.weight, vq.encoder.conv_in.weight)
    torch.testing.assert_close(
        model.generator.backbone.get_input_embeddings().weight, lm.gpt_neox.get_input_embeddings().weight
    )
    assert model.config.vq["num_vq_embeddings"] == 256
    enc = model.encode(torch.rand(2, 3, 64, 64), queries=["what colour is the circle?", None])
    assert enc.tokens.shape == (2, 32, model.token_dim)
    # The result is an ordinary checkpoint: it reloads offline from its own files.
    model.save_pretrained(tmp_path / "dove")
    again = DoveTokenizer.from_pretrained(tmp_path / "dove").eval()
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(model.encode(images).tokens, again.encode(images).tokens)


def test_from_components_accepts_modules_and_a_root_level_vq(saved_components):
    vq_dir, lm_dir, vq, lm = saved_components
    from_root = DoveTokenizer.from_components(vq=vq_dir / "vqvae", generator=lm_dir, preset="dove-tiny")
    from_modules = DoveTokenizer.from_components(vq=vq, generator=lm.gpt_neox, preset="dove-tiny")
    torch.testing.assert_close(from_root.vq.model.decoder.conv_out.weight, from_modules.vq.model.decoder.conv_out.weight)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-model"):
        DoveTokenizer.from_components(vq="no-such-org/no-such-model", generator="EleutherAI/pythia-70m")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dove-pythia14m-amused256", "dove-pythia70m-amused256"])
@torch.no_grad()
def test_full_size_presets_run_one_forward_at_256px(preset):
    torch.manual_seed(0)
    model = DoveTokenizer.from_preset(preset).eval()
    assert model.config.grid_size == 16 and model.config.latent_channels == 64 and model.max_tokens == 256
    enc = model.encode(torch.rand(1, 3, 256, 256), queries=["what colour is the cup?"])
    assert enc.tokens.shape == (1, 256, model.token_dim)
    # The automatic length is where the EOS head first says stop (from min_tokens on), else all 256.
    probs = enc.eos_probs[0].tolist()
    stops = [i + 1 for i, p in enumerate(probs) if p > model.config.eos_threshold and i + 1 >= model.config.min_tokens]
    assert enc.lengths.item() == (stops[0] if stops else 256)
    assert not enc.tokens[0, enc.lengths.item() :].any()  # positions past the length are masked out
    images = model.decode(enc.tokens[:, :16], [16])
    assert images.shape == (1, 3, 256, 256)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("preset", ["dove-pythia14m-amused256", "dove-pythia70m-amused256"])
def test_full_presets_emit_tokens_of_the_generator_width(preset):
    config = preset_config(preset)
    assert config.token_dim == config.generator["hidden_size"]  # 512 for Pythia-70M, as the official probe reads
