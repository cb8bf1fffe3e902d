"""The discriminator a tokenizer's model directory may hold (`vqtok.tokenizers.discriminator_file`): saved beside
a model without touching it, read back whole, refused in one line where it does not fit its record, and shown by
`vqtok info`."""

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from vqtok import load_tokenizer
from vqtok.cli import cli
from vqtok.config import ObjectiveConfig, PriorConfig
from vqtok.errors import ModelFormatError
from vqtok.prior import Prior
from vqtok.tokenizers.discriminator_file import read_discriminator, save_discriminator
from vqtok.tokenizers.losses import NLayerDiscriminator, Objective


def trained_discriminator(seed: int = 0, filters: int = 8, layers: int = 2) -> NLayerDiscriminator:
    """A PatchGAN after two of an Objective's discriminator steps: weights moved off their initialisation, and
    BatchNorm's running statistics and step counts are a trained one's, not the defaults."""
    torch.manual_seed(seed)
    objective = Objective(ObjectiveConfig(disc_weight=0.5, disc_filters=filters, disc_layers=layers))
    optimizer = torch.optim.Adam(objective.discriminator.parameters(), lr=1e-2)
    for _ in range(2):
        images = torch.rand(2, 3, 32, 32) * 2 - 1
        loss, _ = objective.discriminator_loss(images, images.flip(-1), step=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return objective.discriminator


@pytest.fixture
def model(model_dir, tmp_path):
    """A copy of the session's small model directory, to save into."""
    return shutil.copytree(model_dir, tmp_path / "model")


def info(*args):
    return CliRunner().invoke(cli, ["info", *map(str, args)], env={"COLUMNS": "200"})


def row(table: str, name: str) -> str:
    """The value of the table's row `name` (rich draws each row as │ name │ value │)."""
    cells = (line.strip("│ ").split("│") for line in table.splitlines() if "│" in line)
    return next(value.strip() for first, *rest in cells for value in rest if first.strip() == name)


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_saved_discriminator_reads_back_whole_and_leaves_the_model_as_it_was(model):
    before = {name: (model / name).read_bytes() for name in ("config.json", "model.safetensors")}
    tokenizer = load_tokenizer(model)
    discriminator = trained_discriminator()
    assert int(discriminator.main[3].num_batches_tracked) == 4  # two steps, a real and a fake batch each

    entry = save_discriminator(model, discriminator)

    shape, state = read_discriminator(model)
    assert shape == {"in_channels": 3, "filters": 8, "layers": 2}
    assert entry == {**shape, "weights_id": entry["weights_id"]}
    ours = discriminator.state_dict()
    assert state.keys() == ours.keys()
    for name, tensor in ours.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    # the model's own file is untouched, and config.json gains the one entry
    assert (model / "model.safetensors").read_bytes() == before["model.safetensors"]
    header = json.loads((model / "config.json").read_text())
    assert header.pop("discriminator") == entry
    assert header == json.loads(before["config.json"])
    reloaded = load_tokenizer(model)
    assert (reloaded.model_id, reloaded.codes_id) == (tokenizer.model_id, tokenizer.codes_id)

    # what a fine-tune does with it: the same PatchGAN, giving the same logits in training mode and out
    warm = NLayerDiscriminator(**shape)
    warm.load_state_dict(state)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    for mode in (False, True):
        assert torch.equal(warm.train(mode)(images), discriminator.train(mode)(images))


def test_saving_again_replaces_the_discriminator(model):
    save_discriminator(model, trained_discriminator(seed=0))
    second = trained_discriminator(seed=1, filters=16, layers=3)
    save_discriminator(model, second)
    shape, state = read_discriminator(model)
    assert shape == {"in_channels": 3, "filters": 16, "layers": 3}
    assert all(torch.equal(state[name], tensor) for name, tensor in second.state_dict().items())


def test_a_directory_without_one_reads_as_none_and_info_says_so(model_dir):
    assert read_discriminator(model_dir) is None
    assert json.loads(info(model_dir, "--json").output)["discriminator"] is None
    assert row(info(model_dir).output, "discriminator") == "none"


def test_info_shows_the_discriminator(model):
    discriminator = trained_discriminator()
    entry = save_discriminator(model, discriminator)
    summary = json.loads(info(model, "--json").output)
    parameters = sum(p.numel() for p in discriminator.parameters())
    assert summary["discriminator"] == {**entry, "parameters": parameters}
    table = info(model)
    assert table.exit_code == 0, table.output
    assert row(table.output, "discriminator") == (
        f"PatchGAN, 2 layers, 8 filters, 3 input channels, {parameters:,} parameters (weights id {entry['weights_id']})"
    )


def edit_record(model, **changes):
    header = json.loads((model / "config.json").read_text())
    header["discriminator"].update(changes)
    (model / "config.json").write_text(json.dumps(header))


def test_a_file_that_does_not_fit_its_record_is_refused_naming_the_first_key(model):
    save_discriminator(model, trained_discriminator(layers=3))
    edit_record(model, layers=2)
    line = one_line_error(info(model))
    file = model / "discriminator.safetensors"
    assert f"{file} is not a PatchGAN of 2 layers, 8 filters and 3 input channels" in line
    # main.8 is the last convolution of two layers (with a bias), and of three the fourth (without)
    assert "as config.json records: missing key main.8.bias (and 8 more problems)" in line
    with pytest.raises(ModelFormatError, match="missing key main.8.bias"):
        read_discriminator(model)


def test_a_file_that_is_not_the_recorded_one_is_refused(model):
    save_discriminator(model, trained_discriminator(seed=0))
    record = (model / "config.json").read_text()
    save_discriminator(model, trained_discriminator(seed=1))  # the same shape, other weights
    (model / "config.json").write_text(record)
    assert "is not the discriminator config.json describes (weights_id differs)" in one_line_error(info(model))

    (model / "discriminator.safetensors").unlink()
    line = one_line_error(info(model))
    assert f"names a discriminator, but {model / 'discriminator.safetensors'} is not there" in line

    save_discriminator(model, trained_discriminator(seed=0))
    edit_record(model, filters="8")
    assert "'discriminator' must hold positive integers in_channels, filters, layers" in one_line_error(info(model))


def test_only_a_patchgan_is_saved_and_only_beside_a_tokenizer(model, tmp_path):
    with pytest.raises(ModelFormatError, match=r"is not a PatchGAN discriminator: it has no 4-d main.0.weight"):
        save_discriminator(model, torch.nn.Conv2d(3, 8, 4))
    truncated = torch.nn.Module()  # a PatchGAN's first layers, without its last convolution
    truncated.main = torch.nn.Sequential(*list(trained_discriminator().main)[:4])
    with pytest.raises(
        ModelFormatError, match=r"is not a PatchGAN of 1 layer, 8 filters .*: missing key main.5.weight"
    ):
        save_discriminator(model, truncated)
    assert not (model / "discriminator.safetensors").exists()
    assert read_discriminator(model) is None

    with pytest.raises(ModelFormatError, match="is not a model directory"):
        save_discriminator(tmp_path / "nothing", trained_discriminator())
    prior = Prior(PriorConfig(layers=1, width=16, heads=2, codebook_size=8, grid=(2, 2))).save_pretrained(
        tmp_path / "prior"
    )
    with pytest.raises(ModelFormatError, match="holds a prior, not a tokenizer"):
        save_discriminator(prior, trained_discriminator())
    assert not (prior / "discriminator.safetensors").exists()


def test_saved_into_and_read_from_a_bucket(bucket, model_dir):
    """A run's OUT may be in a store: its exported model, and so the discriminator beside it, is written there."""
    url = bucket.url("runs/x/model")
    load_tokenizer(model_dir).save_pretrained(url)
    discriminator = trained_discriminator()
    save_discriminator(url, discriminator)
    assert bucket.listing() == [
        f"{bucket.name}/runs/x/model/{name}"
        for name in ("config.json", "discriminator.safetensors", "model.safetensors")
    ]
    shape, state = read_discriminator(url)
    assert shape == {"in_channels": 3, "filters": 8, "layers": 2}
    assert all(torch.equal(state[name], tensor) for name, tensor in discriminator.state_dict().items())
