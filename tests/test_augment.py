"""vqtok encode --augment: the extra views' codes equal the model's on the views made independently, every reader
reads them, resume and refusals, TokenDataset's draw of one view per epoch, and vqtok prior fit training on them."""

import json
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import image_samples, kill_when, read_metrics
from PIL import Image

from vqtok import VQVAE
from vqtok.cli import cli
from vqtok.data import center_crop, decode_image, to_tensor
from vqtok.pretrained import read_header
from vqtok.prior import Prior
from vqtok.tokens import TokenDataset, TokenSettings, TokenStore, read_codes, read_metadata
from vqtok.tokens.format import SETTINGS_NAME, STATS_DIR, codes_array

SIZE = 32  # the crop: 8x8 grids of the conftest's model (stride 4); ten-crop's square is int(1.1 * 32) = 35


def samples_of(shard: int) -> list[dict]:
    return image_samples([f"s{shard}-{j}" for j in range(7)], seed=10 * shard)


@pytest.fixture
def shards(make_shard):
    return [make_shard(f"s-{i:02d}.tar", samples_of(i)) for i in range(3)]


def run_encode(*args):
    return CliRunner().invoke(cli, ["encode", *map(str, args)])


def encode_alone(model, image: Image.Image) -> np.ndarray:
    """The codes (h, w) of one image, encoded by itself."""
    return model.encode(to_tensor(image)[None].float() / 255)[0].numpy()


def ten_crop(image: Image.Image, size: int) -> list[Image.Image]:
    """torchvision's TenCrop(size) of a PIL image: corners (top left, top right, bottom left, bottom right) and
    centre, then the same five of the image mirrored left to right."""
    width, height = image.size
    top, left = int(round((height - size) / 2)), int(round((width - size) / 2))
    corners = [(0, 0), (width - size, 0), (0, height - size), (width - size, height - size), (left, top)]

    def five(picture):
        return [picture.crop((x, y, x + size, y + size)) for x, y in corners]

    return five(image) + five(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def rows_by_key(out) -> dict[str, dict]:
    """key -> {"codes": (h, w), "views": (V, h, w)} of every part file."""
    rows = {}
    for part in sorted(out.glob("part-*.parquet")):
        table = pq.read_table(part)
        codes, views = codes_array(table.column("codes")), codes_array(table.column("aug_codes"), views=True)
        for key, grid, extra in zip(table.column("key").to_pylist(), codes, views, strict=True):
            rows[key] = {"codes": grid, "views": extra}
    return rows


def test_flip_view_is_the_flipped_image_encoded_on_its_own(model_dir, shards, tmp_path):
    plain, flipped = tmp_path / "plain.parquet", tmp_path / "flip.parquet"
    common = ["--model", model_dir, "--image-size", SIZE, "--batch-size", "4", "--num-workers", "1", "--keep", "cls"]
    assert run_encode(*shards, plain, *common).exit_code == 0
    result = run_encode(*shards, flipped, *common, "--augment", "flip")
    assert result.exit_code == 0, result.output

    model = VQVAE.from_pretrained(model_dir)
    rows = rows_by_key(flipped)
    samples = {s["__key__"]: s for i in range(3) for s in samples_of(i)}
    assert sorted(rows) == sorted(samples)
    for key, row in rows.items():
        image = decode_image(samples[key]["png"], SIZE)
        crop = center_crop(image, SIZE)
        assert row["views"].shape == (1, 8, 8)
        assert np.array_equal(row["views"][0], encode_alone(model, crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
        # Here the mirrored crop is also the crop of the mirrored image, pixel for pixel.
        mirrored = center_crop(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), SIZE)
        assert np.array_equal(row["views"][0], encode_alone(model, mirrored))
        assert np.array_equal(row["codes"], encode_alone(model, crop))
    assert any(not np.array_equal(row["codes"], row["views"][0]) for row in rows.values())

    # Without --augment nothing changes: the same columns and values, and settings without augment or views.
    for part in plain.glob("part-*.parquet"):
        table, augmented = pq.read_table(part), pq.read_table(flipped / part.name)
        assert table.column_names == ["key", "shard", "codes", "cls"]
        assert table.equals(augmented.drop_columns(["aug_codes"]))
    meta, augmented_meta = read_metadata(plain), read_metadata(flipped)
    assert {"augment", "views"}.isdisjoint(meta)
    assert {**meta, "augment": "flip", "views": ["flip"]} == augmented_meta
    settings = json.loads((plain / SETTINGS_NAME).read_text())
    assert {"augment", "views"}.isdisjoint(settings)
    assert json.loads((flipped / SETTINGS_NAME).read_text()) == {**settings, "augment": "flip", "views": ["flip"]}


def test_ten_crop_views_are_the_ten_crops_of_a_larger_centre_square(model_dir, shards, tmp_path):
    out = tmp_path / "ten.parquet"
    result = run_encode(*shards[:2], out, "--model", model_dir, "--image-size", SIZE, "--num-workers", "0",
                        "--augment", "ten-crop")  # fmt: skip
    assert result.exit_code == 0, result.output

    model = VQVAE.from_pretrained(model_dir)
    large = int(SIZE * 1.1)
    samples = {s["__key__"]: s for i in range(2) for s in samples_of(i)}
    rows = rows_by_key(out)
    assert sorted(rows) == sorted(samples)
    for key, row in rows.items():
        square = center_crop(decode_image(samples[key]["png"], large), large)
        expected = np.stack([encode_alone(model, crop) for crop in ten_crop(square, SIZE)])
        assert row["views"].shape == (10, 8, 8) and np.array_equal(row["views"], expected)
        assert np.array_equal(row["codes"], encode_alone(model, center_crop(decode_image(samples[key]["png"]), SIZE)))
    meta = read_metadata(out)
    assert meta["augment"] == "ten-crop" and meta["views"][4] == "center" and meta["views"][9] == "flip_center"
    assert len({view.tobytes() for row in rows.values() for view in row["views"]}) > 10  # the crops differ


def test_augmented_dataset_reads_in_every_reader(model_dir, shards, tmp_path, monkeypatch):
    out = tmp_path / "tokens.parquet"
    args = [*shards, out, "--model", model_dir, "--num-workers", "0", "--keep", "cls", "--augment", "flip"]
    assert run_encode(*args).exit_code == 0
    rows = rows_by_key(out)
    keys = sorted(rows)
    codes = np.stack([rows[k]["codes"] for k in keys])  # (21, 4, 4)
    views = np.stack([rows[k]["views"] for k in keys])  # (21, 1, 4, 4)

    import pyarrow.dataset as ds

    table = ds.dataset(out, format="parquet").to_table()
    assert table.num_rows == 21 and table.column_names == ["key", "shard", "codes", "aug_codes", "cls"]

    import pandas as pd

    frame = pd.read_parquet(out).sort_values("key")
    assert np.array_equal(np.stack([np.stack(grid) for grid in frame["codes"]]), codes)
    assert np.array_equal(np.stack([np.stack([np.stack(v) for v in row]) for row in frame["aug_codes"]]), views)

    import polars as pl

    polars_frame = pl.read_parquet(out / "*.parquet").sort("key")
    assert polars_frame["aug_codes"].dtype == pl.Array(pl.UInt16, (1, 4, 4))
    assert np.array_equal(polars_frame["codes"].to_numpy(), codes)
    assert np.array_equal(polars_frame["aug_codes"].to_numpy(), views)

    import duckdb

    found = duckdb.sql(f"select codes, aug_codes from read_parquet('{out}/*.parquet') order by key").fetchall()
    assert np.array_equal(np.array([c for c, _ in found]), codes)
    assert np.array_equal(np.array([v for _, v in found]), views)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train").sort("key")
    numpy_rows = loaded.with_format("numpy")
    assert np.array_equal(np.array(numpy_rows["codes"]), codes)
    assert np.array_equal(np.array(numpy_rows["aug_codes"]), views)

    # vqtok's own readers: the plain grids, one row per image; decode's WebDataset shards carry no views.
    keys_read, codes_read = read_codes(out)
    assert sorted(keys_read) == keys and len(codes_read) == 21
    decoded = CliRunner().invoke(cli, ["decode", str(out), str(tmp_path / "wds"), "--model", model_dir,
                                       "--format", "wds", "--keys", "s1-2"])  # fmt: skip
    assert decoded.exit_code == 0, decoded.output
    import tarfile

    (tar,) = (tmp_path / "wds").glob("*.tar")
    with tarfile.open(tar) as archive:
        assert sorted(archive.getnames()) == ["s1-2.cls", "s1-2.png"]


def test_killed_and_partial_runs_resume_and_other_augment_is_refused(model_dir, make_shard, tmp_path):
    shards = [make_shard(f"k-{i:02d}.tar", image_samples([f"k{i}-{j}" for j in range(4)], seed=i)) for i in range(20)]
    out = tmp_path / "tokens.parquet"
    command = [sys.executable, "-m", "vqtok", "encode", *shards, str(out), "--model", model_dir, "--augment", "flip"]
    command += ["--num-workers", "0", "--batch-size", "2"]
    done_before = kill_when(command, lambda: len(list((out / STATS_DIR).glob("*.json"))), 3)
    assert 3 <= done_before < 20, "the run was not killed mid-way"

    refused = run_encode(*shards, out, "--model", model_dir)
    assert refused.exit_code == 1 and "augment 'flip' -> 'none'" in refused.output and "--overwrite" in refused.output
    refused = run_encode(*shards, out, "--model", model_dir, "--augment", "ten-crop")
    assert refused.exit_code == 1 and "augment 'flip' -> 'ten-crop'" in refused.output

    result = run_encode(*shards[:-1], out, "--model", model_dir, "--augment", "flip", "--num-workers", "0")
    assert result.exit_code == 0 and f"{19 - done_before} encoded, {done_before} already done" in result.output
    result = run_encode(*shards, out, "--model", model_dir, "--augment", "flip", "--num-workers", "0")
    assert result.exit_code == 0 and "1 encoded, 19 already done" in result.output
    rows = rows_by_key(out)  # every part has its views
    assert sorted(rows) == sorted(f"k{i}-{j}" for i in range(20) for j in range(4))
    assert all(row["views"].shape == (1, 4, 4) for row in rows.values())
    assert len(read_codes(out)[0]) == 80 and not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    result = run_encode(*shards[:2], out, "--model", model_dir, "--augment", "ten-crop", "--overwrite")
    assert result.exit_code == 0, result.output
    assert {row["views"].shape for row in rows_by_key(out).values()} == {(10, 4, 4)}


# ---------------------------------------------------------------------------------------------- TokenDataset


@pytest.fixture
def flipped_tokens(model_dir, shards, tmp_path):
    out = tmp_path / "tokens.parquet"
    assert run_encode(*shards, out, "--model", model_dir, "--num-workers", "0", "--augment", "flip").exit_code == 0
    return out


def drawn(dataset, epoch) -> dict[str, tuple[int, np.ndarray]]:
    dataset.set_epoch(epoch)
    return {row["key"]: (row["view"], row["codes"].numpy()) for row in dataset}


def test_token_dataset_draws_one_view_per_epoch(flipped_tokens):
    rows = rows_by_key(flipped_tokens)
    dataset = TokenDataset(flipped_tokens, views=True, shuffle=True, seed=3)
    epochs = [drawn(dataset, epoch) for epoch in range(20)]
    for draws in epochs:
        assert sorted(draws) == sorted(rows)
        for key, (view, codes) in draws.items():
            assert np.array_equal(codes, rows[key]["codes"] if view == 0 else rows[key]["views"][view - 1])
    assert any(not np.array_equal(rows[key]["codes"], rows[key]["views"][0]) for key in rows)

    # The same epoch draws the same views, whatever the order or the split across processes; another epoch not.
    views = [{key: view for key, (view, _) in draws.items()} for draws in epochs]
    again = drawn(TokenDataset(flipped_tokens, views=True, seed=3), 7)
    split = [drawn(TokenDataset(flipped_tokens, views=True, seed=3, rank=r, world_size=2), 7) for r in range(2)]
    for same in (again, {**split[0], **split[1]}):
        assert {key: view for key, (view, _) in same.items()} == views[7]
    assert all(views[e] != views[e + 1] for e in range(19))
    flips = sum(view for draws in views for view in draws.values())  # each view equally likely
    assert flips / (20 * 21) == pytest.approx(0.5, abs=0.15)

    plain = list(TokenDataset(flipped_tokens, shuffle=True, seed=3))  # the default: the plain grids
    assert "view" not in plain[0]
    assert all(np.array_equal(row["codes"].numpy(), rows[row["key"]]["codes"]) for row in plain)


# ---------------------------------------------------------------------------------------------- prior fit

K, PLAIN_CODES, FLIPPED_CODES = 32, range(0, 4), range(4, 8)  # plain grids use codes 0-3, their views 4-7


def write_flipped_tokens(path, tokenizer, rows: int, code_of_view=None):
    """A token dataset as `vqtok encode --augment flip` writes it, whose plain grids hold codes 0-3 and whose
    views hold codes 4-7 (or `code_of_view` everywhere), so that a prior can only learn the latter from views."""
    header = read_header(tokenizer)
    settings = TokenSettings(
        model_id=header["model_id"],
        codebook_size=header["config"]["quantizer"]["codebook_size"],
        grid=(4, 4),
        image_size=header["config"]["image_size"],
        preprocessing="made by the test",
        augment="flip",
    )
    rng = np.random.default_rng(rows)
    codes = rng.integers(PLAIN_CODES.start, PLAIN_CODES.stop, (rows, 4, 4))
    views = rng.integers(FLIPPED_CODES.start, FLIPPED_CODES.stop, (rows, 1, 4, 4))
    if code_of_view is not None:
        views[:] = code_of_view
    store = TokenStore(path, settings)
    store.open(["shard"], ["shard"])
    writer = store.writer("shard")
    writer.add([f"r{i}" for i in range(rows)], codes, {}, views)
    writer.commit({"status": "done"})
    store.finish(["shard"])
    return path


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models gain nothing from threads on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


TINY = ["--layers", "1", "--width", "32", "--heads", "2", "--batch-size", "16", "--num-workers", "0", "--lr", "1e-2"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_prior_fit_trains_on_the_views_and_scores_held_out_plain_grids(model_dir, tmp_path):
    train = write_flipped_tokens(tmp_path / "train.parquet", model_dir, 64)
    val = write_flipped_tokens(tmp_path / "val.parquet", model_dir, 10)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\nlog_every = 5\n")
    priors = {}
    for name, extra in (("views", []), ("plain", ["--plain-only"])):
        out = tmp_path / name
        args = ["prior", "fit", train, "--out", out, "--val", val, "--config", recipe, *TINY, "--steps", "40"]
        result = CliRunner().invoke(cli, [*map(str, args), "--eval-every", "40", *extra])
        assert result.exit_code == 0, result.output
        metrics = read_metrics(out)
        train_logs = [m for m in metrics if "loss" in m]
        assert json.loads((out / "run.json").read_text())["views"] == name.replace("views", "drawn")
        if name == "views":  # both views drawn, about as often, every grid counted
            counts = train_logs[-1]["views_drawn"]
            assert len(counts) == 2 and sum(counts) == 16 * 40 and abs(counts[0] - counts[1]) < 0.2 * 640
        else:
            assert all("views_drawn" not in m for m in train_logs)
        assert [m["grids"] for m in metrics if m["split"] == "val"] == [10]  # held out: one plain grid per row
        priors[name] = Prior.from_pretrained(out / "model")
    resumed = CliRunner().invoke(cli, [*map(str, args), "--resume"])  # the plain run, resumed drawing views
    assert resumed.exit_code == 1 and "views changed" in resumed.output

    # Only the prior trained on views has seen codes 4-7: it gives grids of them far more probability.
    grids = torch.from_numpy(np.random.default_rng(0).integers(4, 8, (32, 4, 4)))
    with torch.no_grad():
        seen, unseen = (priors[name].log_prob(grids, None).mean().item() for name in ("views", "plain"))
    assert seen > unseen + 16, (seen, unseen)


def test_prior_fit_refuses_views_outside_the_codebook(model_dir, tmp_path):
    train = write_flipped_tokens(tmp_path / "train.parquet", model_dir, 8, code_of_view=K + 3)
    result = CliRunner().invoke(cli, ["prior", "fit", str(train), "--out", str(tmp_path / "p"), *TINY])
    assert result.exit_code == 1
    assert "aug_codes: key 'r0' holds code 35, outside [0, 32)" in result.output and "Traceback" not in result.output
