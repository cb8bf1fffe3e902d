import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from vqtok import VQVAE, __version__
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


def test_a_run_folder_given_for_a_model_names_the_model_inside_it(tmp_path, model_dir):
    """`vqtok fit --out runs/x` exports its model to runs/x/model: every command that takes a model directory
    refuses runs/x in the same words, naming runs/x/model."""
    from conftest import image_samples, write_shard

    from vqtok.encode import encode

    run = tmp_path / "runs" / "x"
    shutil.copytree(model_dir, run / "model")
    (run / "checkpoints").mkdir()
    shard = write_shard(tmp_path / "a.tar", image_samples(["a", "b"]))
    tokens = tmp_path / "tokens.parquet"
    encode([shard], tokens, run / "model", num_workers=0, show_progress=False)
    expected = f"Error: {run} is not a model directory: it holds no config.json; did you mean {run / 'model'}?\n"
    for args in (
        ["encode", shard, tmp_path / "more.parquet", "--model", run],
        ["decode", tokens, tmp_path / "decoded", "--model", run],
        ["eval", run, shard],
        ["eval", run / "model", shard, "--compare", run],
        ["info", run],
        ["prior", "fit", tokens, "--out", tmp_path / "p", "--tokenizer", run],
    ):
        result = CliRunner().invoke(cli, list(map(str, args)))
        assert (result.exit_code, result.output) == (1, expected), args
    assert not (tmp_path / "more.parquet").exists() and not (tmp_path / "decoded").exists()


SHUTDOWN_PROBE = """
import atexit, sys

class Finalized:
    def __del__(self):
        print("interpreter shut down", flush=True)

probe = Finalized()
atexit.register(lambda: print("exit handlers ran", flush=True))
from vqtok.cli import main

sys.argv = ["vqtok", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_launched_process_exits_without_the_interpreter_shutdown(world_size):
    """Under a launcher (WORLD_SIZE > 1), gloo threads still running at the interpreter's shutdown can abort a
    finished run: `vqtok` runs the exit handlers, flushes its output and leaves with the command's exit code."""
    env = {**os.environ, "WORLD_SIZE": world_size}
    for args, code, printed in ((["--version"], 0, __version__), (["no-such-command"], 2, "No such command")):
        probe = [sys.executable, "-c", SHUTDOWN_PROBE, *args]
        proc = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
        assert printed in proc.stdout + proc.stderr
        assert "exit handlers ran" in proc.stdout
        assert ("interpreter shut down" in proc.stdout) == (world_size == "1")
