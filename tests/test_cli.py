import json

import torch
from click.testing import CliRunner

from vqtok import VQVAE
from vqtok.cli import cli
from vqtok.config import ModelConfig


def test_info_reports_a_model(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(hidden_channels=16, codebook_size=32, code_dim=8, image_size=64))
    model.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "model"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["model_id"] == model.model_id
    assert summary["codebook_size"] == 32 and summary["grid"] == [16, 16]
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())

    table = CliRunner().invoke(cli, ["info", str(tmp_path / "model")])
    assert table.exit_code == 0 and model.model_id in table.output


def test_info_on_a_folder_that_is_neither_is_one_clear_line(tmp_path):
    result = CliRunner().invoke(cli, ["info", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path} is neither a model directory (no config.json) nor a token dataset (no .parquet files)"
    )
