"""The VQGAN family: the same numbers as taming-transformers' own modules on the same weights, and a vqtok model
like the VQ-VAE (config, model directory, load_tokenizer)."""

import json

import pytest
import torch
from conftest import TAMING_EMBED_DIM, TAMING_N_EMBED, taming_reference, taming_vqgan

from vqtok import VQGAN, VQVAE, VQGANConfig, load_tokenizer
from vqtok.config import load_config
from vqtok.errors import ConfigError, ModelFormatError
from vqtok.tokenizers import build_tokenizer

# conftest's taming network in vqtok's terms, its codebook learned as taming's (no EMA, no k-means, no restarts)
CONFIG = VQGANConfig(
    base_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=2,
    attn_levels=(1,),
    z_channels=16,
    codebook_size=TAMING_N_EMBED,
    code_dim=TAMING_EMBED_DIM,
    decay=None,
    kmeans_init=False,
    dead_code_window=0,
    image_size=32,
)


def renamed(taming_state: dict) -> dict:
    """taming's keys -> vqtok's: the prefixes are the same but for the codebook."""
    return {
        ("quantizer.codebook" if name == "quantize.embedding.weight" else name): tensor
        for name, tensor in taming_state.items()
    }


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pair(images):
    taming = taming_vqgan(images)
    ours = VQGAN(CONFIG).eval()
    missing, unexpected = ours.load_state_dict(renamed(taming.state_dict()), strict=False)
    assert unexpected == []
    # only the quantizer's training statistics, which taming does not keep
    assert sorted(missing) == sorted(
        f"quantizer.{name}" for name in ("initialized", "step", "last_used", "fresh_since", "usage_count")
    )
    return taming, ours


def test_parameter_names_are_tamings(pair):
    taming, ours = pair
    theirs = set(renamed(taming.state_dict()))
    assert theirs <= set(ours.state_dict())


def test_codes_and_images_match_taming(pair, images):
    taming, ours = pair
    expected, reference = taming_reference(taming, images)
    codes = ours.encode(images)
    assert codes.shape == (4, 16, 16)
    assert torch.equal(codes, expected)
    assert len(codes.unique()) > TAMING_N_EMBED // 4  # the comparison covers many codes, not one
    with torch.no_grad():
        raw = ours.decode_latent(ours.quantizer.lookup(codes))
    assert torch.allclose(raw, reference, atol=1e-4, rtol=0)
    assert torch.allclose(ours.decode(codes), ((reference + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)


def test_a_vqgan_is_a_vqtok_model(tmp_path, images):
    torch.manual_seed(0)
    model = build_tokenizer(CONFIG).eval()
    assert isinstance(model, VQGAN) and model.stride == 2 and model.grid_size(64) == (32, 32)
    model.save_pretrained(tmp_path / "model")
    header = json.loads((tmp_path / "model" / "config.json").read_text())
    assert header["family"] == "vqgan"
    assert header["config"]["channel_mult"] == [1, 2] and header["config"]["attn_levels"] == [1]
    loaded = load_tokenizer(tmp_path / "model")
    assert isinstance(loaded, VQGAN) and loaded.config == CONFIG and loaded.model_id == model.model_id
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert VQGAN.from_pretrained(tmp_path / "model").model_id == model.model_id
    with pytest.raises(ModelFormatError, match="holds a vqgan tokenizer, not a vqvae: load it with vqtok.load_tok"):
        VQVAE.from_pretrained(tmp_path / "model")


def test_training_forward_learns():
    torch.manual_seed(0)
    config = VQGANConfig(base_channels=32, channel_mult=(1, 1), attn_levels=(1,), z_channels=32, codebook_size=16)
    model = VQGAN(config)
    images = torch.rand(4, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        out = model(images)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert out.recon.shape == images.shape and out.codes.shape == (4, 8, 8)
    assert losses[-1] < losses[0]


def test_config_from_toml_and_json(tmp_path):
    path = tmp_path / "vqgan.toml"
    path.write_text("[model]\nbase_channels = 32\nchannel_mult = [1, 2, 2]\nattn_levels = []\ndecay = false\n")
    config, _ = load_config(path, model_class=VQGANConfig)
    assert config.channel_mult == (1, 2, 2) and config.attn_levels == () and config.decay is None
    assert config.stride == 4
    assert VQGANConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(base_channels=48), "multiple of 32"),
        (dict(channel_mult=()), "non-empty"),
        (dict(attn_levels=(3,)), r"level numbers in \[0, 3\)"),
        (dict(image_size=30), "multiple of the model's stride 4"),
        (dict(codebook_size=1), "at least 2"),
    ],
)
def test_config_refuses_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        VQGANConfig(**settings)
