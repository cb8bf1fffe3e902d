"""vqtok fit: one process, two processes, kill and resume, and clear errors."""

import re
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import checkpoint_files, image_samples, kill_and_resume, launch_two_processes, read_metrics

from vqtok import VQVAE
from vqtok.cli import cli
from vqtok.config import QuantizerConfig

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

TINY = ["--hidden", "16", "--codebook-size", "16", "--code-dim", "8", "--image-size", "16", "--batch-size", "8"]


@pytest.fixture
def shards(make_shard):
    train = [
        make_shard(f"train-{i:06d}.tar", image_samples([f"t{i}-{j}" for j in range(12)], seed=i)) for i in range(2)
    ]
    val = make_shard("val.tar", image_samples([f"v{j}" for j in range(10)], seed=100))
    return train, val


def test_fit_one_process(shards, tmp_path):
    train, val = shards
    out = tmp_path / "run"
    args = ["fit", *train, "--out", str(out), "--val", val, *TINY, "--steps", "6"]
    args += ["--eval-every", "3", "--save-every", "2", "--num-workers", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output

    model = VQVAE.from_pretrained(out / "model")
    assert model.codebook_size == 16 and model.config.image_size == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]  # keeps 2
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]

    metrics = read_metrics(out)
    val_entries = [m for m in metrics if m["split"] == "val"]
    assert [m["step"] for m in val_entries] == [3, 6]
    assert val_entries[-1]["images"] == 10  # the whole validation set
    assert 0 < val_entries[-1]["usage"] <= 1 and val_entries[-1]["psnr"] > 0
    train_entries = [m for m in metrics if m["split"] == "train" and "loss" in m]
    assert train_entries and train_entries[-1]["step"] == 6
    assert all(0 <= m["data_wait"] <= 1 for m in train_entries)  # the share of the loop spent waiting for data

    # The bar's usage is the quantizer's over its recent batches; the last line's PSNR (over all pixels, not
    # eval's mean over images) and usage are the held-out ones.
    bar = next(line for line in result.output.splitlines() if line.startswith("fit "))
    assert f"train usage (last 100 batches) {train_entries[-1]['usage']:.0%}" in bar
    held_out = val_entries[-1]
    assert result.output.splitlines()[-1] == (
        f"held-out PSNR {held_out['psnr']:.2f} dB over all pixels, codebook usage {held_out['usage']:.1%}, "
        f"perplexity {held_out['perplexity']:.0f}"
    )


@pytest.mark.parametrize(
    "model_tables",
    [
        "[model]\ncodebook_size = 8\ncode_dim = 4\nhidden_channels = 8\n",
        "[model]\nhidden_channels = 8\n[model.quantizer]\ncodebook_size = 8\ncode_dim = 4\n",
    ],
    ids=["flat", "nested"],
)
def test_fit_reads_a_toml_recipe_and_options_override_it(shards, tmp_path, model_tables):
    train, _ = shards
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(model_tables + "[train]\nsteps = 2\n")
    out = tmp_path / "run"
    args = ["fit", *train, "--out", str(out), "--config", str(recipe), "--codebook-size", "12", "--no-ema"]
    result = CliRunner().invoke(cli, [*args, "--image-size", "16", "--num-workers", "0", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    quantizer = VQVAE.from_pretrained(out / "model").config.quantizer
    assert (quantizer.codebook_size, quantizer.code_dim, quantizer.decay) == (12, 4, None)


def test_fit_options_set_the_quantizer(shards, tmp_path):
    train, _ = shards
    out = tmp_path / "run"
    options = ["--codebook-size", "12", "--code-dim", "6", "--beta", "0.5", "--decay", "0.9", "--lookup-dim", "3"]
    options += ["--normalize-codes", "--rare-code-share", "0.25"]
    args = ["fit", *train, "--out", str(out), "--hidden", "8", "--image-size", "16", "--batch-size", "4"]
    result = CliRunner().invoke(cli, [*args, *options, "--steps", "1", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    quantizer = VQVAE.from_pretrained(out / "model").config.quantizer
    assert quantizer == QuantizerConfig(
        codebook_size=12, code_dim=6, beta=0.5, decay=0.9, lookup_dim=3, normalize_codes=True, rare_code_share=0.25
    )


def test_fit_help_shows_the_quantizers_defaults():
    shown = " ".join(CliRunner().invoke(cli, ["fit", "--help"], terminal_width=200).output.split())
    defaults = QuantizerConfig()
    for flag, default in [
        ("--codebook-size", defaults.codebook_size),
        ("--code-dim", defaults.code_dim),
        ("--beta", defaults.beta),
        ("--decay", defaults.decay),
        ("--lookup-dim", defaults.lookup_dim),
        ("--normalize-codes", defaults.normalize_codes),
        ("--rare-code-share", defaults.rare_code_share),
    ]:
        assert re.search(rf"{flag} [^[]*\[default: \({default} or the config file's\)", shown), flag


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--decay", "0.9", "--no-ema"], "exclude each other"),
        (["--image-size", "18"], "not a multiple of the model's stride"),
    ],
)
def test_fit_refuses_bad_arguments(shards, tmp_path, extra, message):
    train, _ = shards
    result = CliRunner().invoke(cli, ["fit", *train, "--out", str(tmp_path / "run"), *extra])
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_fit_refuses_missing_shards_and_empty_data(make_shard, tmp_path):
    result = CliRunner().invoke(cli, ["fit", str(tmp_path / "nope-*.tar"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "nope-*.tar" in result.output

    labels_only = make_shard("labels.tar", [{"__key__": f"k{i}", "cls": b"1"} for i in range(3)])
    for workers in ("0", "1"):  # raised in this process, and in a DataLoader worker
        args = ["fit", labels_only, "--out", str(tmp_path / f"run{workers}"), *TINY, "--num-workers", workers]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, result.output
        last_line = result.output.strip().splitlines()[-1]
        assert last_line == "Error: none of the 1 shard holds an image that can be decoded"
        assert "Traceback" not in result.output


def test_fit_two_processes(shards, tmp_path):
    train, val = shards
    out = tmp_path / "run"
    fit = ["fit", *train, "--out", out, "--val", val, *TINY, "--steps", "6", "--save-every", "3", "--num-workers", "1"]
    proc = launch_two_processes(*fit)
    assert proc.returncode == 0, proc.stderr[-3000:]

    final = read_metrics(out)[-1]
    assert final["processes"] == 2
    assert len(final["codebook_digests"]) == 2 and len(set(final["codebook_digests"])) == 1
    assert (proc.stdout + proc.stderr).count("exported model to") == 1  # by the main process only
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "model.safetensors"]
    # the shared state once, from the main process, and each process's own random states
    assert sorted(p.name for p in (out / "checkpoints" / "step-000006").iterdir()) == checkpoint_files(2)
    model = VQVAE.from_pretrained(out / "model")
    assert model.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 4)


def test_killed_run_resumes_from_its_checkpoint(shards, tmp_path):
    train, _ = shards
    out = tmp_path / "run"
    command = [sys.executable, "-m", "vqtok", "fit", *train, "--out", str(out), *TINY, "--steps", "200"]
    command += ["--save-every", "5", "--num-workers", "0"]
    kill_and_resume(command, out, 200, ["--code-dim", "4"], "quantizer.code_dim")
    assert VQVAE.from_pretrained(out / "model").codebook_size == 16


def test_fit_and_encode_with_a_codebook_of_16384(shards, tmp_path):
    """Large codebooks work end to end: k-means from fewer vectors than codes, the grouped argmin, uint16."""
    from vqtok.encode import encode
    from vqtok.tokens import read_codes

    train, val = shards
    out = tmp_path / "run"
    args = ["fit", *train, "--out", str(out), "--val", val, "--hidden", "8", "--codebook-size", "16384"]
    args += ["--code-dim", "8", "--image-size", "16", "--batch-size", "8", "--steps", "3", "--num-workers", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    model = VQVAE.from_pretrained(out / "model")
    assert model.codebook_size == 16384
    encode([val], tmp_path / "tokens.parquet", out / "model", num_workers=0, show_progress=False)
    keys, codes = read_codes(tmp_path / "tokens.parquet")
    assert codes.shape == (10, 4, 4) and codes.max() < 16384
