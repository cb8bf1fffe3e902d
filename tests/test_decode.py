"""vqtok decode and vqtok info on token datasets: images equal the model's, refusals, hostile keys, formats."""

import io
import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import webdataset
from click.testing import CliRunner
from conftest import image_samples, launch_two_processes
from PIL import Image

from vqtok import VQVAE, ModelConfig
from vqtok.cli import cli
from vqtok.decode import key_path
from vqtok.tokens import TokenSettings, TokenStore, read_codes
from vqtok.tokens.format import STATS_DIR, grid_array


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture
def tokens(model_dir, make_shard, tmp_path):
    shards = [make_shard(f"d-{i}.tar", image_samples([f"d{i}/img-{j}" for j in range(5)], seed=i)) for i in range(2)]
    out = tmp_path / "tokens.parquet"
    result = invoke("encode", *shards, out, "--model", model_dir, "--num-workers", "0", "--keep", "cls")
    assert result.exit_code == 0, result.output
    return out


def expected_pixels(model_dir, codes: np.ndarray) -> np.ndarray:
    images = VQVAE.from_pretrained(model_dir).decode(torch.from_numpy(codes))
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_decoded_pngs_equal_model_decode(model_dir, tokens, tmp_path):
    out = tmp_path / "images"
    result = invoke("decode", tokens, out, "--model", model_dir, "--batch-size", "3")
    assert result.exit_code == 0, result.output
    assert "decoded 10 images into 10 PNG files" in result.output
    keys, codes = read_codes(tokens)
    expected = expected_pixels(model_dir, codes)
    for key, pixels in zip(keys, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(out / f"{key}.png")), pixels), key  # d0/img-0 keeps its folder
    assert sorted(p.name for p in out.iterdir()) == ["d0", "d1"]


def test_limit_and_keys_choose_rows(model_dir, tokens, tmp_path):
    assert invoke("decode", tokens, tmp_path / "a", "--model", model_dir, "--limit", "3").exit_code == 0
    assert len(list((tmp_path / "a").rglob("*.png"))) == 3
    result = invoke("decode", tokens, tmp_path / "b", "--model", model_dir, "--keys", "d1/img-4,d0/img-2")
    assert result.exit_code == 0, result.output
    assert sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*.png")) == [
        "d0/img-2.png",
        "d1/img-4.png",
    ]
    missing = invoke("decode", tokens, tmp_path / "c", "--model", model_dir, "--keys", "d0/img-2,nope")
    assert missing.exit_code == 1 and "1 key not in the tokens: nope" in missing.output


def other_model(tmp_path, name, **config):
    torch.manual_seed(1)
    base = {"hidden_channels": 8, "codebook_size": 32, "code_dim": 4, "image_size": 16}
    return str(VQVAE(ModelConfig.from_dict({**base, **config})).save_pretrained(tmp_path / name))


def test_codes_of_another_model_are_refused(model_dir, tokens, tmp_path):
    same_shape = other_model(tmp_path, "same-shape")
    result = invoke("decode", tokens, tmp_path / "x", "--model", same_shape)
    assert result.exit_code == 1 and "were made by model" in result.output and "--force" in result.output
    assert not (tmp_path / "x").exists()
    forced = invoke("decode", tokens, tmp_path / "x", "--model", same_shape, "--force")
    assert forced.exit_code == 0, forced.output

    bigger_codebook = other_model(tmp_path, "k64", codebook_size=64)
    result = invoke("decode", tokens, tmp_path / "y", "--model", bigger_codebook, "--force")
    assert result.exit_code == 1 and "codebook of 32 entries; this model has 64" in result.output
    other_grid = other_model(tmp_path, "stride8", num_downsamples=3)
    result = invoke("decode", tokens, tmp_path / "z", "--model", other_grid, "--force")
    assert result.exit_code == 1 and "4x4 grids of 16px images; this model makes 2x2" in result.output


def write_prior_samples(path, keys, codes):
    """A Parquet file as a prior's sampler would write it: key and codes only, no vqtok metadata."""
    pd.DataFrame({"key": keys, "codes": [[list(row) for row in grid] for grid in codes]}).to_parquet(path)
    return path


def test_a_code_out_of_range_is_refused_naming_its_key(model_dir, tmp_path):
    codes = np.zeros((3, 4, 4), dtype=np.int64)
    codes[2, 1, 1] = 32
    samples = write_prior_samples(tmp_path / "s.parquet", ["a", "b", "c"], codes)
    result = invoke("decode", samples, tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 1 and "key 'c' holds code 32, outside [0, 32)" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "frame, message",
    [
        (pd.DataFrame({"key": ["a"], "grid": [[[1]]]}), "no 'codes' column"),
        (pd.DataFrame({"key": ["a"], "codes": [[1, 2, 3]]}), r"\(h, w\) grids of integers"),
        (pd.DataFrame({"key": ["a"], "codes": [[[[1]]]]}), r"\(h, w\) grids of integers"),
    ],
    ids=["no codes column", "rank 1", "rank 3"],
)
def test_files_without_grids_are_refused(model_dir, tmp_path, frame, message):
    frame.to_parquet(tmp_path / "bad.parquet")
    result = invoke("decode", tmp_path / "bad.parquet", tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert re.search(message, result.output), result.output


def test_hostile_keys_never_write_outside_out(model_dir, tmp_path):
    keys = ["../../escape", "/abs/path", "a/../../b", "dir/name", "a//b", "a/b", ".", "..", "", "x\x00y", "%2E%2E"]
    codes = np.random.default_rng(0).integers(0, 32, (len(keys), 4, 4))
    samples = write_prior_samples(tmp_path / "samples.parquet", keys, codes)
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    result = invoke("decode", samples, out, "--model", model_dir)
    assert result.exit_code == 0, result.output
    written = set(tmp_path.rglob("*")) - before
    outside = [p for p in written if out not in p.parents and p != out and p != out.parent]
    assert outside == []
    pngs = sorted(p for p in written if p.suffix == ".png")
    assert len(pngs) == len(keys)  # no two keys share a file
    assert (out / "dir" / "name.png").exists() and (out / "abs" / "path.png").exists()
    assert "1 key mapped to a name another key had taken" in result.output
    assert all(".." not in p.relative_to(out).parts for p in pngs)


def test_key_path_keeps_folders_and_escapes_the_rest():
    assert str(key_path("dir/sub/name")) == "dir/sub/name"
    assert str(key_path("../../x")) == "%2E%2E/%2E%2E/x"
    assert str(key_path("/abs//x/./y")) == "abs/x/%2E/y"
    assert str(key_path("img.001")) == "img%2E001"  # no dots: WebDataset splits names at the first one
    assert str(key_path("50%\\a")) == "50%25%5Ca"
    assert len(str(key_path("n" * 1000))) < 220


def test_wds_output_reads_back_with_webdataset(model_dir, tokens, tmp_path):
    out = tmp_path / "wds"
    result = invoke("decode", tokens, out, "--model", model_dir, "--format", "wds")
    assert result.exit_code == 0, result.output
    keys, codes = read_codes(tokens)
    expected = dict(zip(keys, expected_pixels(model_dir, codes), strict=True))
    samples = list(webdataset.WebDataset(str(out / "decoded-000000.tar"), shardshuffle=False).decode("rgb8"))
    assert sorted(s["__key__"] for s in samples) == sorted(keys)
    for sample in samples:
        assert np.array_equal(sample["png"], expected[sample["__key__"]])
        assert int(sample["cls"]) == int(sample["__key__"].rsplit("-", 1)[1])


def test_single_parquet_file_with_key_and_codes_only(model_dir, tmp_path):
    codes = np.random.default_rng(1).integers(0, 32, (4, 4, 4))
    samples = write_prior_samples(tmp_path / "samples.parquet", ["s0", "s1", "s2", "s3"], codes)
    result = invoke("decode", samples, tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 0, result.output
    expected = expected_pixels(model_dir, codes)
    for i in range(4):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"s{i}.png")), expected[i])


def test_info_reports_a_token_dataset(tmp_path):
    settings = TokenSettings("m1", codebook_size=8, grid=(2, 2), image_size=8, preprocessing="crop")
    store = TokenStore(tmp_path / "t", settings)
    store.open(["a.tar", "b.tar"], ["a.tar", "b.tar"])
    codes = np.array([[[0, 1], [2, 3]], [[0, 0], [1, 1]], [[0, 0], [0, 0]], [[1, 1], [1, 1]]])  # codes 0-3 of 8
    for shard, rows in (("a.tar", codes[:3]), ("b.tar", codes[3:])):
        writer = store.writer(shard)
        writer.add([f"{shard}-{i}" for i in range(len(rows))], rows)
        writer.add_errors([("bad", "not an image")])
        writer.commit({"status": "done"})
    result = invoke("info", tmp_path / "t", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    counts = np.bincount(codes.ravel(), minlength=8)  # 0: 7, 1: 7, 2: 1, 3: 1 of 16
    p = counts[counts > 0] / 16
    entropy = -(p * np.log2(p)).sum()
    assert (info["rows"], info["shards"], info["errors"], info["grid"]) == (4, 2, 2, [2, 2])
    assert (info["codebook_size"], info["model_id"], info["codes_used"], info["usage"]) == (8, "m1", 4, 0.5)
    assert info["bits_per_code"] == pytest.approx(entropy) and info["perplexity"] == pytest.approx(2**entropy)
    data_bytes = sum(f.stat().st_size for f in (tmp_path / "t").glob("part-*.parquet"))
    assert info["bytes_per_image"] == pytest.approx(data_bytes / 4)
    assert info["complete"] is False  # finish() was never called: no _SUCCESS
    store.finish(["a.tar", "b.tar"])
    table = invoke("info", tmp_path / "t")
    assert table.exit_code == 0 and "│ yes" in table.output and "50.0%" in table.output


def test_decode_writes_nothing_half_done(model_dir, tokens, tmp_path):
    out = tmp_path / "images"
    assert invoke("decode", tokens, out, "--model", model_dir).exit_code == 0
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    assert all(os.path.getsize(p) > 0 for p in out.rglob("*.png"))


def test_a_code_out_of_range_in_a_token_dataset_is_refused(model_dir, tmp_path):
    """vqtok's own files are vouched for by their statistics; a code beyond K must still be caught."""
    model = VQVAE.from_pretrained(model_dir)
    settings = TokenSettings(model.model_id, codebook_size=32, grid=(4, 4), image_size=16, preprocessing="crop")
    store = TokenStore(tmp_path / "t", settings)
    store.open(["a.tar"], ["a.tar"])
    codes = np.zeros((5, 4, 4), dtype=np.int64)
    codes[3, 2, 2] = 40
    writer = store.writer("a.tar")
    writer.add([f"k{i}" for i in range(5)], codes)
    writer.commit({"status": "done"})
    result = invoke("decode", tmp_path / "t", tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 1 and "key 'k3' holds code 40, outside [0, 32)" in result.output
    assert not (tmp_path / "out").exists()


def test_clashing_names_each_keep_their_image(model_dir, tmp_path):
    keys = ["x", "x", "x", "A", "a", "a", "a.png/b", "caf\u00e9", "cafe\u0301"]  # repeats, case, a file-like folder
    codes = np.random.default_rng(2).integers(0, 32, (len(keys), 4, 4))
    samples = write_prior_samples(tmp_path / "s.parquet", keys, codes)
    result = invoke("decode", samples, tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 0, result.output
    pngs = list((tmp_path / "out").rglob("*.png"))
    assert len({p.as_posix().casefold() for p in pngs}) == len(keys)  # distinct even where case is ignored
    assert "5 keys mapped to a name another key had taken" in result.output


def test_a_symlink_inside_out_cannot_lead_outside(model_dir, tmp_path):
    outside, out = tmp_path / "elsewhere", tmp_path / "out"
    outside.mkdir()
    out.mkdir()
    (out / "link").symlink_to(outside)
    samples = write_prior_samples(tmp_path / "s.parquet", ["link/new/x"], np.zeros((1, 4, 4), dtype=np.int64))
    result = invoke("decode", samples, out, "--model", model_dir)
    assert result.exit_code == 1 and "leads outside" in result.output
    assert list(outside.iterdir()) == []


def test_keys_that_are_not_strings_are_refused(model_dir, tmp_path):
    pd.DataFrame({"key": [1, 2], "codes": [[[0] * 4] * 4] * 2}).to_parquet(tmp_path / "s.parquet")
    result = invoke("decode", tmp_path / "s.parquet", tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 1 and "keys must be strings" in result.output


def test_every_file_of_a_folder_is_checked_against_the_model(model_dir, tokens, tmp_path):
    other = other_model(tmp_path, "other")
    samples = tmp_path / "other-tokens"
    encoded = invoke("encode", tokens.parent / "d-0.tar", samples, "--model", other, "--num-workers", "0")
    assert encoded.exit_code == 0, encoded.output
    foreign = next(samples.glob("part-*.parquet"))
    (tokens / "part-zzz.parquet").write_bytes(foreign.read_bytes())  # sorts last: the first file is fine
    result = invoke("decode", tokens, tmp_path / "plain", "--model", model_dir)  # no commit marker: not read
    assert result.exit_code == 0 and "1 part file without a commit marker" in result.output
    (tokens / STATS_DIR / "part-zzz.json").write_bytes(next((samples / STATS_DIR).glob("*.json")).read_bytes())
    result = invoke("decode", tokens, tmp_path / "out", "--model", model_dir)
    assert result.exit_code == 1 and "hold codes of different tokenizers (model_id" in result.output
    assert not (tmp_path / "out").exists()
    (tokens / "part-zzz.parquet").unlink()
    result = invoke("decode", samples, tmp_path / "out", "--model", model_dir)  # the other model's alone
    assert result.exit_code == 1 and "were made by model" in result.output


def test_wds_keys_with_dots_read_back_whole(model_dir, tmp_path):
    samples = write_prior_samples(tmp_path / "s.parquet", ["img.001", "img.002"], np.zeros((2, 4, 4), dtype=int))
    assert invoke("decode", samples, tmp_path / "out", "--model", model_dir, "--format", "wds").exit_code == 0
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["decoded-000000.tar"]  # no temporary left
    read = list(webdataset.WebDataset(str(tmp_path / "out" / "decoded-000000.tar"), shardshuffle=False))
    assert sorted(s["__key__"] for s in read) == ["img%2E001", "img%2E002"]


def write_vouched_grids(path, keys, codes):
    """A Parquet file of fixed-size uint16 grids, as vqtok writes them: its statistics vouch for every code, so
    decode reads its rows only batch by batch (keys may be None)."""
    pq.write_table(pa.table({"key": pa.array(keys, pa.string()), "codes": grid_array(codes, pa.uint16())}), path)
    return path


def shard_samples(path) -> dict[str, bytes]:
    """A tar shard's samples: key -> the PNG's bytes."""
    return {s["__key__"]: s["png"] for s in webdataset.WebDataset(str(path), shardshuffle=False)}


def test_a_failed_wds_decode_leaves_only_whole_shards(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("vqtok.decode.WDS_SHARD_SAMPLES", 4)
    codes = np.random.default_rng(3).integers(0, 32, (12, 4, 4))
    keys = [f"k{i}" for i in range(12)]
    keys[10] = None  # in the fourth batch of three: found once shards 0 and 1 are full and shard 2 has begun
    samples = write_vouched_grids(tmp_path / "s.parquet", keys, codes)
    out = tmp_path / "out"
    result = invoke("decode", samples, out, "--model", model_dir, "--format", "wds", "--batch-size", "3")
    assert result.exit_code == 1 and "a row has no key" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["decoded-000000.tar", "decoded-000001.tar"]  # no temporary
    expected = expected_pixels(model_dir, codes)
    for n in range(2):
        written = shard_samples(out / f"decoded-{n:06d}.tar")
        assert list(written) == keys[4 * n : 4 * n + 4]
        for i, key in enumerate(written, start=4 * n):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(written[key]))), expected[i]), key


# More rows than a batch, and keys that map to one name ("a/b" and "a//b", "A" and "a") in batches that
# different processes decode: batch i of 2 rows goes to process i % 2.
SPLIT_KEYS = ["a/b", "A", "a//b", "a", "x/0", "x/1", "x/2", "x/3", "x/4", "x/5", "x/6"]


@pytest.mark.parametrize("format_", ["png", "wds"])
def test_two_processes_write_each_image_once_as_one_would(model_dir, tmp_path, format_):
    codes = np.random.default_rng(4).integers(0, 32, (len(SPLIT_KEYS), 4, 4))
    samples = write_prior_samples(tmp_path / "s.parquet", SPLIT_KEYS, codes)
    decode = ["decode", samples, "--model", model_dir, "--format", format_, "--batch-size", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    alone = invoke(*decode[:2], one, *decode[2:])
    assert alone.exit_code == 0, alone.output
    proc = launch_two_processes(*decode[:2], two, *decode[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]

    printed = proc.stdout + proc.stderr
    what = "PNG files" if format_ == "png" else "WebDataset shard"  # 6 and 5 PNGs, or a shard each
    files = (6, 5) if format_ == "png" else (1, 1)
    for rank, (images, n) in enumerate(zip((6, 5), files, strict=True)):  # batches 0, 2, 4 and 1, 3, 5
        assert f"decoded {images} images into {n} {what} under {two} (process {rank} of 2)" in printed, printed
    assert printed.count("2 keys mapped to a name another key had taken") == 1  # the note comes from rank 0

    if format_ == "png":
        pngs = {p.relative_to(one): p.read_bytes() for p in one.rglob("*.png")}
        assert len(pngs) == len(SPLIT_KEYS)
        assert {p.relative_to(two): p.read_bytes() for p in two.rglob("*.png")} == pngs  # names and bytes
        assert not [p for p in two.rglob("*") if p.name.startswith(".")]
    else:
        assert sorted(p.name for p in two.iterdir()) == ["decoded-r000-000000.tar", "decoded-r001-000000.tar"]
        shards = [shard_samples(two / f"decoded-r00{rank}-000000.tar") for rank in range(2)]
        assert not set(shards[0]) & set(shards[1])  # each key in one shard
        assert {**shards[0], **shards[1]} == shard_samples(one / "decoded-000000.tar")


def test_a_process_without_a_batch_writes_no_shard(model_dir, tmp_path, monkeypatch):
    samples = write_prior_samples(tmp_path / "s.parquet", ["a", "b"], np.zeros((2, 4, 4), dtype=np.int64))
    monkeypatch.setenv("RANK", "1")  # as the launcher sets them: the one batch is process 0's
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("decode", samples, tmp_path / "out", "--model", model_dir, "--format", "wds")
    assert result.exit_code == 0, result.output
    assert "decoded 0 images into 0 WebDataset shards" in result.output and "(process 1 of 2)" in result.output
    assert list((tmp_path / "out").iterdir()) == []
