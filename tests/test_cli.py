import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from vqtok import VQVAE, __version__
from vqtok.cli import cli
from vqtok.config import ModelConfig, QuantizerConfig


def test_info_reports_a_model(tmp_path):
    torch.manual_seed(0)
    model = VQVAE(
        ModelConfig(hidden_channels=16, image_size=64, quantizer=QuantizerConfig(codebook_size=32, code_dim=8))
    )
    model.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "model"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["model_id"] == model.model_id
    assert (summary["codebook_size"], summary["code_dim"], summary["grid"]) == (32, 8, [16, 16])
    assert summary["config"]["quantizer"]["codebook_size"] == 32
    assert summary["parameters"] == sum(p.numel() for p in model.parameters())

    table = CliRunner().invoke(cli, ["info", str(tmp_path / "model")], env={"COLUMNS": "200"})  # one line per row
    assert table.exit_code == 0 and model.model_id in table.output
    assert "K = 32, D = 8" in table.output
    assert re.search(r"quantizer\.decay\s+\S\s+0\.99", table.output)  # each setting on a row of its own


def test_info_counts_read_as_english_does(tmp_path, model_dir):
    """One of a thing is not "1 layers" or "1 file(s)"."""
    from conftest import image_samples, write_shard

    from vqtok.config import PriorConfig
    from vqtok.encode import encode
    from vqtok.prior import Prior

    config = PriorConfig(layers=1, width=16, heads=1, codebook_size=32, grid=(4, 4), image_size=16, tokenizer="t")
    Prior(config).save_pretrained(tmp_path / "prior")
    prior = CliRunner(env={"COLUMNS": None}).invoke(cli, ["info", str(tmp_path / "prior")])
    assert prior.exit_code == 0, prior.output
    assert "1 layer, width 16, 1 head " in prior.output
    encode([write_shard(tmp_path / "a.tar", image_samples(["a"]))], tmp_path / "t", model_dir, show_progress=False)
    tokens = CliRunner(env={"COLUMNS": None}).invoke(cli, ["info", str(tmp_path / "t")])
    assert tokens.exit_code == 0, tokens.output
    assert "1 in 1 file " in tokens.output


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


def test_ctrl_c_in_encode_says_that_a_rerun_keeps_the_committed_parts(model_dir, make_shard, tmp_path):
    from conftest import image_samples, interrupt_when

    from vqtok.tokens import read_codes
    from vqtok.tokens.format import STATS_DIR

    shards = [make_shard(f"k-{i:02d}.tar", image_samples([f"k{i}-{j}" for j in range(6)], seed=i)) for i in range(40)]
    out = tmp_path / "tokens.parquet"
    command = [sys.executable, "-m", "vqtok", "encode", *shards, str(out), "--model", model_dir, "--batch-size", "2"]
    committed = lambda: len(list((out / STATS_DIR).glob("*.json")))  # noqa: E731
    interrupted = interrupt_when([*command, "--num-workers", "1"], committed, 3)
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr == (
        "Interrupted: vqtok encode stopped; run the same command again to go on: the parts committed so far are kept.\n"
    )
    done_before = committed()
    assert 3 <= done_before < 40, "the run was not interrupted mid-way"
    rerun = subprocess.run([*command, "--num-workers", "0"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{40 - done_before} encoded, {done_before} already done" in rerun.stdout
    assert sorted(read_codes(out)[0]) == sorted(f"k{i}-{j}" for i in range(40) for j in range(6))


RESUME = "run the same command with --resume to continue from the last checkpoint"
RERUN = "run the same command again to go on: the parts committed so far are kept"
START_OVER = "run the same command again to start over"


INTERRUPTED = [  # a command, its arguments, the library function it calls and what it says after Ctrl-C
    ("fit", ["shards/", "--out", "runs/x"], "vqtok.train.fit", RESUME),
    ("prior fit", ["{tokens}", "--out", "runs/p"], "vqtok.prior.fit.fit_prior", RESUME),
    ("encode", ["shards/", "t.parquet", "--model", "m"], "vqtok.encode.encode", RERUN),
    ("prior sample", ["{folder}", "s.parquet"], "vqtok.prior.sample.sample", RERUN),
    ("decode", ["{tokens}", "out/", "--model", "m"], "vqtok.decode.decode", START_OVER),
    ("eval", ["m", "shards/"], "vqtok.evaluate.evaluate_inputs", START_OVER),
]


@pytest.mark.parametrize("command, args, library, advice", INTERRUPTED, ids=[case[0] for case in INTERRUPTED])
def test_ctrl_c_says_how_to_go_on_in_one_line(command, args, library, advice, monkeypatch, tmp_path):
    """Ctrl-C in the library function each command calls: one line, exit code 130, in place of "Aborted!"."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(library, interrupted)
    (tmp_path / "tokens").write_text("")
    args = [*command.split(), *(a.format(tokens=tmp_path / "tokens", folder=tmp_path) for a in args)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 130
    assert result.output == f"Interrupted: vqtok {command} stopped; {advice}.\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["decode", "t", "out", "--model", "m", "--format", "pngg"],
            "Invalid value for '--format': 'pngg' is not one of 'png', 'wds'. (vqtok decode --help)",
        ),
        (["no-such-command"], "No such command 'no-such-command'. (vqtok --help)"),
        (["--no-such-option"], "No such option '--no-such-option'. (vqtok --help)"),
        (["prior", "fit"], "Missing argument 'TOKENS...'. (vqtok prior fit --help)"),
        (
            ["fit", "x", "--out", "y", "--decay", "0.9", "--no-ema"],
            "--decay and --no-ema exclude each other (vqtok fit --help)",
        ),
    ],
)
def test_a_usage_error_is_one_line_and_exit_code_2(args, message):
    """Like every error vqtok expects, one `Error:` line (naming the --help to read), not click's three; with
    click's and argparse's exit code for a command line that cannot run."""
    result = CliRunner().invoke(cli, args, prog_name="vqtok")
    assert result.exit_code == 2
    assert result.output == f"Error: {message}\n"


def test_no_command_still_shows_the_help():
    result = CliRunner().invoke(cli, [], prog_name="vqtok")
    assert result.output.startswith("Usage: vqtok [OPTIONS] COMMAND [ARGS]...") and "Commands:" in result.output


SHUTDOWN_PROBE = """
import atexit, sys

class Finalized:
    def __del__(self):
        print("interpreter shut down", flush=True)

probe = Finalized()
atexit.register(lambda: print("exit handlers ran", flush=True))
import click
from vqtok.cli import cli, main

# A command that ends as code may, with a message for its exit code
cli.add_command(click.Command("leave", callback=lambda: sys.exit("leaving with a message")))

sys.argv = ["vqtok", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_launched_process_exits_without_the_interpreter_shutdown(world_size):
    """Under a launcher (WORLD_SIZE > 1), gloo threads still running at the interpreter's shutdown can abort a
    finished run: `vqtok` runs the exit handlers, flushes its output and leaves with the command's exit code,
    or for sys.exit("message") with the message on stderr and exit code 1, as the interpreter does."""
    env = {**os.environ, "WORLD_SIZE": world_size}
    cases = [
        (["--version"], 0, __version__, ""),
        (["no-such-command"], 2, "", "Error: No such command 'no-such-command'. (vqtok --help)\n"),
        (["leave"], 1, "", "leaving with a message\n"),
    ]
    for args, code, printed, errors in cases:
        probe = [sys.executable, "-c", SHUTDOWN_PROBE, *args]
        proc = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120)
        assert (proc.returncode, proc.stderr) == (code, errors)
        assert printed in proc.stdout
        assert "exit handlers ran" in proc.stdout
        assert ("interpreter shut down" in proc.stdout) == (world_size == "1")
