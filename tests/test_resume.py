"""Resuming a run: the checkpoint format (safetensors and JSON, never a pickle), hostile checkpoints in a bucket
refused in one line with nothing run and nothing written outside the stage, a finished run trained further with
a larger --steps, and the warm-up as given."""

import json
import math
import pickle
import random
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import image_samples, launch_two_processes, read_metrics

from vqtok import VQVAE
from vqtok.checkpoints import (
    CheckpointError,
    flatten,
    load,
    read_header,
    read_state,
    save_random_state,
    save_shared,
    unflatten,
)
from vqtok.cli import cli
from vqtok.config import TOKENIZER_CONFIGS, PriorConfig, PriorTrainConfig, TrainConfig, load_config, tokenizer_family
from vqtok.errors import StorageError
from vqtok.prior import Prior
from vqtok.runs import lr_lambda
from vqtok.storage import Location

TINY = ["--hidden", "8", "--codebook-size", "8", "--code-dim", "4", "--image-size", "16", "--batch-size", "4"]
TINY_PRIOR = ["--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "4"]
PICKLES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin")


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


class Payload:
    """Unpickling it creates the file `marker`: what a pickle planted in a bucket could do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints, checked to be all it says about the error."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(line.startswith("Error") for line in lines) == 1
    return lines[-1]


# ------------------------------------------------------------------------------------------------ the format


def test_a_state_comes_back_from_safetensors_and_json_as_it_was(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), betas=(0.8, 0.9))
    model(torch.rand(4, 3)).sum().backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    odd = {"__tensor__": "a string, not a reference", "nested": [(1, None, True), {7: "int key"}], "x": 0.1}
    objects = {"model": model, "optimizer": optimizer, "scaler": scaler}
    save_shared(tmp_path, 5, objects, processes=1)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    header = json.loads((tmp_path / "state.json").read_text())  # plain JSON
    assert (header["step"], header["processes"]) == (5, 1)
    state = read_state(tmp_path, "state", read_header(tmp_path, "state", "here"), "here")
    original = optimizer.state_dict()
    assert state["optimizer"]["param_groups"] == original["param_groups"]  # betas a tuple again, params a list
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    assert sorted(state["optimizer"]["state"]) == [0, 1]  # keyed by parameter index, as torch keys it
    for index, moments in original["state"].items():
        for name, value in moments.items():
            assert torch.equal(state["optimizer"]["state"][index][name], value)
    assert all(torch.equal(state["model"][k], v) for k, v in model.state_dict().items())
    assert state["scaler"] == scaler.state_dict()

    skeleton, tensors = flatten(odd)
    assert tensors == {} and unflatten(json.loads(json.dumps(skeleton)), {}) == odd


def test_random_states_come_back_exactly(tmp_path):
    save_random_state(tmp_path, 0)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    model = torch.nn.Linear(2, 2)
    save_shared(tmp_path, 1, {"model": model}, processes=1)
    assert load(tmp_path, 1, {"model": model}, rank=0, processes=1, where="here")  # restored: as at the save
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])


def test_random_states_of_another_process_count_are_not_restored_and_a_missing_one_is_refused(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_shared(tmp_path, 1, {"model": model}, processes=2)
    save_random_state(tmp_path, 0)
    save_random_state(tmp_path, 1)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert not load(tmp_path, 1, {"model": model}, rank=0, processes=1, where="here")
    assert torch.equal(torch.rand(3), expected)  # left as the run's seed made it

    (tmp_path / "rng-1.json").unlink()
    (tmp_path / "rng-1.safetensors").unlink()
    with pytest.raises(CheckpointError, match="written by 2 processes but has no rng-1.json"):
        load(tmp_path, 1, {"model": model}, rank=1, processes=2, where="here")


def test_a_checkpoint_whose_state_does_not_fit_the_run_is_one_line(tmp_path):
    save_shared(tmp_path, 3, {"model": torch.nn.Linear(2, 2)}, processes=1)
    save_random_state(tmp_path, 0)
    with pytest.raises(CheckpointError, match="holds model, but this run has model, optimizer"):
        load(tmp_path, 3, {"model": torch.nn.Linear(2, 2), "optimizer": None}, 0, 1, "here")
    with pytest.raises(CheckpointError, match="its model does not fit this run's: Error.s. in loading state_dict"):
        load(tmp_path, 3, {"model": torch.nn.Linear(2, 3)}, 0, 1, "here")
    with pytest.raises(CheckpointError, match="state.json says step 3, its folder step 4"):
        load(tmp_path, 4, {"model": torch.nn.Linear(2, 2)}, 0, 1, "here")


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_run_restores_what_it_saved_exactly(tmp_path):
    from vqtok.runs import Run

    def leg(resume: bool, seed: int):
        run = Run(tmp_path / "run", {"steps": 4}, TrainConfig(steps=4, lr=0.01), resume=resume)
        # fp16 mixed precision's gradient scaler, which only a GPU gets: a CPU one stands in for it
        run.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**seed)
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        model, optimizer = run.accelerator.prepare(model, torch.optim.Adam(model.parameters(), lr=0.01))
        run.track(model=model, optimizer=optimizer)
        run.restore()
        return run, model, optimizer

    run, model, optimizer = leg(resume=False, seed=0)
    scheduler = run.schedule(optimizer)
    for _ in range(4):
        run.accelerator.backward(model(torch.rand(8, 3)).square().mean())
        optimizer.step()
        scheduler.step()
    run.save_checkpoint(4)
    draws = (random.random(), np.random.rand(), torch.rand(3))

    again, restored, restored_optimizer = leg(resume=True, seed=1)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in model.state_dict().items())  # BatchNorm's too
    saved, loaded = optimizer.state_dict(), restored_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, moments in saved["state"].items():
        assert all(torch.equal(value, loaded["state"][index][name]) for name, value in moments.items())
    assert again.accelerator.scaler.state_dict() == run.accelerator.scaler.state_dict()  # not this leg's 2 ** 1
    assert again.schedule(restored_optimizer).get_last_lr() == scheduler.get_last_lr()  # at step 4 again


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


@pytest.fixture
def stages(tmp_path, monkeypatch):
    """TMPDIR, where runs in a bucket stage their files: this process's and the commands'. (Not only theirs:
    torch may make its own cache folder there.)"""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))  # this process read TMPDIR already
    return folder


def fit_in_bucket(bucket, make_shard) -> list[str]:
    """A 4-step run in s3://BUCKET/runs/x, checkpoint step-000004; returns its command, to which --resume adds."""
    train = make_shard("t.tar", image_samples([f"t{j}" for j in range(8)], seed=1))
    args = ["fit", train, "--out", bucket.url("runs/x"), *TINY, "--steps", "4", "--num-workers", "0"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return [sys.executable, "-m", "vqtok", *args]


def prior_fit_in_bucket(bucket, make_shard, model_dir, tmp_path) -> list[str]:
    """The same for `vqtok prior fit`, on tokens the conftest's tiny tokenizer made."""
    shard = make_shard("t.tar", image_samples([f"t{j}" for j in range(8)], seed=3))
    tokens = tmp_path / "tokens.parquet"
    assert invoke("encode", shard, tokens, "--model", model_dir, "--keep", "cls", "--num-workers", "0").exit_code == 0
    args = ["prior", "fit", tokens, "--out", bucket.url("runs/x"), *TINY_PRIOR, "--steps", "4", "--num-workers", "0"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return [sys.executable, "-m", "vqtok", *map(str, args)]


def plant(bucket, s3_endpoint, tmp_path, how: str, model_config: dict | None = None) -> Path:
    """Make s3://BUCKET/runs/x/checkpoints/step-000004 hostile; returns the file its payload would create.
    escape: a key with `..` beside the checkpoint's own files. pickles: accelerate's pickle files, each a
    payload, beside them. accelerate: in their place, the checkpoint accelerate's save_state writes (a run's
    model and optimizer), with the payload in its RNG file and in custom_checkpoint_0.pkl, the file that
    accelerate's load_state unpickles with weights_only=False: a checkpoint of earlier vqtok, as planted."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    prefix = "runs/x/checkpoints/step-000004/"
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(Payload(marker))
    if how == "escape":
        s3.put_object(Bucket=bucket.name, Key=prefix + "../../../escape.txt", Body=b"planted")
    elif how == "pickles":
        for name in PICKLES:
            s3.put_object(Bucket=bucket.name, Key=prefix + name, Body=payload)
    else:
        from accelerate import Accelerator

        from vqtok.config import ModelConfig
        from vqtok.tokenizers import build_tokenizer

        model = build_tokenizer(ModelConfig.from_dict(model_config))
        accelerator = Accelerator(cpu=True)
        prepared = accelerator.prepare(model, torch.optim.Adam(model.parameters()))
        folder = tmp_path / "accelerate-checkpoint"
        accelerator.save_state(str(folder))
        assert prepared and (folder / "optimizer.bin").exists() and (folder / "random_states_0.pkl").exists()
        for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
            (folder / name).write_bytes(payload)
        bucket.fs.rm(bucket.fs.find(f"{bucket.name}/{prefix}"))
        for file in folder.iterdir():
            s3.put_object(Bucket=bucket.name, Key=prefix + file.name, Body=file.read_bytes())
        s3.put_object(Bucket=bucket.name, Key=prefix + "_COMPLETE", Body=b'{"step": 4}')
    bucket.fs.invalidate_cache()
    return marker


REFUSALS = {
    "escape": "refused, this key would be written outside",
    "pickles": "holds files not written by vqtok ('custom_checkpoint_0.pkl', 'optimizer.bin', 'random_states_0.pkl', "
    "'scheduler.bin')",
    "accelerate": "is in accelerate's format, which earlier vqtok wrote: loading it unpickles its files, which can "
    "run code, so it cannot be resumed safely",
}


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("how", REFUSALS)
def test_fit_resume_refuses_a_hostile_checkpoint_in_a_bucket(how, bucket, s3_endpoint, make_shard, stages, tmp_path):
    command = fit_in_bucket(bucket, make_shard)
    model_config = json.loads(bucket.fs.cat(f"{bucket.name}/runs/x/run.json"))["model"]
    marker = plant(bucket, s3_endpoint, tmp_path, how, model_config)
    before, staged_before = sorted(tmp_path.iterdir()), sorted(stages.iterdir())
    assert not list(stages.glob("vqtok-run-*"))  # the first run removed its stage

    line = one_line_error(subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300))
    assert REFUSALS[how] in line
    assert f"{bucket.url('runs/x/checkpoints/step-000004')}" in line
    assert not marker.exists()  # no payload ran
    assert sorted(stages.iterdir()) == staged_before  # the stage was removed, and nothing was written beside it
    assert sorted(tmp_path.iterdir()) == before and not list(tmp_path.rglob("escape.txt"))  # nor above it


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("how", ["escape", "pickles"])
def test_prior_fit_resume_refuses_a_hostile_checkpoint_in_a_bucket(
    how, bucket, s3_endpoint, make_shard, model_dir, stages, tmp_path
):
    command = prior_fit_in_bucket(bucket, make_shard, model_dir, tmp_path)
    marker = plant(bucket, s3_endpoint, tmp_path, how)
    before, staged_before = sorted(tmp_path.iterdir()), sorted(stages.iterdir())

    line = one_line_error(subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300))
    assert REFUSALS[how] in line
    assert not marker.exists()
    assert sorted(stages.iterdir()) == staged_before
    assert sorted(tmp_path.iterdir()) == before and not list(tmp_path.rglob("escape.txt"))


def test_a_run_in_a_bucket_resumes_from_its_checkpoint_and_trains_further(bucket, make_shard, stages):
    command = fit_in_bucket(bucket, make_shard)
    staged_before = sorted(stages.iterdir())
    resumed = subprocess.run([*command, "--resume", "--steps", "8"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = bucket.url("runs/x")
    metrics = [json.loads(line) for line in bucket.fs.cat(f"{bucket.name}/runs/x/metrics.jsonl").splitlines()]
    assert [(m["step"], m["resumed_from"]) for m in metrics if "resumed_from" in m] == [
        (0, None),
        (4, f"{out}/checkpoints/step-000004"),
    ]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 8
    files = [f.split("/runs/x/", 1)[1] for f in bucket.listing()]
    assert [f for f in files if f.startswith("checkpoints/step-000008/")] == [
        f"checkpoints/step-000008/{name}"
        for name in ("_COMPLETE", "rng-0.json", "rng-0.safetensors", "state.json", "state.safetensors")
    ]
    assert not [f for f in files if f.endswith((".pkl", ".bin", ".pt"))]
    assert json.loads(bucket.fs.cat(f"{bucket.name}/runs/x/run.json"))["steps"] == 8
    assert VQVAE.from_pretrained(f"{out}/model").codebook_size == 8
    assert sorted(stages.iterdir()) == staged_before  # the resumed run removed its stage


def test_two_processes_resume_each_from_its_own_random_states_and_one_process_from_theirs(make_shard, tmp_path):
    train = [make_shard(f"t{i}.tar", image_samples([f"t{i}-{j}" for j in range(8)], seed=i)) for i in range(2)]
    out = tmp_path / "run"
    fit = ["fit", *train, "--out", out, *TINY, "--save-every", "3", "--num-workers", "0"]
    first = launch_two_processes(*fit, "--steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = launch_two_processes(*fit, "--steps", "6", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "random states are not restored" not in resumed.stdout + resumed.stderr
    final = read_metrics(out)[-1]
    assert final["processes"] == 2 and len(set(final["codebook_digests"])) == 1

    alone = subprocess.run(
        [sys.executable, "-m", "vqtok", *map(str, fit), "--steps", "9", "--resume"], capture_output=True, text=True
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert (
        f"{out}/checkpoints/step-000006 was written by another number of processes than 1: its random states are "
        "not restored"
    ) in alone.stdout + alone.stderr
    assert [m["step"] for m in read_metrics(out) if "resumed_from" in m] == [0, 3, 6]


# ----------------------------------------------------------------------------------- a longer run, the warm-up


@pytest.fixture
def every_step(tmp_path) -> Path:
    """A recipe that logs every step, so metrics.jsonl holds the learning rate of each."""
    recipe = tmp_path / "every-step.toml"
    recipe.write_text("[train]\nlog_every = 1\n")
    return recipe


def learning_rates(out: Path) -> dict[int, float]:
    """step -> the learning rate metrics.jsonl records for it (the last record of the step wins)."""
    return {m["step"]: m["lr"] for m in read_metrics(out) if "lr" in m}


def check_trained_further(fit: list, out: Path, planned: Path, model) -> None:
    """fit (a command writing to out) was run for 6 steps, planned (the same for 12 from the start) too; resumed
    with --steps 12, it must train on from step 6 with the planned run's learning rates and export its model;
    --steps below 12 is then refused."""
    first = (out / "model" / "model.safetensors").read_bytes()
    resumed = invoke(*fit, "--resume", "--steps", "12")
    assert resumed.exit_code == 0, resumed.output
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "resumed_from" in m] == [0, 6]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))  # continuing, not starting again
    assert json.loads((out / "run.json").read_text())["steps"] == 12
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000009", "step-000012"]
    assert (out / "model" / "model.safetensors").read_bytes() != first and model.from_pretrained(out / "model")

    lr, from_the_start = learning_rates(out), learning_rates(planned)
    assert [lr[step] for step in range(7, 13)] == pytest.approx([from_the_start[step] for step in range(7, 13)])
    assert lr[6] != pytest.approx(from_the_start[6]), "6 steps and 12 have the same schedule: the test lost its point"

    shorter = invoke(*fit, "--resume", "--steps", "8")
    assert shorter.exit_code == 1
    assert shorter.output.strip() == (
        "Error: --steps 8 is below step 12, the checkpoint --resume continues from: pass --steps 12 or more"
    )


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_finished_fit_trains_further_with_a_larger_steps(make_shard, every_step, tmp_path):
    train = make_shard("t.tar", image_samples([f"t{j}" for j in range(8)], seed=1))
    common = [train, *TINY, "--config", every_step, "--save-every", "3", "--num-workers", "0"]
    for out, steps in (("run", 6), ("planned", 12)):
        result = invoke("fit", *common, "--out", tmp_path / out, "--steps", steps)
        assert result.exit_code == 0, result.output
    check_trained_further(["fit", *common, "--out", tmp_path / "run"], tmp_path / "run", tmp_path / "planned", VQVAE)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_finished_prior_fit_trains_further_with_a_larger_steps(make_shard, model_dir, every_step, tmp_path):
    shard = make_shard("t.tar", image_samples([f"t{j}" for j in range(8)], seed=3))
    tokens = tmp_path / "tokens.parquet"
    assert invoke("encode", shard, tokens, "--model", model_dir, "--num-workers", "0").exit_code == 0
    common = ["prior", "fit", tokens, *TINY_PRIOR, "--config", every_step, "--save-every", "3", "--num-workers", "0"]
    for out, steps in (("run", 6), ("planned", 12)):
        result = invoke(*common, "--out", tmp_path / out, "--steps", steps)
        assert result.exit_code == 0, result.output
    check_trained_further([*common, "--out", tmp_path / "run"], tmp_path / "run", tmp_path / "planned", Prior)


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


def test_a_recipe_asks_for_the_default_warmup_with_false(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\nsteps = 3000\nwarmup_steps = false\n")  # TOML has no null
    _, train = load_config(recipe)
    assert (train.warmup_steps, train.warmup) == (None, 300)
