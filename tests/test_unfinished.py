"""What the commands that may read an unfinished token dataset say of it: vqtok info and vqtok decode read its
committed parts and tell the user how far it got; vqtok prior fit refuses it (tests/test_prior.py)."""

import json
import sys

from click.testing import CliRunner
from conftest import image_samples, kill_when, killed_progress

from vqtok.cli import cli
from vqtok.tokens import read_codes
from vqtok.tokens.format import STATS_DIR


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def killed_encode(model_dir, make_shard, out, shards: int = 30) -> int:
    """An encode of `shards` shards of 4 images, killed once at least 2 are committed; how many were."""
    paths = [
        make_shard(f"u-{i:02d}.tar", image_samples([f"u{i}-{j}" for j in range(4)], seed=i)) for i in range(shards)
    ]
    command = [sys.executable, "-m", "vqtok", "encode", *paths, str(out), "--model", model_dir]
    command += ["--num-workers", "0", "--batch-size", "2"]
    done = kill_when(command, lambda: len(list((out / STATS_DIR).glob("*.json"))), 2)
    assert 2 <= done < shards, "the run was not killed mid-way"
    return done


def test_info_and_decode_read_an_unfinished_dataset_and_say_so(model_dir, make_shard, tmp_path):
    out = tmp_path / "tokens.parquet"
    done = killed_encode(model_dir, make_shard, out)
    committed, _ = read_codes(out, partial=True)
    progress = killed_progress(out, done, 30)

    summary = json.loads(invoke("info", out, "--json").output)
    assert summary["complete"] is False and summary["progress"] == progress
    assert (summary["shards"], summary["planned_shards"], summary["rows"]) == (done, 30, len(committed))
    table = invoke("info", out)
    assert table.exit_code == 0 and f"no: {progress}; run the command that wrote it again" in table.output

    decoded = invoke("decode", out, tmp_path / "images", "--model", model_dir)
    assert decoded.exit_code == 0, decoded.output
    assert f"decoded {len(committed):,} images" in decoded.output
    assert f"note: {out} is unfinished ({progress}): decoded its committed parts only" in decoded.output
    assert len(list((tmp_path / "images").rglob("*.png"))) == len(committed)
