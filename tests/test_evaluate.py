"""vqtok eval and the report card fit shares with it: checked against numbers computed here from scratch."""

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import image_samples, launch_two_processes, pytorch_fids_distance
from PIL import Image, ImageDraw, ImageFont
from skimage.metrics import structural_similarity

from vqtok import VQVAE, ModelConfig
from vqtok.cli import cli
from vqtok.data import iter_samples, sample_image
from vqtok.evaluate import psnr, ssim
from vqtok.pictures import BAND, FONT_SIZE, GAP, MIN_TILE, tile_scale
from vqtok.tokenizers.perceptual import load_inception, load_lpips


@pytest.fixture
def shards(make_shard):
    return [
        make_shard("a.tar", image_samples([f"a{i}" for i in range(7)], seed=0)),
        make_shard("b.tar", image_samples([f"b{i}" for i in range(6)], seed=50)),
    ]


def by_hand(model_dir, shards, image_size=16):
    """PSNR, SSIM (scikit-image), usage and perplexity of model.decode(model.encode(x)) over the shards."""
    model = VQVAE.from_pretrained(model_dir)
    images = torch.stack([sample_image(s, image_size) for shard in shards for s in iter_samples(shard)])
    x = images.float() / 255  # (N, 3, S, S)
    codes = model.encode(x)
    recon = model.decode(codes)
    per_image_mse = (recon - x).pow(2).flatten(1).mean(dim=1).double()
    a, b = x.permute(0, 2, 3, 1).double().numpy(), recon.permute(0, 2, 3, 1).double().numpy()
    ssims = [
        structural_similarity(
            a[i], b[i], channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        for i in range(len(a))
    ]
    counts = np.bincount(codes.flatten().numpy(), minlength=model.codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {
        "images": len(x),
        "psnr": 10 * math.log10(1 / per_image_mse.mean().item()),
        "psnr_image_mean": (10 * torch.log10(1 / per_image_mse)).mean().item(),
        "ssim": float(np.mean(ssims)),
        "usage": (counts > 0).mean(),
        "codes_used": int((counts > 0).sum()),
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
    }


def test_eval_reports_what_a_count_by_hand_gives(model_dir, shards, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["eval", model_dir, *shards, "--json", "--out", str(out), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    expected = by_hand(model_dir, shards)
    assert report["images"] == expected["images"] == 13 and report["errors"] == 0
    assert report["psnr"] == pytest.approx(expected["psnr"], abs=1e-4)
    assert report["psnr_image_mean"] == pytest.approx(expected["psnr_image_mean"], abs=1e-4)
    assert abs(report["ssim"] - expected["ssim"]) < 1e-3
    assert report["codes_used"] == expected["codes_used"] and report["usage"] == pytest.approx(expected["usage"])
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-9)
    assert report["bits_per_code"] == pytest.approx(math.log2(expected["perplexity"]), rel=1e-9)
    assert report["encode_images_per_second"] > 0 and report["decode_images_per_second"] > 0
    worst = [entry["psnr"] for entry in report["worst"]]
    assert len(worst) == 8 and worst == sorted(worst)

    # 8 worst over theirs, 8 typical over theirs: 16 px crops shown 8 times larger, each row between text bands
    with Image.open(out / "reconstructions.png") as picture:
        assert picture.size == (8 * 128 + 7 * GAP, 4 * (128 + 2 * BAND)) and picture.mode == "RGB"
    assert json.loads((out / "report.json").read_text())["images"] == 13


def band(text: str, width: int) -> np.ndarray:
    """A text band of the picture: white text in Pillow's default font on black, (BAND, width, 3)."""
    canvas = Image.new("RGB", (width, BAND))
    ImageDraw.Draw(canvas).text((3, 2), text, fill=(255, 255, 255), font=ImageFont.load_default(size=FONT_SIZE))
    return np.asarray(canvas).astype(int)


def test_tiles_are_enlarged_to_at_least_min_tile_and_never_shrunk():
    assert (tile_scale(32, 32), tile_scale(16, 16), tile_scale(100, 300)) == (4, 8, 2)
    assert tile_scale(MIN_TILE - 1, MIN_TILE - 1) == 2 and tile_scale(MIN_TILE, MIN_TILE) == 1
    assert tile_scale(256, 256) == tile_scale(1024, 512) == 1


def small_model(directory, seed: int, image_size: int = 16, **config) -> str:
    """A VQ-VAE whose codebook is spread over its encoder's outputs on noise, so that codes vary."""
    torch.manual_seed(seed)
    model = VQVAE(ModelConfig.from_dict({"hidden_channels": 8, "code_dim": 4, "image_size": image_size, **config}))
    K, S = model.codebook_size, image_size
    with torch.no_grad():
        z = model.encoder(torch.rand(32, 3, S, S) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 4)  # (32*h*w, D)
        model.quantizer.codebook.copy_(z[torch.randperm(len(z))[:K]])
    return str(model.save_pretrained(directory))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Another configuration than model_dir's (K = 32, stride 4): K = 64, stride 2."""
    return small_model(tmp_path_factory.mktemp("other") / "model", 1, codebook_size=64, num_downsamples=1)


def test_compare_gives_the_rows_of_single_runs_and_shows_the_same_images(model_dir, other_model, shards, tmp_path):
    out = tmp_path / "compare"
    args = [*shards, "--json", "--batch-size", "4", "--num-workers", "0"]
    result = CliRunner().invoke(cli, ["eval", model_dir, *args, "--compare", other_model, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert json.loads((out / "report.json").read_text()) == rows
    assert [(r["model"], r["family"], r["codebook_size"], r["grid"]) for r in rows] == [
        (model_dir, "vqvae", 32, [4, 4]),
        (other_model, "vqvae", 64, [8, 8]),
    ]
    # The same numbers as each model alone; only the speeds differ, and the images shown (chosen below).
    differ = {"encode_images_per_second", "decode_images_per_second", "worst"}
    for model, row in zip([model_dir, other_model], rows, strict=True):
        alone = CliRunner().invoke(cli, ["eval", model, *args])
        assert alone.exit_code == 0, alone.output
        single = json.loads(alone.output)
        assert {k: v for k, v in row.items() if k not in differ} == {k: v for k, v in single.items() if k not in differ}

    # The worst images are those of lowest mean PSNR over the two models, the same in both rows.
    samples = [s for shard in shards for s in iter_samples(shard)]
    x = torch.stack([sample_image(s, 16) for s in samples]).float() / 255  # (N, 3, 16, 16)
    recons = [VQVAE.from_pretrained(m).decode(VQVAE.from_pretrained(m).encode(x)) for m in (model_dir, other_model)]
    psnrs = [psnr((r - x).pow(2).flatten(1).mean(dim=1).double()) for r in recons]  # (N,) per model
    mean = ((psnrs[0] + psnrs[1]) / 2).tolist()
    worst = sorted(range(len(samples)), key=mean.__getitem__)[:8]
    for m, row in enumerate(rows):
        assert [e["key"] for e in row["worst"]] == [samples[i].key for i in worst]
        assert [e["psnr"] for e in row["worst"]] == pytest.approx([psnrs[m][i].item() for i in worst], abs=1e-4)

    # The picture: the worst originals, under them each model's reconstructions, then typical ones likewise;
    # each row of tiles with its name in a band above it, and under each tile its key or its PSNR.
    scale = 128 // 16
    tile = 16 * scale
    strips = 2 * (1 + 2)
    with Image.open(out / "reconstructions.png") as picture:
        assert picture.size == (8 * tile + 7 * GAP, strips * (tile + 2 * BAND))
        pixels = np.asarray(picture).astype(int)

    def row(r):  # the title band, the tiles and the band under them of row r
        strip = pixels[r * (tile + 2 * BAND) : (r + 1) * (tile + 2 * BAND)]
        return strip[:BAND], strip[BAND : BAND + tile], strip[BAND + tile :]

    def enlarged(image):  # (16, 16, 3) -> (tile, tile, 3), nearest neighbour
        return image.repeat(scale, axis=0).repeat(scale, axis=1)

    assert all(row(r)[0].max() == 255 for r in range(strips))  # every row is named, each model otherwise
    assert not np.array_equal(row(1)[0], row(2)[0])
    for j, i in enumerate(worst):
        column = slice((tile + GAP) * j, (tile + GAP) * j + tile)
        _, tiles, captions = row(0)
        assert np.array_equal(tiles[:, column], enlarged(sample_image(samples[i], 16).permute(1, 2, 0).numpy()))
        assert np.array_equal(captions[:, column], band(samples[i].key, tile))
        for m, recon in enumerate(recons):
            _, tiles, captions = row(1 + m)
            expected = enlarged(recon[i].clamp(0, 1).mul(255).round().permute(1, 2, 0).numpy())
            assert np.abs(tiles[:, column] - expected).max() <= 1
            assert np.array_equal(captions[:, column], band(f"{rows[m]['worst'][j]['psnr']:.2f} dB", tile))


def test_compare_table_in_a_pipe_keeps_every_column_and_whole_model_paths(model_dir, other_model, shards, tmp_path):
    """Printed to a pipe or a log (no terminal, no COLUMNS), the table is as wide as it needs, not rich's 80
    columns: each model's path stays on its row's one line, which ends with its encode/decode images/s."""
    deep = tmp_path / "a-folder-whose-name-is-long-enough-to-fill-most-of-a-terminal-line" / "runs" / "x" / "model"
    shutil.copytree(model_dir, deep)
    args = ["eval", str(deep), shards[0], "--compare", other_model, "--num-workers", "0"]
    result = CliRunner(env={"COLUMNS": None}).invoke(cli, args)
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert any(line.endswith(" images/s") for line in lines), result.output
    assert any(" image mean " in line and line.endswith(" enc/dec") for line in lines), result.output  # its PSNR
    assert "PSNR image mean: the mean of each image's PSNR, in dB" in result.output
    for model in (str(deep), other_model):
        row = next((line for line in lines if line.startswith(model + " ")), None)
        assert row is not None and re.search(r" [\d,]+/[\d,]+$", row), result.output


def test_eval_names_the_files_it_wrote_once_whatever_the_out_folder_ends_with(model_dir, shards, tmp_path):
    out = f"{tmp_path / 'compare'}/"
    result = CliRunner(env={"COLUMNS": None}).invoke(cli, ["eval", model_dir, shards[0], "--out", out])
    assert result.exit_code == 0, result.output
    assert f"{out}report.json, {out}reconstructions.png" in result.output and "//" not in result.output
    assert (tmp_path / "compare" / "report.json").is_file()


def test_compare_table_and_refusals(model_dir, other_model, shards, tmp_path):
    table = CliRunner().invoke(cli, ["eval", model_dir, shards[0], "--compare", other_model, "--num-workers", "0"])
    assert table.exit_code == 0, table.output
    assert "2 tokenizers on the same 7 images" in table.output and "vqvae" in table.output
    coarse = small_model(tmp_path / "coarse", 2, image_size=32, codebook_size=16, num_downsamples=5)  # stride 32
    cases = [
        (["--compare", coarse], f"{coarse}: image size 16x16 is not a positive multiple of the model's stride 32"),
        (["--compare", other_model, "--image-size", "18"], f"{model_dir}: image size 18x18 is not a positive"),
        (["--compare", str(tmp_path / "nope")], "nope is not a model directory"),
    ]
    for options, message in cases:
        result = CliRunner().invoke(cli, ["eval", model_dir, shards[0], *options])
        assert result.exit_code == 1, (options, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_eval_table_and_limit(model_dir, shards):
    result = CliRunner().invoke(cli, ["eval", model_dir, *shards, "--limit", "5", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert "on 5 images" in result.output and "PSNR" in result.output and "SSIM" in result.output


def test_fit_reports_what_eval_reports(shards, tmp_path, fresh_accelerate_state):
    run = tmp_path / "run"
    args = ["fit", shards[0], "--out", str(run), "--val", shards[1], "--steps", "3", "--hidden", "8"]
    args += ["--codebook-size", "16", "--code-dim", "4", "--image-size", "16", "--batch-size", "4"]
    assert CliRunner().invoke(cli, [*args, "--num-workers", "0"]).exit_code == 0
    fitted = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    fitted = [m for m in fitted if m["split"] == "val"][-1]
    result = CliRunner().invoke(cli, ["eval", str(run / "model"), shards[1], "--json", "--num-workers", "0"])
    evaluated = json.loads(result.output)
    for name in ("images", "psnr", "psnr_image_mean", "ssim", "usage", "perplexity", "bits_per_code"):
        assert fitted[name] == pytest.approx(evaluated[name], rel=1e-6), name
    assert (run / "samples" / "step-000003.png").is_file()


def test_eval_refuses_what_it_cannot_evaluate(model_dir, make_shard, tmp_path):
    runner = CliRunner()
    cases = [
        ([model_dir, str(tmp_path / "missing.tar")], "missing.tar: no such file or directory"),
        ([model_dir, make_shard("bad.tar", [{"__key__": "x", "png": b"not a png"}])], "no image to evaluate"),
        ([model_dir, make_shard("labels.tar", [{"__key__": "y", "cls": b"1"}])], "no image to evaluate"),
        ([model_dir, make_shard("empty.tar", [])], "no image to evaluate"),
        ([str(tmp_path), make_shard("ok.tar", image_samples(["k"]))], "is not a model directory: it holds no config"),
        ([model_dir, make_shard("ok2.tar", image_samples(["k"])), "--image-size", "18"], "not a positive multiple"),
        ([str(tmp_path / "nope"), make_shard("ok3.tar", image_samples(["k"]))], "nope is not a model directory"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, ["eval", *args])
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_ssim_agrees_with_scikit_image():
    rng = np.random.default_rng(0)
    for height, width in [(32, 32), (16, 24), (48, 40)]:
        a = rng.random((height, width, 3))
        b = np.clip(a + rng.normal(0, 0.2, a.shape), 0, 1)
        expected = structural_similarity(
            a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        tensors = [torch.from_numpy(v).permute(2, 0, 1)[None].float() for v in (a, b)]
        assert abs(ssim(*tensors).item() - expected) < 1e-5
    same = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(same, same), torch.ones(2))


def weights_options(lpips_files, inception_file) -> list[str]:
    vgg16, linear = lpips_files
    return ["--vgg16-weights", str(vgg16), "--lpips-weights", str(linear), "--inception-weights", str(inception_file)]


def perceptual_by_hand(model_dirs, shards, lpips_files, inception_file, image_size=16) -> list[tuple[float, float]]:
    """For each model: the mean LPIPS over the images between each crop and its reconstruction, and pytorch-fid's
    Fréchet distance (scipy's sqrtm) between their Inception features, from the networks alone."""
    x = torch.stack([sample_image(s, image_size) for shard in shards for s in iter_samples(shard)]).float() / 255
    lpips, inception = load_lpips(*lpips_files), load_inception(inception_file)
    with torch.no_grad():
        real = inception(x).double().numpy()  # (N, 2048)
    measured = []
    for model_dir in model_dirs:
        model = VQVAE.from_pretrained(model_dir)
        recon = model.decode(model.encode(x))  # (N, 3, S, S) in [0, 1]
        with torch.no_grad():
            distance = lpips(x * 2 - 1, recon * 2 - 1).double().mean().item()
            fake = inception(recon).double().numpy()  # (N, 2048)
        stats = [(f.mean(axis=0), np.cov(f, rowvar=False)) for f in (real, fake)]
        measured.append((distance, pytorch_fids_distance(*stats[0], *stats[1])))
    return measured


def test_eval_reports_lpips_and_rfid_from_the_weights_files_for_each_model(
    model_dir, other_model, make_shard, lpips_files, inception_file, tmp_path
):
    """With the three files (random weights, made by the tests), --compare --json carries LPIPS and rFID for
    each model: the networks' own mean, and pytorch-fid's formula on the networks' features (of 5 images, in
    batches of 3: the Inception network sees each at 299x299, which takes its time on a CPU)."""
    shard = make_shard("five.tar", image_samples([f"f{i}" for i in range(5)], seed=7))
    out = tmp_path / "report"
    args = [shard, "--compare", other_model, "--json", "--batch-size", "3", "--num-workers", "0", "--out", str(out)]
    result = CliRunner().invoke(cli, ["eval", model_dir, *args, *weights_options(lpips_files, inception_file)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert json.loads((out / "report.json").read_text()) == rows
    by_hand = perceptual_by_hand([model_dir, other_model], [shard], lpips_files, inception_file)
    for row, (lpips, rfid) in zip(rows, by_hand, strict=True):
        assert row["images"] == 5
        assert row["lpips"] == pytest.approx(lpips, rel=1e-5) and lpips > 0
        assert row["rfid"] == pytest.approx(rfid, rel=1e-4) and rfid > 0
        assert list(row["notes"]) == ["rfid"] and "fewer images than its 2,048 features" in row["notes"]["rfid"]
    assert rows[0]["lpips"] != rows[1]["lpips"] and rows[0]["rfid"] != rows[1]["rfid"]


def test_eval_table_shows_lpips_and_rfid_and_says_in_one_line_when_they_were_not_computed(
    model_dir, other_model, shards, lpips_files, inception_file
):
    single = ["eval", model_dir, shards[0], "--num-workers", "0"]
    result = CliRunner().invoke(cli, [*single, *weights_options(lpips_files, inception_file)])
    assert result.exit_code == 0, result.output
    assert re.search(r"LPIPS +│ 0\.\d{4} \(VGG16, mean over images\)", result.output), result.output
    assert re.search(r"rFID +│ \d+\.\d{3} on 7 images; fewer images than its 2,048 features", result.output)

    hub = torch.hub.get_dir()  # the tests' own, empty (conftest's empty_torch_hub); lpips' vgg.pth is installed
    result = CliRunner().invoke(cli, single)
    assert result.exit_code == 0, result.output
    lpips = next(line for line in result.output.splitlines() if "LPIPS" in line)
    assert f"not computed: no torchvision's VGG16 weights: put vgg16-397923af.pth in {hub}/checkpoints" in lpips
    assert "--vgg16-weights" in lpips
    rfid = next(line for line in result.output.splitlines() if "rFID" in line)
    assert "not computed: no pytorch-fid's Inception weights: put pt_inception-2015-12-05-6726825d.pth" in rfid

    result = CliRunner().invoke(cli, [*single, "--json", "--compare", other_model])
    rows = json.loads(result.output)
    for row in rows:
        assert row["lpips"] is None and row["rfid"] is None
        assert row["notes"]["lpips"].startswith("not computed: no torchvision's VGG16 weights")
        assert row["notes"]["rfid"].startswith("not computed: no pytorch-fid's Inception weights")
    result = CliRunner(env={"COLUMNS": None}).invoke(cli, [*single, "--compare", other_model])
    lines = [line.strip() for line in result.output.splitlines()]
    assert any(re.search(r" LPIPS +rFID +enc/dec$", line) for line in lines), result.output
    row = next(line for line in lines if line.startswith(f"{model_dir} "))
    assert re.search(r" - +- +[\d,]+/[\d,]+$", row), result.output
    assert "LPIPS: not computed: no torchvision's VGG16 weights" in " ".join(result.output.split())

    result = CliRunner().invoke(cli, [*single, "--json", "--no-lpips", "--no-rfid"])
    assert not {"lpips", "rfid", "notes"} & set(json.loads(result.output))


def test_eval_refuses_weights_it_was_asked_to_use_and_cannot_in_one_line(
    model_dir, shards, lpips_files, inception_file, tmp_path
):
    vgg16, linear = lpips_files
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pth")
    cases = [
        (["--lpips"], 1, "Error: LPIPS: no torchvision's VGG16 weights: put vgg16-397923af.pth in"),
        (["--rfid", "--no-lpips"], 1, "Error: rFID: no pytorch-fid's Inception weights: put pt_inception-2015"),
        (["--lpips-weights", str(linear)], 1, "Error: LPIPS: no torchvision's VGG16 weights"),  # named: asked for
        (["--vgg16-weights", str(tmp_path / "none.pth")], 2, "none.pth' does not exist"),
        (["--inception-weights", str(tmp_path / "partial.pth")], 1, "partial.pth: not pytorch-fid's Inception"),
        (["--vgg16-weights", str(inception_file)], 1, f"{inception_file}: not torchvision's VGG16 weights: it lacks"),
    ]
    for options, code, message in cases:
        result = CliRunner().invoke(cli, ["eval", model_dir, shards[0], "--num-workers", "0", *options])
        assert result.exit_code == code, (options, result.output)
        assert message in result.output and "Traceback" not in result.output, (options, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_two_processes_add_up_lpips_and_rfid_as_one_does(model_dir, shards, lpips_files, inception_file, tmp_path):
    """Each process measures its own shard; LPIPS's sums and the features' count, sum and outer products are
    added up across them before the figures are made."""
    weights = weights_options(lpips_files, inception_file)
    proc = launch_two_processes("eval", model_dir, *shards, "--num-workers", "0", "--out", tmp_path / "two", *weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    [(lpips, rfid)] = perceptual_by_hand([model_dir], shards, lpips_files, inception_file)
    assert two["images"] == 13  # process 0 read a.tar's 7 alone: the counts were added up
    assert two["lpips"] == pytest.approx(lpips, rel=1e-5) and two["rfid"] == pytest.approx(rfid, rel=1e-4)
