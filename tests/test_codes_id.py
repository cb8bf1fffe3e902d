"""The codes id: a hash of the weights that decide the codes an image gets, which model directories and token
datasets record beside the model id, and which directories and datasets written before it lack."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import image_samples

from vqtok import VQGAN, VQVAE, ModelConfig, load_tokenizer
from vqtok.cli import cli
from vqtok.config import QuantizerConfig, VQGANConfig
from vqtok.errors import ModelFormatError
from vqtok.tokens import TokenSettings, read_codes

SIZE = 16


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def header(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def test_codes_id_hashes_the_encode_side_and_the_lookup_settings(tmp_path):
    torch.manual_seed(0)
    quantizer = QuantizerConfig(codebook_size=16, code_dim=4, lookup_dim=3)
    model = VQVAE(ModelConfig(hidden_channels=8, image_size=SIZE, quantizer=quantizer))

    decoder_side = copy.deepcopy(model)
    with torch.no_grad():
        decoder_side.decoder.from_code.weight.add_(1)
        decoder_side.quantizer.project_out.weight.add_(1)
        decoder_side.quantizer.ema_count.add_(1)  # statistics do not decide codes either
        decoder_side.quantizer.step.add_(5)
    assert decoder_side.codes_id == model.codes_id and decoder_side.model_id != model.model_id

    for tensor in ("encoder.to_code.bias", "quantizer.codebook", "quantizer.project_in.weight"):
        encode_side = copy.deepcopy(model)
        with torch.no_grad():
            encode_side.state_dict()[tensor].add_(1e-3)
        assert encode_side.codes_id != model.codes_id, tensor

    # The same weights looked up after l2-normalizing give other codes: the model id cannot tell, the codes id can.
    normalized = VQVAE(
        dataclasses.replace(model.config, quantizer=dataclasses.replace(quantizer, normalize_codes=True))
    )
    normalized.load_state_dict(model.state_dict())
    assert normalized.model_id == model.model_id and normalized.codes_id != model.codes_id

    saved = model.save_pretrained(tmp_path / "model")
    assert header(saved)["codes_id"] == model.codes_id == load_tokenizer(saved).codes_id


def test_a_vqgans_codes_id_covers_quant_conv_and_not_post_quant_conv():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(base_channels=32, channel_mult=(1, 1), attn_levels=(), z_channels=8, image_size=SIZE))
    for module, same in (("quant_conv", False), ("post_quant_conv", True)):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            getattr(changed, module).bias.add_(1)
        assert (changed.codes_id == model.codes_id) is same, module


def test_a_codes_id_that_is_not_the_weights_is_refused_and_old_directories_load(tmp_path, model_dir):
    edited = tmp_path / "edited"
    shutil.copytree(model_dir, edited)
    config = header(edited)
    config["codes_id"] = "0" * 16
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match="records codes_id 0000000000000000, but the weights' is"):
        load_tokenizer(edited)
    result = invoke("info", edited)
    assert result.exit_code == 1 and "records codes_id" in result.output

    old = Path(__file__).parent / "fixtures" / "model-0.1.0"  # written before codes ids: it has none, and loads
    assert "codes_id" not in header(old)
    assert len(load_tokenizer(old).codes_id) == 16


def test_an_encode_resuming_into_a_dataset_without_codes_ids_goes_on(model_dir, make_shard, tmp_path):
    shards = [make_shard(f"s{i}.tar", image_samples([f"s{i}-{j}" for j in range(8)], seed=i)) for i in range(2)]
    tokens = tmp_path / "tokens.parquet"
    assert invoke("encode", shards[0], tokens, "--model", model_dir, "--num-workers", "0").exit_code == 0
    settings_file = tokens / "_vqtok.json"
    written = json.loads(settings_file.read_text())
    del written["codes_id"]  # as vqtok wrote it before codes ids
    settings_file.write_text(json.dumps(written))
    resumed = invoke("encode", *shards, tokens, "--model", model_dir, "--num-workers", "0")
    assert resumed.exit_code == 0, resumed.output
    assert len(read_codes(tokens)[0]) == 16  # the first shard kept, the second added

    base = TokenSettings("m", 16, (4, 4), SIZE, "crop")
    assert dataclasses.replace(base, codes_id="a").differences(base) == []
    assert dataclasses.replace(base, codes_id="a").differences(dataclasses.replace(base, codes_id="b")) == [
        "codes_id 'b' -> 'a'"
    ]
