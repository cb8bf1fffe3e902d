"""vqtok encode: codes equal to the model's, every sample accounted for, resume, several processes, readers."""

import json
import re
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import bad_samples, broken_copy, image_samples, kill_when, killed_progress, launch_two_processes

from vqtok import VQVAE
from vqtok.cli import cli
from vqtok.data import center_crop, decode_image, to_tensor
from vqtok.tokens import UnfinishedDataset, read_codes, read_errors, read_metadata
from vqtok.tokens.format import STATS_DIR, SUCCESS_NAME, part_name


@pytest.fixture
def shards(make_shard):
    return [make_shard(f"s-{i:02d}.tar", image_samples([f"s{i}-{j}" for j in range(7)], seed=10 * i)) for i in range(3)]


def run_encode(*args):
    return CliRunner().invoke(cli, ["encode", *map(str, args)])


def reference_codes(model_dir, samples, size=16):
    model = VQVAE.from_pretrained(model_dir)
    images = torch.stack([to_tensor(center_crop(decode_image(s["png"], size), size)) for s in samples])
    return model.encode(images.float() / 255).numpy()


def test_codes_equal_model_encode_on_the_same_images(model_dir, shards, tmp_path):
    out = tmp_path / "tokens.parquet"
    result = run_encode(*shards, out, "--model", model_dir, "--batch-size", "3", "--num-workers", "2", "--keep", "cls")
    assert result.exit_code == 0, result.output
    assert "3 encoded" in result.output and "21 encoded, 0 errors" in result.output

    keys, codes = read_codes(out)
    samples = {s["__key__"]: s for i in range(3) for s in image_samples([f"s{i}-{j}" for j in range(7)], seed=10 * i)}
    assert sorted(keys) == sorted(samples)
    assert np.array_equal(codes, reference_codes(model_dir, [samples[k] for k in keys]))
    assert len(np.unique(codes)) > 4

    table = pq.read_table(out / f"{part_name(shards[1])}.parquet")
    assert table.column("key").to_pylist() == [f"s1-{j}" for j in range(7)]  # shard order kept
    assert table.column("cls").to_pylist() == list(range(7))
    meta = read_metadata(out)
    assert meta["model_id"] == VQVAE.from_pretrained(model_dir).model_id
    assert (meta["codebook_size"], meta["grid"], meta["image_size"], meta["keep"]) == (32, [4, 4], 16, ["cls"])
    assert json.loads((out / SUCCESS_NAME).read_text())["rows"] == 21
    markers = [json.loads(p.read_text()) for p in (out / STATS_DIR).iterdir()]
    assert {m["status"] for m in markers} == {"done"} and sum(m["samples"] for m in markers) == 21
    assert all(set(m["seconds"]) == {"read", "encode", "write"} for m in markers)


def test_every_sample_is_a_row_of_codes_or_of_errors(model_dir, make_shard, tmp_path):
    good = image_samples(["g0", "g1", "g2", "g3"])
    mixed = make_shard("mixed.tar", [good[0], *bad_samples(), good[1]])
    whole = make_shard("whole.tar", image_samples(["w0", "w1", "w2", "w3"], seed=5))
    cut = make_shard("cut.tar", [good[2], good[3], *image_samples(["c2"])])
    with tarfile.open(cut) as tar:
        g3 = tar.getmember("g3.png")
    truncated = broken_copy(cut, cut=g3.offset_data + g3.size // 2)  # inside the second sample's image
    out = tmp_path / "tokens.parquet"

    result = run_encode(mixed, truncated, whole, out, "--model", model_dir, "--num-workers", "0")
    assert result.exit_code == 1
    assert f"Error: 1 shard could not be read to the end: {truncated} (" in result.output
    with pytest.raises(UnfinishedDataset, match="2 of 3 shards done, 1 failed"):
        read_codes(out)
    keys, _ = read_codes(out, partial=True)  # a failed shard's readable rows are committed too
    errors = read_errors(out).to_pylist()
    assert sorted(keys) == ["g0", "g1", "g2", "w0", "w1", "w2", "w3"]  # the cut shard keeps what came before
    assert sorted(e["key"] for e in errors) == ["bomb", "empty", "g3", "label-only", "text", "truncated"]
    broke_in = next(e for e in errors if e["key"] == "g3")  # the sample being read when the tar broke
    assert broke_in["shard"] == truncated and "unreadable after 1 complete samples" in broke_in["reason"]
    assert not (out / SUCCESS_NAME).exists()

    # A rerun retries only the failed shard.
    result = run_encode(mixed, truncated, whole, out, "--model", model_dir, "--num-workers", "0")
    assert result.exit_code == 1 and "1 encoded, 2 already done, 1 failed" in result.output
    assert sorted(read_codes(out, partial=True)[0]) == sorted(keys) and len(read_errors(out)) == len(errors)


def test_rerun_skips_done_shards_and_refuses_other_settings(model_dir, shards, tmp_path):
    out = tmp_path / "tokens.parquet"
    assert run_encode(*shards[:2], out, "--model", model_dir, "--num-workers", "0").exit_code == 0
    result = run_encode(*shards, out, "--model", model_dir, "--num-workers", "0")
    assert result.exit_code == 0 and "1 encoded, 2 already done" in result.output
    assert len(read_codes(out)[0]) == 21

    refused = run_encode(*shards, out, "--model", model_dir, "--image-size", "32")
    assert refused.exit_code == 1
    assert (
        "other settings (grid (4, 4) -> (8, 8); image_size 16 -> 32)" in refused.output
        and "--overwrite" in refused.output
    )
    result = run_encode(shards[0], out, "--model", model_dir, "--image-size", "32", "--overwrite", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    keys, codes = read_codes(out)
    assert len(keys) == 7 and codes.shape == (7, 8, 8)


def test_bf16_codes_mostly_agree_with_fp32(model_dir, shards, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.parquet"
        result = run_encode(*shards, out, "--model", model_dir, "--num-workers", "0", "--precision", precision)
        assert result.exit_code == 0, result.output
        runs[precision] = read_codes(out)
    assert runs["fp32"][0] == runs["bf16"][0]
    assert (runs["fp32"][1] == runs["bf16"][1]).mean() > 0.8


BAD_ARGUMENTS = [
    (["--image-size", "18"], "not a positive multiple of the model's stride 4"),
    (["--keep", "codes"], "cannot carry field 'codes'"),
    (["--keep", "a b"], "use letters, digits"),
]
if not torch.cuda.is_available():
    BAD_ARGUMENTS.append((["--device", "cuda"], "no CUDA GPU"))


@pytest.mark.parametrize("args, message", BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_errors(model_dir, shards, tmp_path, args, message):
    result = run_encode(*shards, tmp_path / "t", "--model", model_dir, *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_missing_shards_are_one_line_errors(model_dir, tmp_path):
    result = run_encode(tmp_path / "nothing-*.tar", tmp_path / "t", "--model", model_dir)
    assert result.exit_code == 1 and "no files match" in result.output


def test_two_processes_give_the_rows_of_one(model_dir, shards, tmp_path):
    one = tmp_path / "one.parquet"
    assert run_encode(*shards, one, "--model", model_dir, "--num-workers", "0").exit_code == 0
    two = tmp_path / "two.parquet"
    proc = launch_two_processes("encode", *shards, two, "--model", model_dir, "--num-workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert sorted(p.name for p in two.glob("part-*")) == sorted(p.name for p in one.glob("part-*"))
    for part in one.glob("part-*.parquet"):
        assert pq.read_table(part).equals(pq.read_table(two / part.name))
    markers = [json.loads(p.read_text()) for p in (two / STATS_DIR).iterdir()]
    assert sorted(m["process"] for m in markers) == [0, 0, 1]  # shard i went to process i % 2
    assert (two / SUCCESS_NAME).exists()


def test_killed_run_reruns_to_every_key_exactly_once(model_dir, make_shard, tmp_path):
    shards = [make_shard(f"k-{i:02d}.tar", image_samples([f"k{i}-{j}" for j in range(6)], seed=i)) for i in range(40)]
    out = tmp_path / "tokens.parquet"
    command = [sys.executable, "-m", "vqtok", "encode", *shards, str(out), "--model", model_dir]
    command += ["--num-workers", "0", "--batch-size", "2"]
    done_before = kill_when(command, lambda: len(list((out / STATS_DIR).glob("*.json"))), 3)
    assert 3 <= done_before < 40, "the run was not killed mid-way"

    progress = re.escape(killed_progress(out, done_before, 40))
    with pytest.raises(UnfinishedDataset, match=rf"unfinished: {progress}\. Run .* --partial"):
        read_codes(out)  # a reader that trains on it is told, rather than given a part of it
    keys, _ = read_codes(out, partial=True)  # the committed shards, whole
    assert len(keys) == 6 * done_before and len(keys) == len(set(keys))
    assert len(keys) % 6 == 0 and len(keys) == len(set(keys))
    result = run_encode(*shards, out, "--model", model_dir, "--num-workers", "0")
    assert result.exit_code == 0, result.output
    keys, _ = read_codes(out)
    assert sorted(keys) == sorted(f"k{i}-{j}" for i in range(40) for j in range(6))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.usefixtures("offline_datasets")
def test_the_progress_bar_and_the_summary_count_what_the_inputs_hold(model_dir, make_shard, tmp_path):
    """The bar counts shards, slices of a folder or Parquet files (parts when the inputs mix them); the summary's
    counts read as English does: 1 part, 1 error."""
    from conftest import class_images, write_hf_parquet, write_image_folder

    shard = make_shard("a.tar", [*image_samples(["a0", "a1"]), {"__key__": "empty", "png": b""}])
    folder = write_image_folder(tmp_path / "photos", class_images(per_class=2))
    parquet = write_hf_parquet(tmp_path / "hf", class_images(per_class=1), files=1) / "data"
    for inputs, counted in (([shard], "shards"), ([folder], "folder slices"), ([parquet], "Parquet files")):
        out = tmp_path / f"{counted}.parquet"
        result = CliRunner(env={"COLUMNS": None}).invoke(
            cli, ["encode", *map(str, inputs), str(out), "--model", model_dir]
        )
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"encode {counted} ━"), result.output
    mixed = run_encode(shard, folder, tmp_path / "mixed.parquet", "--model", model_dir)
    assert mixed.output.startswith("encode parts ━"), mixed.output
    summary = CliRunner(env={"COLUMNS": None}).invoke(
        cli, ["encode", shard, str(tmp_path / "one.parquet"), "--model", model_dir]
    )
    assert "2 encoded, 1 error " in summary.output and "2 rows, 1 error in 1 part " in summary.output


def test_token_dataset_reads_in_every_reader(model_dir, shards, tmp_path, monkeypatch):
    out = tmp_path / "tokens.parquet"
    assert run_encode(*shards, out, "--model", model_dir, "--num-workers", "0", "--keep", "cls").exit_code == 0
    _, expected = read_codes(out)
    first = expected[np.argsort(read_codes(out)[0])]

    import pyarrow.dataset as ds

    table = ds.dataset(out, format="parquet").to_table()
    assert table.num_rows == 21 and len(table.column("codes")[0]) == 4

    import pandas as pd

    frame = pd.read_parquet(out).sort_values("key")
    assert np.array_equal(np.stack([np.stack(grid) for grid in frame["codes"]]), first)

    import polars as pl

    polars_frame = pl.read_parquet(out / "*.parquet").sort("key")
    assert polars_frame["codes"].dtype == pl.Array(pl.UInt16, (4, 4))
    assert np.array_equal(polars_frame["codes"].to_numpy(), first)

    import duckdb

    rows = duckdb.sql(f"select key, codes from read_parquet('{out}/*.parquet') order by key").fetchall()
    assert len(rows) == 21 and np.array_equal(np.array([codes for _, codes in rows]), first)

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(out / "*.parquet"), split="train").sort("key")
    assert np.array_equal(np.array(loaded.with_format("numpy")["codes"]), first)
    assert loaded.features["cls"].dtype == "int64"
