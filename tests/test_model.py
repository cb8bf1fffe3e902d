import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vqtok import VQVAE
from vqtok.config import ADDED_SETTINGS, QUANTIZER_FIELDS, ModelConfig, QuantizerConfig
from vqtok.errors import ConfigError, ModelFormatError
from vqtok.pretrained import CONFIG_NAME, WEIGHTS_NAME
from vqtok.tokenizers import build_tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

SMALL = dict(hidden_channels=16, res_channels=8, quantizer=QuantizerConfig(codebook_size=32, code_dim=8))


@pytest.fixture
def model():
    torch.manual_seed(0)
    return VQVAE(ModelConfig(**SMALL)).eval()


def test_shapes_and_ranges(model):
    images = torch.rand(2, 3, 32, 32)
    codes = model.encode(images)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < model.codebook_size
    decoded = model.decode(codes)
    assert decoded.shape == (2, 3, 32, 32) and decoded.dtype == torch.float32
    assert 0 <= decoded.min() and decoded.max() <= 1
    assert model.grid_size(128) == (32, 32)
    assert model.grid_size((64, 32)) == (16, 8)


def test_encode_uses_the_training_path_codes(model):
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(model.encode(images), model(images).codes)


def test_encoder_depth_follows_the_config():
    deep = VQVAE(ModelConfig(**SMALL, num_downsamples=3)).eval()
    assert deep.encode(torch.rand(1, 3, 32, 32)).shape == (1, 4, 4)
    assert deep.decode(torch.zeros(1, 4, 4, dtype=torch.long)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.rand(3, 32, 32), r"\(B, 3, H, W\)"),
        (torch.rand(1, 1, 32, 32), r"\(B, 3, H, W\)"),
        (torch.randint(0, 255, (1, 3, 32, 32)), "floats"),
        (torch.rand(1, 3, 30, 32), "multiple of the model's stride 4"),
    ],
)
def test_encode_rejects_bad_images(model, bad, message):
    with pytest.raises(ValueError, match=message):
        model.encode(bad)


def test_decode_rejects_codes_out_of_range(model):
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        model.decode(torch.full((1, 2, 2), 32))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        model.decode(torch.zeros(2, 2, dtype=torch.long))


def test_a_few_steps_of_training_lower_the_loss():
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(**SMALL))
    smooth = torch.rand(8, 3, 4, 4)  # learnable images: smooth colour fields, not noise
    images = torch.nn.functional.interpolate(smooth, size=16, mode="bilinear")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        out = model(images)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.recon_loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_save_and_load_round_trip(model, tmp_path):
    model.train()(torch.rand(4, 3, 16, 16))  # k-means init and statistics, so buffers are not defaults
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = VQVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert loaded.model_id == model.model_id
    images = torch.rand(3, 3, 32, 32)
    assert torch.equal(loaded.encode(images), model.encode(images))
    codes = model.encode(images)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    header = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert header["model_id"] == model.model_id and header["format_version"] == 1


def test_a_factorised_lookup_encodes_decodes_and_survives_a_round_trip(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(hidden_channels=16, res_channels=8, quantizer=QuantizerConfig(32, 8, lookup_dim=3))
    model = VQVAE(config)
    model(torch.rand(4, 3, 16, 16))  # training mode: k-means in the 3-dimensional lookup space
    model.eval()
    assert model.quantizer.codebook.shape == (32, 3)
    images = torch.rand(3, 3, 16, 16)
    codes = model.encode(images)
    assert codes.shape == (3, 4, 4) and torch.equal(codes, model(images).codes)
    # decode gives what the training forward's decoder made of the same codes, projected back to D = 8
    torch.testing.assert_close(model.decode(codes), model(images).recon.clamp(0, 1))

    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["config"]["quantizer"]["lookup_dim"] == 3
    state = load_file(tmp_path / "m" / WEIGHTS_NAME)
    assert state["quantizer.codebook"].shape == (32, 3) and state["quantizer.project_in.weight"].shape == (3, 8)
    assert state["quantizer.project_out.weight"].shape == (8, 3)
    loaded = VQVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == config and loaded.model_id == model.model_id
    assert torch.equal(loaded.encode(images), codes) and torch.equal(loaded.decode(codes), model.decode(codes))


def test_model_id_tracks_the_weights(model):
    before = model.model_id
    with torch.no_grad():
        model.decoder.from_code.bias.add_(1)
    assert model.model_id != before


@pytest.fixture
def saved(model, tmp_path):
    return model.save_pretrained(tmp_path / "m")


def edit_header(directory, **changes):
    header = json.loads((directory / CONFIG_NAME).read_text())
    header.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(header))


def test_load_refuses_what_is_not_a_model(tmp_path, saved):
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    (saved / WEIGHTS_NAME).unlink()
    for where, reason in (
        (tmp_path / "nowhere", "nothing is there"),
        (tmp_path / "file", "it is a file"),
        (tmp_path / "empty", "it holds no config.json"),
        (saved, "it holds no model.safetensors"),
    ):
        with pytest.raises(ModelFormatError) as refused:
            VQVAE.from_pretrained(where)
        assert str(refused.value) == f"{where} is not a model directory: {reason}"


def test_load_refuses_broken_json(saved):
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        VQVAE.from_pretrained(saved)


def test_load_refuses_a_newer_format(saved):
    edit_header(saved, format_version=2)
    with pytest.raises(ModelFormatError, match="newer vqtok"):
        VQVAE.from_pretrained(saved)


def test_load_refuses_unknown_settings(saved):
    header = json.loads((saved / CONFIG_NAME).read_text())
    edit_header(saved, config={**header["config"], "attention_heads": 8})
    with pytest.raises(ModelFormatError, match="unknown setting.*attention_heads"):
        VQVAE.from_pretrained(saved)


def test_load_refuses_weights_that_do_not_fit_the_config(saved):
    header = json.loads((saved / CONFIG_NAME).read_text())
    edit_header(saved, config={**header["config"], "hidden_channels": 24})
    with pytest.raises(ModelFormatError, match="does not match its config.json.*wrong shape"):
        VQVAE.from_pretrained(saved)


def test_load_refuses_changed_weights(saved):
    state = load_file(saved / WEIGHTS_NAME)
    state["quantizer.codebook"][0] += 1
    save_file(state, saved / WEIGHTS_NAME)
    with pytest.raises(ModelFormatError, match="model_id differs"):
        VQVAE.from_pretrained(saved)


def test_load_refuses_a_corrupt_weights_file(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"\x80\x04K\x01.")  # a pickle, which must never be run
    with pytest.raises(ModelFormatError, match="cannot be read"):
        VQVAE.from_pretrained(saved)


def test_config_validates_settings():
    with pytest.raises(ConfigError, match="codebook_size"):
        QuantizerConfig(codebook_size=0)
    with pytest.raises(ConfigError, match="at least 2"):
        QuantizerConfig(codebook_size=1)
    with pytest.raises(ConfigError, match="decay"):
        QuantizerConfig(decay=1.5)
    with pytest.raises(ConfigError, match="multiple of the model's stride"):
        ModelConfig(image_size=30)


def test_a_model_saved_before_the_added_settings_loads_and_encodes_the_same_codes(tmp_path):
    """tests/fixtures/model-0.1.0 was written by vqtok 0.1.0 before lookup_dim and normalize_codes
    existed, and before the quantizer's settings had a table of their own; the codes are what that version
    encoded from the images beside it."""
    fixtures = Path(__file__).parent / "fixtures"
    header = json.loads((fixtures / "model-0.1.0" / CONFIG_NAME).read_text())
    assert "lookup_dim" not in header["config"] and "kind" not in header
    assert header["config"]["codebook_size"] == 16 and "quantizer" not in header["config"]  # flat
    model = VQVAE.from_pretrained(fixtures / "model-0.1.0")
    assert model.model_id == header["model_id"] == "e2d2e0e7be344ec6"
    assert model.config.quantizer == QuantizerConfig(codebook_size=16, code_dim=4, lookup_dim=None)
    assert (model.config.hidden_channels, model.config.res_channels, model.config.image_size) == (8, None, 16)
    images = torch.from_numpy(np.load(fixtures / "model-0.1.0-images.npy")).permute(0, 3, 1, 2).float() / 255
    assert np.array_equal(model.encode(images).numpy(), np.load(fixtures / "model-0.1.0-codes.npy"))

    saved_again = VQVAE.from_pretrained(model.save_pretrained(tmp_path / "again"))  # now with every setting named
    assert saved_again.model_id == header["model_id"] and saved_again.config == model.config
    written = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())["config"]
    flat = {name: value for name, value in header["config"].items() if name in QUANTIZER_FIELDS}
    assert written["quantizer"] == {**ADDED_SETTINGS, **flat} and not set(written) & set(QUANTIZER_FIELDS)


def test_config_json_holds_the_quantizer_as_a_table_of_its_own(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())["config"]
    assert config["quantizer"] == dataclasses.asdict(model.config.quantizer)
    assert config["quantizer"]["codebook_size"] == 32 and config["quantizer"]["code_dim"] == 8
    assert not set(config) & set(QUANTIZER_FIELDS)  # nothing of the quantizer's beside the network's
    assert ModelConfig.from_dict(config) == model.config


def test_a_config_json_names_each_quantizer_setting_once_and_only_known_ones(saved):
    header = json.loads((saved / CONFIG_NAME).read_text())
    edit_header(saved, config={**header["config"], "codebook_size": 64})  # flat, and 32 in "quantizer"
    with pytest.raises(ModelFormatError, match="codebook_size given both in the quantizer's table and beside it"):
        VQVAE.from_pretrained(saved)
    edit_header(saved, config={**header["config"], "quantizer": {**header["config"]["quantizer"], "heads": 2}})
    with pytest.raises(ModelFormatError, match="quantizer: unknown setting.*heads"):
        VQVAE.from_pretrained(saved)


def test_the_papers_recipe_loads_as_the_paper_has_it():
    from vqtok.config import load_config

    model, train = load_config(Path(__file__).parent.parent / "pipelines" / "paper.toml")
    assert (model.hidden_channels, model.res_channels, model.num_res_blocks) == (256, 256, 2)
    quantizer = model.quantizer
    assert (quantizer.codebook_size, quantizer.code_dim, quantizer.beta) == (512, 64, 0.25)
    assert quantizer.decay is None and not quantizer.kmeans_init and quantizer.dead_code_window == 0  # codebook loss
    assert quantizer.lookup_dim is None and not quantizer.normalize_codes
    assert (train.lr, train.batch_size, train.steps) == (2e-4, 128, 250000)
    assert (train.warmup_steps, train.min_lr_ratio) == (0, 1)  # constant


PIPELINES = Path(__file__).parent.parent / "pipelines"


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.toml")), ids=lambda path: path.name)
def test_every_recipe_in_pipelines_loads(path):
    """The recipes give the quantizer's settings flat in [model]: each lands in config.quantizer as written."""
    from vqtok.config import NULLABLE, TOKENIZER_CONFIGS, PriorConfig, PriorTrainConfig, load_config, tokenizer_family

    if path.name.startswith("prior-"):
        model, train = load_config(path, model_class=PriorConfig, train_class=PriorTrainConfig)
        assert isinstance(model, PriorConfig) and isinstance(train, PriorTrainConfig)
        return
    model, _ = load_config(path, model_class=TOKENIZER_CONFIGS[tokenizer_family(path)])
    written = tomllib.loads(path.read_text())["model"]
    quantizer = {name: value for name, value in written.items() if name in QUANTIZER_FIELDS}
    assert quantizer, "a tokenizer recipe that sets nothing of the quantizer's"
    as_read = {name: None if name in NULLABLE and value is False else value for name, value in quantizer.items()}
    assert {name: getattr(model.quantizer, name) for name in quantizer} == as_read
    build_tokenizer(model)  # the network and the quantizer fit together


def recipe(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def test_a_recipe_may_give_the_quantizer_a_table_of_its_own(tmp_path):
    from vqtok.config import load_config

    nested = recipe(tmp_path, "[model]\nhidden_channels = 8\n[model.quantizer]\ncodebook_size = 8\ndecay = false\n")
    model, _ = load_config(nested)
    assert model.hidden_channels == 8 and model.quantizer == QuantizerConfig(codebook_size=8, decay=None)
    flat = recipe(tmp_path, "[model]\nhidden_channels = 8\ncodebook_size = 8\ndecay = false\n")
    assert load_config(flat)[0] == model
    # the command line's options override the file's, in whichever form it gives them
    overridden, _ = load_config(nested, model={"codebook_size": 12, "lookup_dim": 4, "hidden_channels": 16})
    assert overridden.quantizer == QuantizerConfig(codebook_size=12, decay=None, lookup_dim=4)
    assert overridden.hidden_channels == 16


@pytest.mark.parametrize(
    "text, message",
    [
        ("[model]\ncodebook_size = 8\n[model.quantizer]\ncodebook_size = 16\n", "codebook_size given both"),
        ("[model.quantizer]\nhidden_channels = 8\n", "quantizer: unknown setting.*hidden_channels"),
        ("[model]\ncodebok_size = 8\n", r"unknown setting\(s\) codebok_size; known: .*codebook_size"),
        ("[model]\nquantizer = 8\n", "quantizer must be a table of settings, got 8"),
    ],
)
def test_a_recipe_names_each_quantizer_setting_once_and_in_its_place(tmp_path, text, message):
    from vqtok.config import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(recipe(tmp_path, text))


def test_the_first_import_paths_still_work():
    """tokenizers/ holds the code now; scripts written against vqtok.model and vqtok.quantize keep working."""
    import vqtok.model
    import vqtok.quantize
    from vqtok.tokenizers import base, quantizers, vqvae

    assert vqtok.model is vqvae and vqtok.quantize is quantizers
    assert vqtok.model.pick_device is base.pick_device and vqtok.model.VQVAEOutput is base.TokenizerOutput
    assert VQVAE is vqvae.VQVAE and vqtok.quantize.VectorQuantizer is quantizers.VectorQuantizer
