"""vqtok demo: the whole loop on scikit-image's photographs, here with a handful of steps."""

import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vqtok.cli import cli
from vqtok.demo import HELD_OUT_PHOTOS, HELD_OUT_SIZE, MARKER
from vqtok.tokens import read_codes

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_demo_runs_the_whole_loop(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--steps", "10"])
    assert result.exit_code == 0, result.output
    for stage in ("fit", "encode", "decode"):
        assert stage in result.output
    assert re.search(
        r"^held-out photographs at 128x128: PSNR [\d.]+ dB over all pixels, codebook usage", result.output, re.M
    )

    keys, codes = read_codes(out / "tokens.parquet")
    assert codes.shape[1:] == (32, 32) and len(keys) == len(list((out / "decoded").glob("*.png")))
    picture = np.asarray(Image.open(out / "reconstructions.png"))
    assert picture.shape == (2 * HELD_OUT_SIZE, len(HELD_OUT_PHOTOS) * HELD_OUT_SIZE, 3)
    assert (out / "run" / "model" / "config.json").exists()

    again = CliRunner().invoke(cli, ["demo", "--out", str(out), "--steps", "2"])  # its own folder: replaced
    assert again.exit_code == 0, again.output
    assert (out / MARKER).exists()


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--steps", "2"])
    assert result.exit_code == 1 and "not made by vqtok demo" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_demo_with_a_prior_decodes_samples_of_each_photograph(tmp_path, monkeypatch):
    from vqtok.demo import CROP, PRIOR_SAMPLES, TRAIN_PHOTOS
    from vqtok.prior import Prior

    monkeypatch.setattr("vqtok.demo.CROPS_PER_PHOTO", 16)  # the loop as it is, on fewer crops
    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--steps", "3", "--prior", "--prior-steps", "3"])
    assert result.exit_code == 0, result.output
    for stage in ("encode crops", "prior fit", "prior sample"):
        assert stage in result.output
    prior = Prior.from_pretrained(out / "prior" / "model")
    assert prior.config.num_classes == len(TRAIN_PHOTOS) and prior.config.grid == (8, 8)
    picture = np.asarray(Image.open(out / "samples.png"))
    assert picture.shape == (len(TRAIN_PHOTOS) * CROP, PRIOR_SAMPLES * CROP, 3)
