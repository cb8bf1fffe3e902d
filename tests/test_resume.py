"""Resuming a run: a checkpoint downloaded from a bucket never writes outside the local stage; the warm-up
as given."""

import math
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from click.testing import CliRunner
from conftest import image_samples, read_metrics

from vqtok.cli import cli
from vqtok.config import TOKENIZER_CONFIGS, PriorConfig, PriorTrainConfig, TrainConfig, load_config, tokenizer_family
from vqtok.errors import StorageError
from vqtok.runs import lr_lambda
from vqtok.storage import Location

TINY = ["--hidden", "8", "--codebook-size", "8", "--code-dim", "4", "--image-size", "16", "--batch-size", "4"]


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


# ------------------------------------------------------------------------------------- hostile keys and files


def test_download_refuses_a_key_that_would_leave_the_folder_before_writing_anything(bucket, s3_endpoint, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for key in ("ck/a.txt", "ck/sub/b.txt"):
        s3.put_object(Bucket=bucket.name, Key=key, Body=key.encode())
    clean = tmp_path / "clean"
    Location(bucket.url("ck")).download(clean)
    assert (clean / "a.txt").read_text() == "ck/a.txt" and (clean / "sub" / "b.txt").read_text() == "ck/sub/b.txt"

    for key in ("ck/../../escape.txt", "ck//tmp/escape.txt"):
        s3.put_object(Bucket=bucket.name, Key=key, Body=b"planted")
        stage = tmp_path / "stage" / "folder"
        with pytest.raises(StorageError) as refused:
            Location(bucket.url("ck")).download(stage)
        assert key in str(refused.value) and "outside" in str(refused.value) and "\n" not in str(refused.value)
        assert not (tmp_path / "stage").exists()  # nothing written, not even the clean keys
        assert not list(tmp_path.rglob("escape.txt"))
        s3.delete_object(Bucket=bucket.name, Key=key)


# ------------------------------------------------------------------------------------------------ the warm-up


@pytest.fixture
def every_step(tmp_path) -> Path:
    """A recipe that logs every step, so metrics.jsonl holds the learning rate of each."""
    recipe = tmp_path / "every-step.toml"
    recipe.write_text("[train]\nlog_every = 1\n")
    return recipe


def learning_rates(out: Path) -> dict[int, float]:
    """step -> the learning rate metrics.jsonl records for it (the last record of the step wins)."""
    return {m["step"]: m["lr"] for m in read_metrics(out) if "lr" in m}


def old_warmup(steps: int, limit: int) -> Callable:
    """The schedule before warmup_steps was honoured: a warm-up of min(limit, steps // 10), then cosine to 0.1."""
    warmup = min(limit, steps // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@pytest.mark.parametrize("config_class, limit", [(TrainConfig, 500), (PriorTrainConfig, 100)])
def test_the_default_warmup_is_a_tenth_of_the_run_at_most_its_limit_as_before(config_class, limit):
    for steps in (6, 100, 999, 1000, 4999, 5000, 10_000, 50_000):
        config = config_class(steps=steps)
        assert config.warmup_steps is None and config.warmup == min(limit, steps // 10)
        new, old = lr_lambda(config), old_warmup(steps, limit)
        some = range(0, steps + 1, max(1, steps // 200))
        assert [new(s) for s in some] == [old(s) for s in some]


def test_an_explicit_warmup_is_honoured_even_beyond_a_tenth_of_the_run():
    factor = lr_lambda(TrainConfig(steps=100, warmup_steps=50))
    assert [factor(s) for s in (0, 24, 49)] == [1 / 50, 0.5, 1.0]
    assert factor(50) == 1.0 and factor(100) == pytest.approx(0.1)
    beyond = lr_lambda(TrainConfig(steps=10, warmup_steps=20))  # the rate rises all run long
    assert [beyond(s) for s in range(10)] == [(s + 1) / 20 for s in range(10)]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fit_follows_an_explicit_warmup(make_shard, every_step, tmp_path):
    train = make_shard("t.tar", image_samples([f"t{j}" for j in range(8)], seed=1))
    out = tmp_path / "run"
    args = ["fit", train, "--out", out, *TINY, "--config", every_step, "--steps", "10", "--warmup-steps", "8"]
    result = invoke(*args, "--lr", "0.001", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    lr = learning_rates(out)
    # after step s the schedule is at step s: (s + 1) / 8 of the peak up to 8 steps, then the cosine from the peak
    assert [lr[s] for s in range(1, 9)] == pytest.approx([0.001 * (s + 1) / 8 for s in range(1, 8)] + [0.001])


def test_the_recipes_that_set_a_warmup_keep_it():
    recipes = {}
    for recipe in sorted((Path(__file__).resolve().parent.parent / "pipelines").glob("*.toml")):
        prior = recipe.name.startswith("prior")
        model_class = PriorConfig if prior else TOKENIZER_CONFIGS[tokenizer_family(recipe)]
        _, train = load_config(recipe, model_class=model_class, train_class=PriorTrainConfig if prior else TrainConfig)
        recipes[recipe.stem] = train.warmup_steps, train.warmup
    assert recipes["cpu-small"] == (100, 100) and recipes["vqgan-cpu-small"] == (100, 100)  # 2000 steps: not cut
    assert recipes["paper"] == (0, 0) and recipes["prior-llamagen-b"] == (5000, 5000)
    assert recipes["cifar10"] == (None, 500)  # the default, as before
