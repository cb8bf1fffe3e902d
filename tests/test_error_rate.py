"""A run that encodes or evaluates nothing fails: every sample failed, or more than --max-error-rate of them."""

import json

import pytest
from click.testing import CliRunner
from conftest import (
    class_images,
    image_samples,
    launch_two_processes,
    write_image_folder,
    write_path_only_parquet,
)

from vqtok.cli import cli
from vqtok.encode import RETRY, encode
from vqtok.errors import TooManyErrors
from vqtok.tokens import read_codes, read_errors
from vqtok.tokens.format import STATS_DIR, SUCCESS_NAME

HINT = "(a path inside a file is read only with --image-root DIR)"


pytestmark = pytest.mark.usefixtures("offline_datasets")


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def error_line(output: str) -> str:
    """The one line the command failed with (a progress bar may come before it)."""
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.fixture
def path_only(tmp_path):
    """Three images and a Parquet file that names them by relative paths, as `datasets` writes it."""
    images = class_images(("a",), per_class=3)
    root = write_image_folder(tmp_path / "images", images)
    parquet = write_path_only_parquet(tmp_path / "paths.parquet", [f"{key}.png" for key in images], folder=root)
    return root, parquet


def test_an_encode_whose_every_sample_failed_exits_non_zero_and_overwrite_redoes_it(model_dir, path_only, tmp_path):
    root, parquet = path_only
    out = tmp_path / "tokens.parquet"
    result = invoke("encode", parquet, out, "--model", model_dir, "--num-workers", "0")
    assert result.exit_code == 1
    line = error_line(result.output)
    assert line.startswith(
        f"Error: none of the 3 samples could be encoded; the commonest reason (3 samples): "
        f"only a path, no image bytes: a/0.png {HINT}. "
    )
    assert line.endswith("after fixing the cause, run again with --overwrite")
    # What was written stays valid: the shard is committed, its samples rows of _errors/, and no _SUCCESS.
    assert [e["reason"] for e in read_errors(out).to_pylist()] == [
        f"only a path, no image bytes: a/{i}.png {HINT}" for i in range(3)
    ]
    assert [json.loads(p.read_text())["status"] for p in (out / STATS_DIR).iterdir()] == ["done"]
    assert not (out / SUCCESS_NAME).exists() and read_codes(out, partial=True)[0] == []

    # A plain rerun skips the shard, done, but judges the whole dataset: it fails as the first run did, even
    # with the root given, since the shard is not read again; --overwrite with the root encodes it.
    for extra in ([], ["--image-root", root]):
        rerun = invoke("encode", parquet, out, "--model", model_dir, "--num-workers", "0", *extra)
        assert rerun.exit_code == 1
        assert error_line(rerun.output) == (
            f"Error: none of the 3 samples could be encoded into {out}; the commonest reason (3 samples): "
            f"only a path, no image bytes: a/0.png {HINT}. {RETRY}"
        )
        assert not (out / SUCCESS_NAME).exists()
    args = ["--image-root", root, "--overwrite", "--num-workers", "0"]
    redone = invoke("encode", parquet, out, "--model", model_dir, *args)
    assert redone.exit_code == 0, redone.output
    assert read_codes(out)[0] == ["paths/0", "paths/1", "paths/2"] and len(read_errors(out)) == 0
    assert (out / SUCCESS_NAME).exists()


def test_the_share_of_errors_a_run_may_have(model_dir, make_shard, tmp_path):
    broken = [{"__key__": "t1", "jpg": b"hello"}, {"__key__": "t2", "png": b"nope"}]
    shard = make_shard("mixed.tar", [*image_samples(["g0", "g1", "g2"]), *broken])  # 2 of 5 fail
    common = ["--model", model_dir, "--num-workers", "0"]

    assert invoke("encode", shard, tmp_path / "default.parquet", *common).exit_code == 0
    refused = invoke("encode", shard, tmp_path / "strict.parquet", *common, "--max-error-rate", "0.3")
    assert refused.exit_code == 1
    assert error_line(refused.output).startswith(
        "Error: 2 of 5 samples could not be encoded, more than --max-error-rate 0.3; "
        "the commonest reason (2 samples): not an image. "
    )
    assert len(read_codes(tmp_path / "strict.parquet", partial=True)[0]) == 3  # the shard's good rows are kept
    assert invoke("encode", shard, tmp_path / "exact.parquet", *common, "--max-error-rate", "0.4").exit_code == 0

    all_broken = make_shard("broken.tar", broken)
    everything = invoke("encode", all_broken, tmp_path / "all.parquet", *common, "--max-error-rate", "1")
    assert everything.exit_code == 1 and "none of the 2 samples could be encoded" in everything.output
    outside = invoke("encode", shard, tmp_path / "x.parquet", *common, "--max-error-rate", "1.5")
    assert outside.exit_code == 2 and "1.5 is not in the range 0<=x<=1" in outside.output


def test_the_process_that_finishes_judges_the_whole_dataset(model_dir, make_shard, tmp_path, monkeypatch):
    """Two processes: rank 0's shard all failed and it stopped; rank 1's own samples are fine, but it finds
    every shard done and must not write _SUCCESS over the other's errors."""
    broken = make_shard("0-broken.tar", [{"__key__": f"t{i}", "jpg": b"hello"} for i in range(3)])
    good = make_shard("1-good.tar", image_samples(["g0"]))
    out = tmp_path / "tokens.parquet"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        with pytest.raises(TooManyErrors) as raised:
            encode([str(broken), str(good)], out, model_dir, num_workers=0, show_progress=False)
        assert not (out / SUCCESS_NAME).exists()
    assert str(raised.value).startswith(
        f"3 of 4 samples could not be encoded into {out}, more than --max-error-rate 0.5; "
        "the commonest reason (3 samples): not an image"
    )
    assert len(read_codes(out, partial=True)[0]) == 1 and len(read_errors(out)) == 3


def test_a_run_stops_once_1000_samples_show_too_many_errors(model_dir, tmp_path):
    parquets = tmp_path / "paths"
    parquets.mkdir()
    image = write_image_folder(tmp_path / "images", class_images(("a",), per_class=1)) / "a" / "0.png"
    for i in range(3):  # 600 path-only rows each: the share is judged after the second file, at 1,200 samples
        write_path_only_parquet(parquets / f"part-{i}.parquet", [str(image)] * 600)
    out = tmp_path / "tokens.parquet"
    with pytest.raises(TooManyErrors, match=r"^none of the 1,200 samples could be encoded \(stopped early\);"):
        encode([str(parquets)], out, model_dir, num_workers=0, show_progress=False)
    markers = sorted(p.name for p in (out / STATS_DIR).iterdir())
    assert len(markers) == 2 and len(read_errors(out)) == 1200  # the third file was never started


def test_eval_fails_on_broken_inputs_and_names_the_reason(model_dir, make_shard, path_only):
    root, parquet = path_only
    result = invoke("eval", model_dir, parquet, "--num-workers", "0")
    assert result.exit_code == 1
    assert error_line(result.output) == (
        f"Error: {parquet}: no image to evaluate (3 samples could not be decoded); the commonest reason "
        f"(3 samples): only a path, no image bytes: a/0.png {HINT}"
    )
    read = invoke("eval", model_dir, parquet, "--image-root", root, "--num-workers", "0", "--json")
    assert read.exit_code == 0 and json.loads(read.output)["images"] == 3

    broken = [{"__key__": f"t{i}", "jpg": b"hello"} for i in range(3)]
    shard = make_shard("mixed.tar", [*image_samples(["g0", "g1"]), *broken])  # 3 of 5 fail
    refused = invoke("eval", model_dir, shard, "--num-workers", "0")
    assert refused.exit_code == 1
    assert error_line(refused.output) == (
        "Error: 3 of 5 samples could not be evaluated, more than --max-error-rate 0.5; "
        "the commonest reason (3 samples): not an image"
    )
    allowed = invoke("eval", model_dir, shard, "--num-workers", "0", "--max-error-rate", "0.6", "--json")
    assert allowed.exit_code == 0, allowed.output
    report = json.loads(allowed.output)
    assert (report["images"], report["errors"]) == (2, 3)


def test_eval_under_two_processes_judges_every_process_at_the_end(model_dir, make_shard):
    """Process 0 sees 1,000 failures, enough to stop a lone process early; stopping alone would leave process
    1 in all_reduce (gloo then fails it with "Connection closed by peer", NCCL waits). Both go on to the end
    and fail on the merged counts, with the same line."""
    broken = make_shard("0-broken.tar", [{"__key__": f"t{i}", "jpg": b"hello"} for i in range(1000)])
    good = make_shard("1-good.tar", image_samples(["g0", "g1"]))
    proc = launch_two_processes("eval", model_dir, broken, good, "--num-workers", "0")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert "Connection closed by peer" not in proc.stderr  # process 1 was not left talking to a process gone
    assert (
        lines
        == [
            "Error: 1,000 of 1,002 samples could not be evaluated, more than --max-error-rate 0.5; "
            "the commonest reason (1,000 samples): not an image"
        ]
        * 2
    ), proc.stderr[-3000:]
