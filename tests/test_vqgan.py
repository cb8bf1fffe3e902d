"""The VQGAN family: the same numbers as taming-transformers' own modules on the same weights, and a vqtok model
like the VQ-VAE (config, model directory, load_tokenizer)."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TAMING_EMBED_DIM, TAMING_N_EMBED, image_samples, taming_reference, taming_vqgan

from vqtok import VQGAN, VQVAE, QuantizerConfig, VQGANConfig, load_tokenizer
from vqtok.cli import cli
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
    image_size=32,
    quantizer=QuantizerConfig(
        codebook_size=TAMING_N_EMBED, code_dim=TAMING_EMBED_DIM, decay=None, kmeans_init=False, dead_code_window=0
    ),
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
    quantizer = QuantizerConfig(codebook_size=16)
    config = VQGANConfig(base_channels=32, channel_mult=(1, 1), attn_levels=(1,), z_channels=32, quantizer=quantizer)
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
    assert config.channel_mult == (1, 2, 2) and config.attn_levels == () and config.quantizer.decay is None
    assert config.stride == 4
    assert VQGANConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_small_recipe_builds_a_vqgan():
    from vqtok.config import tokenizer_family

    path = Path(__file__).resolve().parent.parent / "pipelines" / "vqgan-cpu-small.toml"
    assert tokenizer_family(path) == "vqgan"
    config, train = load_config(path, model_class=VQGANConfig)
    model = build_tokenizer(config)
    assert isinstance(model, VQGAN) and model.grid_size(config.image_size) == (8, 8) and train.steps == 2000


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(base_channels=48), "multiple of 32"),
        (dict(channel_mult=()), "non-empty"),
        (dict(attn_levels=(3,)), r"level numbers in \[0, 3\)"),
        (dict(image_size=30), "multiple of the model's stride 4"),
        (dict(quantizer={"codebook_size": 16}), "quantizer must be a QuantizerConfig, got dict"),
    ],
)
def test_config_refuses_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        VQGANConfig(**settings)


TINY_RECIPE = """
[model]
family = "vqgan"
base_channels = 32
channel_mult = [1, 2]
num_res_blocks = 1
attn_levels = [1]
z_channels = 32
"""
TINY_RUN = ["--codebook-size", "16", "--code-dim", "8", "--image-size", "16", "--batch-size", "4", "--num-workers", "0"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fit_trains_a_vqgan_that_every_command_takes(make_shard, tmp_path):
    train = make_shard("train.tar", image_samples([f"t{j}" for j in range(8)]))
    val = make_shard("val.tar", image_samples([f"v{j}" for j in range(6)], seed=50))
    recipe = tmp_path / "vqgan.toml"
    recipe.write_text(TINY_RECIPE)
    out = tmp_path / "run"
    fitted = run("fit", train, "--out", out, "--config", recipe, "--val", val, *TINY_RUN, "--steps", 3, "--decay", 0.9)
    assert fitted.exit_code == 0, fitted.output
    assert "held-out PSNR" in fitted.output

    model = load_tokenizer(out / "model")
    assert isinstance(model, VQGAN)
    assert model.config.channel_mult == (1, 2) and model.codebook_size == 16 and model.config.quantizer.decay == 0.9
    assert json.loads((out / "model" / "config.json").read_text())["family"] == "vqgan"
    with pytest.raises(ModelFormatError, match="holds a vqgan tokenizer, not a vqvae"):
        VQVAE.from_pretrained(out / "model")

    encoded = run("encode", val, tmp_path / "tokens.parquet", "--model", out / "model", "--num-workers", "0")
    assert encoded.exit_code == 0, encoded.output
    decoded = run("decode", tmp_path / "tokens.parquet", tmp_path / "decoded", "--model", out / "model")
    assert decoded.exit_code == 0, decoded.output
    assert sorted(p.stem for p in Path(tmp_path / "decoded").rglob("*.png")) == [f"v{j}" for j in range(6)]
    evaluated = run("eval", out / "model", val, "--num-workers", "0", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["images"] == 6
    info = json.loads(run("info", out / "model", "--json").output)
    assert info["family"] == "vqgan" and info["source"] is None and info["grid"] == [8, 8]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fit_family_option_picks_the_network(make_shard, tmp_path):
    train = make_shard("train.tar", image_samples([f"t{j}" for j in range(4)]))
    result = run("fit", train, "--out", tmp_path / "run", "--family", "vqgan", *TINY_RUN, "--steps", "1")
    assert result.exit_code == 0, result.output
    config = load_tokenizer(tmp_path / "run" / "model").config
    assert config == VQGANConfig(image_size=16, quantizer=QuantizerConfig(codebook_size=16, code_dim=8))


@pytest.mark.parametrize(
    "args, recipe, message",
    [
        (["--family", "vqgan", "--hidden", "16", "--res-blocks", "1"], None, "--hidden, --res-blocks: VQ-VAE options"),
        (["--hidden", "16"], TINY_RECIPE, "--hidden: VQ-VAE options"),
        (["--family", "vqvae"], TINY_RECIPE, "--family vqvae, but"),
        ([], "[model]\nfamily = 'vqgan'\nhidden_channels = 8\n", "unknown setting(s) hidden_channels"),
        ([], "[model]\nfamily = 'pixelcnn'\n", "unknown family 'pixelcnn'"),
    ],
)
def test_fit_refuses_options_of_another_family(make_shard, tmp_path, args, recipe, message):
    train = make_shard("train.tar", image_samples(["a"]))
    if recipe is not None:
        (tmp_path / "recipe.toml").write_text(recipe)
        args = [*args, "--config", tmp_path / "recipe.toml"]
    result = run("fit", train, "--out", tmp_path / "run", *args)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert message in lines[-1] and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()
