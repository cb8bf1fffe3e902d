"""`vqtok import`: another toolkit's checkpoint -> a vqtok model directory with the same codes and images, its
provenance recorded, and one-line refusals."""

import argparse
import hashlib
import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import (
    TAMING_DDCONFIG,
    TAMING_EMBED_DIM,
    TAMING_N_EMBED,
    taming_discriminator,
    taming_reference,
    taming_vqgan,
)

from vqtok import VQGAN, load_tokenizer
from vqtok.cli import cli
from vqtok.pretrained import weights_hash
from vqtok.tokenizers.discriminator_file import read_discriminator
from vqtok.tokenizers.losses import NLayerDiscriminator


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def taming(images):
    return taming_vqgan(images)


def write_taming_run(
    folder, taming, extra: dict | None = None, state_changes: dict | None = None, discriminator=None, **params
):
    """A taming-transformers training run's files: checkpoints/last.ckpt as Lightning saves it (the weights under
    "state_dict" beside the losses' own: LPIPS', and the discriminator's where one is given; and other entries)
    and configs/model.yaml."""
    state = {**taming.state_dict(), "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3)}
    if discriminator is not None:
        state |= {f"loss.discriminator.{name}": tensor for name, tensor in discriminator.state_dict().items()}
    for name, tensor in (state_changes or {}).items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    (folder / "checkpoints").mkdir(parents=True)
    ckpt = folder / "checkpoints" / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": state, **(extra or {})}, ckpt)
    model = {
        "base_learning_rate": 4.5e-6,
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": TAMING_EMBED_DIM,
            "n_embed": TAMING_N_EMBED,
            "ddconfig": TAMING_DDCONFIG,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"},
            **params,
        },
    }
    (folder / "configs").mkdir()
    config = folder / "configs" / "model.yaml"
    config.write_text(yaml.safe_dump({"model": model}))
    return str(ckpt), str(config)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_refused(result, *phrases):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def test_taming_checkpoint_imports_with_the_same_codes_and_images(tmp_path, taming, images):
    ckpt, config = write_taming_run(tmp_path / "run", taming)
    out = tmp_path / "model"
    result = run("import", "taming", ckpt, out, "--config", config)
    assert result.exit_code == 0, result.output
    assert "vqgan tokenizer, K = 64, 16x16 codes at 32x32" in result.output

    model = load_tokenizer(out)
    assert isinstance(model, VQGAN)
    assert (
        model.config.channel_mult == (1, 2)
        and model.config.attn_levels == (1,)
        and model.config.quantizer.decay is None
    )
    expected_codes, reference = taming_reference(taming, images)
    codes = model.encode(images)
    assert torch.equal(codes, expected_codes)
    assert len(codes.unique()) > TAMING_N_EMBED // 4
    assert torch.allclose(model.decode(codes), ((reference + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)
    with torch.no_grad():
        assert torch.allclose(model.decode_latent(model.quantizer.lookup(codes)), reference, atol=1e-4, rtol=0)

    header = json.loads((out / "config.json").read_text())
    digest = hashlib.sha256((tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
    assert header["family"] == "vqgan"
    assert header["source"] == {"format": "taming", "file": "last.ckpt", "sha256": digest}
    assert header["model_id"] == model.model_id == weights_hash(model.state_dict())

    table = CliRunner(env={"COLUMNS": None}).invoke(cli, ["info", str(out)])  # as in a pipe: no terminal's width
    assert table.exit_code == 0, table.output
    assert "vqgan" in table.output and "last.ckpt (taming)" in table.output
    assert any("source sha256" in line and digest in line for line in table.output.splitlines()), table.output
    summary = json.loads(run("info", out, "--json").output)
    assert summary["family"] == "vqgan" and summary["source"] == header["source"]


def test_a_pickle_only_checkpoint_needs_trust(tmp_path, taming, images):
    ckpt, config = write_taming_run(tmp_path / "run", taming, extra={"hparams": argparse.Namespace(lr=4.5e-6)})
    refused = run("import", "taming", ckpt, tmp_path / "model", "--config", config)
    assert_refused(refused, "last.ckpt", "argparse.Namespace", "--trust-pickle")
    assert not (tmp_path / "model").exists()

    trusted = run("import", "taming", ckpt, tmp_path / "model", "--config", config, "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output
    assert torch.equal(load_tokenizer(tmp_path / "model").encode(images), taming_reference(taming, images)[0])


@pytest.mark.parametrize(
    "changes, phrase",
    [
        ({"decoder.conv_out.bias": None}, "missing key decoder.conv_out.bias"),
        ({"encoder.extra.weight": torch.zeros(1)}, "unexpected key encoder.extra.weight"),
        (
            {"quant_conv.weight": torch.zeros(4, 16, 1, 1)},
            "key quant_conv.weight has shape (4, 16, 1, 1), the config gives (8, 16, 1, 1)",
        ),
    ],
)
def test_a_state_dict_that_does_not_match_its_config_is_refused(tmp_path, taming, changes, phrase):
    ckpt, config = write_taming_run(tmp_path / "run", taming, state_changes=changes)
    assert_refused(run("import", "taming", ckpt, tmp_path / "model", "--config", config), "does not match", phrase)
    assert not (tmp_path / "model").exists()


def test_other_refusals_are_one_line(tmp_path, taming):
    ckpt, config = write_taming_run(tmp_path / "run", taming)
    assert_refused(run("import", "nope", ckpt, tmp_path / "model"), "unknown format 'nope'", "taming")
    assert_refused(run("import", "taming", ckpt, tmp_path / "model"), "--config")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    assert_refused(run("import", "taming", garbage, tmp_path / "model", "--config", config), "garbage.ckpt")
    noise = tmp_path / "noise.ckpt"  # bytes that fail inside the unpickler rather than as a zip
    noise.write_bytes(b"this is not a checkpoint at all" * 10)
    assert_refused(run("import", "taming", noise, tmp_path / "model", "--config", config), "noise.ckpt")
    assert_refused(run("import", "taming", ckpt, tmp_path / "model", "--config", ckpt), "not a YAML file")
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump({"model": {"params": {"ddconfig": {"ch": 32}, "n_embed": 8, "embed_dim": 4}}}))
    assert_refused(run("import", "taming", ckpt, tmp_path / "model", "--config", bare), "ddconfig must hold")
    assert not (tmp_path / "model").exists()


def test_import_from_a_bucket_into_a_bucket(bucket, tmp_path, taming, images):
    ckpt, config = write_taming_run(tmp_path / "run", taming)
    bucket.fs.put_file(ckpt, f"{bucket.name}/run/last.ckpt")
    bucket.fs.put_file(config, f"{bucket.name}/run/model.yaml")
    out = bucket.url("models/taming")
    result = run("import", "taming", bucket.url("run/last.ckpt"), out, "--config", bucket.url("run/model.yaml"))
    assert result.exit_code == 0, result.output
    model = load_tokenizer(out)
    digest = hashlib.sha256((tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
    assert model.source == {"format": "taming", "file": "last.ckpt", "sha256": digest}
    assert torch.equal(model.encode(images), taming_reference(taming, images)[0])


def test_normalize_codes_overrides_what_the_format_says(tmp_path, taming, images):
    ckpt, config = write_taming_run(tmp_path / "run", taming)
    result = run("import", "taming", ckpt, tmp_path / "model", "--config", config, "--normalize-codes")
    assert result.exit_code == 0, result.output
    model = load_tokenizer(tmp_path / "model")
    assert model.config.quantizer.normalize_codes
    with torch.no_grad():  # codes are then the nearest by angle, not by distance
        z = model.encode_latent(images * 2 - 1)
        directions = torch.nn.functional.normalize(z, dim=1)
        table = torch.nn.functional.normalize(model.quantizer.codebook, dim=1)
        by_angle = torch.einsum("bdhw,kd->bkhw", directions, table).argmax(dim=1)
    assert torch.equal(model.encode(images), by_angle)


def test_an_existing_model_is_replaced_only_with_overwrite(tmp_path, taming):
    ckpt, config = write_taming_run(tmp_path / "run", taming)
    out = tmp_path / "model"
    assert run("import", "taming", ckpt, out, "--config", config).exit_code == 0
    first = (out / "config.json").read_text()
    assert_refused(run("import", "taming", ckpt, out, "--config", config, "--image-size", "64"), "--overwrite")
    assert (out / "config.json").read_text() == first
    result = run("import", "taming", ckpt, out, "--config", config, "--image-size", "64", "--overwrite")
    assert result.exit_code == 0, result.output
    assert load_tokenizer(out).config.image_size == 64


def test_image_size_must_suit_the_stride(tmp_path, taming):
    ckpt, config = write_taming_run(tmp_path / "run", taming)
    stride = 2 ** (len(TAMING_DDCONFIG["ch_mult"]) - 1)
    assert_refused(
        run("import", "taming", ckpt, tmp_path / "model", "--config", config, "--image-size", str(stride * 3 + 1)),
        "not a multiple",
    )
    assert not (tmp_path / "model").exists()


def test_taming_discriminator_is_kept_beside_the_model(tmp_path, taming, images):
    discriminator = taming_discriminator()
    ckpt, config = write_taming_run(tmp_path / "run", taming, discriminator=discriminator)
    bare_ckpt, _ = write_taming_run(tmp_path / "bare", taming)
    for source, out in ((ckpt, tmp_path / "model"), (bare_ckpt, tmp_path / "bare-model")):
        result = run("import", "taming", source, out, "--config", config)
        assert result.exit_code == 0, result.output

    shape, state = read_discriminator(tmp_path / "model")
    assert shape == {"in_channels": 3, "filters": 16, "layers": 3}
    theirs = discriminator.state_dict()
    assert state.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    ours = NLayerDiscriminator(**shape).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(ours(images * 2 - 1), discriminator(images * 2 - 1))

    # the tokenizer is the one a discriminator-less checkpoint of the same weights gives, and LPIPS stays out
    model, bare = load_tokenizer(tmp_path / "model"), load_tokenizer(tmp_path / "bare-model")
    assert (model.model_id, model.codes_id) == (bare.model_id, bare.codes_id)
    assert read_discriminator(tmp_path / "bare-model") is None
    assert not any(name.startswith("loss.") for name in model.state_dict())

    summary = json.loads(run("info", tmp_path / "model", "--json").output)
    assert summary["discriminator"]["layers"] == 3 and summary["discriminator"]["filters"] == 16
    assert json.loads(run("info", tmp_path / "bare-model", "--json").output)["discriminator"] is None
    table = CliRunner(env={"COLUMNS": None}).invoke(cli, ["info", str(tmp_path / "model")])
    assert "PatchGAN, 3 layers, 16 filters, 3 input channels" in table.output, table.output


@pytest.mark.parametrize(
    "actnorm, changes, phrase",
    [
        (  # taming's use_actnorm: ActNorm's loc and scale where vqtok's PatchGAN has BatchNorm, and biases
            True,
            {},
            "is not a PatchGAN of 3 layers, 16 filters and 3 input channels (BatchNorm between its convolutions), "
            "the discriminator vqtok trains: missing key loss.discriminator.main.3.weight (and 26 more problems)",
        ),
        (False, {"loss.discriminator.main.6.running_var": None}, "missing key loss.discriminator.main.6.running_var"),
        (
            False,
            {"loss.discriminator.main.5.weight": torch.zeros(32, 16, 3, 3)},
            "key loss.discriminator.main.5.weight has shape (32, 16, 3, 3), not (64, 32, 4, 4)",
        ),
        (False, {"loss.discriminator.main.0.weight": None}, "it has no 4-d loss.discriminator.main.0.weight"),
    ],
    ids=["actnorm", "missing", "shape", "no first layer"],
)
def test_a_taming_discriminator_that_does_not_fit_is_refused(tmp_path, taming, actnorm, changes, phrase):
    discriminator = taming_discriminator(use_actnorm=actnorm)
    ckpt, config = write_taming_run(tmp_path / "run", taming, discriminator=discriminator, state_changes=changes)
    assert_refused(
        run("import", "taming", ckpt, tmp_path / "model", "--config", config),
        f"{ckpt}: its discriminator (loss.discriminator.*)",
        phrase,
    )
    assert not (tmp_path / "model").exists()
