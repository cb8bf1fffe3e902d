"""Object storage, tested for real against a local S3 server (moto) on 127.0.0.1: encode from a bucket into a
bucket, killed and rerun; decode, info, read_codes and TokenDataset reading it; fit writing its run there and
resuming from it; prior fit writing its run there, and prior fit and prior sample with the tokens, the
tokenizer, the run and the samples all in the bucket, reached through --storage-options; and the failures a
user meets (credentials, a missing bucket, an unreachable endpoint, no s3fs, a Hugging Face Hub that cannot be
reached), each one line with nothing
written."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import fsspec
import numpy as np
import pytest
import requests
import torch
from click.testing import CliRunner
from conftest import (
    class_images,
    free_port,
    image_bytes,
    image_samples,
    kill_when,
    point_at_s3,
    random_image,
    write_hf_parquet,
    write_image_folder,
    write_shard,
)
from PIL import Image

from vqtok import VQVAE
from vqtok.cli import cli
from vqtok.prior import Prior
from vqtok.tokens import read_codes, read_errors, read_metadata
from vqtok.tokens.format import SUCCESS_NAME


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


@pytest.fixture
def inputs(bucket, model_dir, tmp_path):
    """40 shards of 6 images in s3://BUCKET/shards/ and the model in s3://BUCKET/models/x; their keys."""
    local = tmp_path / "shards"
    local.mkdir()
    keys = []
    for i in range(40):
        samples = image_samples([f"k{i}-{j}" for j in range(6)], seed=i)
        write_shard(local / f"train-{i:06d}.tar", samples)
        keys += [s["__key__"] for s in samples]
    bucket.fs.put(str(local) + "/", f"{bucket.name}/shards/", recursive=True)
    VQVAE.from_pretrained(model_dir).save_pretrained(bucket.url("models/x"))
    return keys


def test_encode_from_a_bucket_into_a_bucket_killed_and_rerun_gives_every_key_once(bucket, inputs, model_dir, tmp_path):
    tokens = bucket.url("tokens.parquet")
    command = [
        sys.executable,
        "-m",
        "vqtok",
        "encode",
        bucket.url("shards/"),
        tokens,
        "--model",
        bucket.url("models/x"),
    ]
    command += ["--num-workers", "0", "--batch-size", "2"]
    stats = f"{bucket.name}/tokens.parquet/_stats"

    def markers() -> int:
        bucket.fs.invalidate_cache()
        return len(bucket.fs.ls(stats)) if bucket.fs.exists(stats) else 0

    done_before = kill_when(command, markers, 3)
    assert 3 <= done_before < 40, "the run was not killed mid-way"
    keys, _ = read_codes(tokens, partial=True)  # what a reader sees after the crash: whole shards only
    assert len(keys) % 6 == 0 and len(keys) == len(set(keys)) and len(keys) >= 6 * done_before

    result = invoke("encode", bucket.url("shards/"), tokens, "--model", bucket.url("models/x"), "--num-workers", "1")
    assert result.exit_code == 0, result.output
    assert f"{40 - done_before} encoded, {done_before} already done" in result.output
    keys, codes = read_codes(tokens)
    assert sorted(keys) == sorted(inputs) and len(read_errors(tokens)) == 0
    assert bucket.fs.exists(f"{bucket.name}/tokens.parquet/{SUCCESS_NAME}")

    # The same codes as a local run, and every reader reads the bucket.
    local = tmp_path / "local.parquet"
    assert invoke("encode", tmp_path / "shards", local, "--model", model_dir, "--num-workers", "0").exit_code == 0
    local_keys, local_codes = read_codes(local)
    assert dict(zip(keys, map(np.ndarray.tolist, codes), strict=True)) == dict(
        zip(local_keys, map(np.ndarray.tolist, local_codes), strict=True)
    )

    info = invoke("info", tokens, "--json")
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert (summary["rows"], summary["shards"], summary["errors"], summary["complete"]) == (240, 40, 0, True)
    assert json.loads(invoke("info", bucket.url("models/x"), "--json").output)["codebook_size"] == 32

    out = tmp_path / "decoded"
    result = invoke("decode", tokens, out, "--model", bucket.url("models/x"), "--keys", "k3-1,k17-5")
    assert result.exit_code == 0, result.output
    model = VQVAE.from_pretrained(model_dir)
    for key in ("k3-1", "k17-5"):
        grid = torch.from_numpy(codes[keys.index(key)][None])
        expected = (model.decode(grid) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(Image.open(out / f"{key}.png")), expected)

    from torch.utils.data import DataLoader

    from vqtok.tokens import TokenDataset

    seen = [key for batch in DataLoader(TokenDataset(tokens), batch_size=16, num_workers=2) for key in batch["key"]]
    assert sorted(seen) == sorted(inputs)


def test_a_folder_and_a_parquet_dataset_in_a_bucket_give_the_codes_of_their_local_copies(
    bucket, model_dir, monkeypatch, tmp_path
):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    images = class_images(per_class=3)
    images["cat/odd[1]"] = image_bytes(random_image(77))  # a name fsspec would take for a glob
    folder = write_image_folder(tmp_path / "folder", images)
    hf = write_hf_parquet(tmp_path / "hf", images)
    for local, name in ((folder, "folder"), (hf, "hf")):
        bucket.fs.put(f"{local}/", f"{bucket.name}/{name}/", recursive=True)
    for name, local, options in (("folder", folder, ["--class-from-folder"]), ("hf", hf, ["--keep", "label"])):
        remote_out, local_out = bucket.url(f"{name}.parquet"), tmp_path / f"{name}.parquet"
        for source, out in ((bucket.url(f"{name}/"), remote_out), (local, local_out)):
            result = invoke("encode", source, out, "--model", model_dir, "--num-workers", "1", *options)
            assert result.exit_code == 0, result.output
        remote_keys, remote_codes = read_codes(remote_out)
        local_keys, local_codes = read_codes(local_out)
        assert sorted(remote_keys) == sorted(images)
        remote = {key: grid.tolist() for key, grid in zip(remote_keys, remote_codes, strict=True)}
        assert remote == {key: grid.tolist() for key, grid in zip(local_keys, local_codes, strict=True)}
    assert read_metadata(bucket.url("folder.parquet"))["classes"] == ["cat", "dog"]
    assert len(read_errors(bucket.url("folder.parquet"))) == 0


def test_a_missing_bucket_is_one_line_and_nothing_is_written(bucket, inputs, model_dir, tmp_path):
    before = bucket.listing()
    missing = "vqtok-no-such-bucket"
    result = invoke("encode", bucket.url("shards/"), f"s3://{missing}/tokens.parquet", "--model", model_dir)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"s3://{missing}/tokens.parquet: not found: The specified bucket does not exist" in result.output
    assert not bucket.fs.exists(missing)  # not created on the way

    local = tmp_path / "tokens.parquet"
    result = invoke("encode", f"s3://{missing}/shards/", local, "--model", model_dir)
    assert result.exit_code == 1 and "The specified bucket does not exist" in result.output
    result = invoke("encode", bucket.url("shards/"), local, "--model", f"s3://{missing}/model")
    assert result.exit_code == 1 and f"s3://{missing}/model" in result.output
    assert not local.exists() and bucket.listing() == before
    assert len(result.output.strip().splitlines()) == 1


def test_refused_credentials_are_one_line_and_nothing_is_written(
    bucket, inputs, model_dir, make_shard, s3_endpoint, monkeypatch, tmp_path
):
    before = bucket.listing()
    shard = make_shard("a.tar", image_samples(["a", "b"]))
    point_at_s3(monkeypatch, s3_endpoint, tmp_path, key="AKIA-NOT-A-KEY")
    requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0", timeout=10)  # the server checks keys from now
    try:
        results = [
            invoke("encode", bucket.url("shards/"), tmp_path / "t.parquet", "--model", model_dir),
            invoke("encode", shard, bucket.url("more.parquet"), "--model", model_dir),
            invoke("encode", shard, tmp_path / "t.parquet", "--model", bucket.url("models/x")),
            invoke("info", bucket.url("models/x")),
        ]
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
    for result in results:
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert "access denied" in result.output and "check the credentials for this store" in result.output
    point_at_s3(monkeypatch, s3_endpoint, tmp_path)
    assert bucket.listing() == before and not (tmp_path / "t.parquet").exists()


def test_an_unreachable_endpoint_is_one_line_and_nothing_is_written(model_dir, make_shard, monkeypatch, tmp_path):
    point_at_s3(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path)  # nobody listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore's retries, fewer than its default for a faster test
    shard = make_shard("a.tar", image_samples(["a", "b"]))
    result = invoke("encode", shard, "s3://bucket/tokens.parquet", "--model", model_dir)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "s3://bucket/tokens.parquet: the store cannot be reached or refused: Could not connect" in result.output
    result = invoke("encode", "s3://bucket/shards/", tmp_path / "t.parquet", "--model", model_dir)
    assert result.exit_code == 1 and "Could not connect" in result.output and not (tmp_path / "t.parquet").exists()


HUB_COMMANDS = {
    "import": ["import", "diffusers", "hf://amused/amused-256/vqvae", "{tmp}/imported"],
    "encode": [
        "encode",
        "hf://datasets/uoft-cs/cifar10/plain_text/train-*.parquet",
        "{tmp}/tokens",
        "--model",
        "{model}",
    ],
    "info": ["info", "hf://amused/amused-256/vqvae"],
}


@pytest.mark.parametrize("hub", ["offline", "unreachable"])
@pytest.mark.parametrize("command", sorted(HUB_COMMANDS))
def test_a_hub_that_cannot_be_reached_is_one_line_naming_the_location(command, hub, tmp_path, model_dir):
    """huggingface_hub reaches the Hub as early as fsspec forgets a path (invalidate_cache), and fails through
    its own and httpx's exception types: each is one `Error:` line naming the hf:// location, exit code 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no cached files to answer from
    if hub == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"
    args = [a.format(tmp=tmp_path, model=model_dir) for a in HUB_COMMANDS[command]]
    where = next(a for a in args if a.startswith("hf://"))
    proc = subprocess.run([sys.executable, "-m", "vqtok", *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {where}"), proc.stderr
    assert not (tmp_path / "imported").exists() and not (tmp_path / "tokens").exists()


class UnreachableFileSystem(fsspec.AbstractFileSystem):
    """A back end that reaches its store as its file system is made (its credentials or its endpoint)."""

    protocol = "unreachable"

    def __init__(self, *args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")


def test_a_back_end_that_fails_as_its_file_system_is_made_is_one_line():
    fsspec.register_implementation("unreachable", UnreachableFileSystem, clobber=True)
    result = invoke("info", "unreachable://store/model")
    assert result.exit_code == 1
    assert result.output == "Error: unreachable://store/model/config.json: Connection refused\n"


def test_without_s3fs_an_s3_url_names_the_extra(model_dir, make_shard, tmp_path):
    shard = make_shard("a.tar", image_samples(["a"]))
    code = "import sys; sys.modules['s3fs'] = None; from vqtok.cli import main; main()"  # as if not installed
    args = ["encode", shard, "s3://bucket/tokens.parquet", "--model", model_dir]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "Error: s3://bucket/tokens.parquet: reading s3:// needs a package that is not installed: "
        "pip install 'vqtok[s3]'"
    )


def test_fit_writes_its_run_to_a_bucket_and_resumes_from_it(bucket, make_shard, tmp_path, monkeypatch):
    stages = tmp_path / "tmp"  # where the runs stage their checkpoints, this process's and the commands'
    stages.mkdir()
    monkeypatch.setenv("TMPDIR", str(stages))
    monkeypatch.setattr(tempfile, "tempdir", str(stages))  # this process read TMPDIR already
    train = [make_shard(f"t-{i}.tar", image_samples([f"t{i}-{j}" for j in range(12)], seed=i)) for i in range(2)]
    val = make_shard("val.tar", image_samples([f"v{j}" for j in range(6)], seed=50))
    out = bucket.url("runs/x")
    tiny = ["--hidden", "8", "--codebook-size", "8", "--code-dim", "4", "--image-size", "16", "--batch-size", "4"]
    command = [sys.executable, "-m", "vqtok", "fit", *train, "--out", out, "--val", val, *tiny, "--steps", "40"]
    command += ["--save-every", "5", "--eval-every", "20", "--num-workers", "0"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marker = f"{bucket.name}/runs/x/checkpoints/step-000010/_COMPLETE"
    deadline = time.monotonic() + 180
    while not bucket.fs.exists(marker):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-3000:]
        time.sleep(0.05)
        bucket.fs.invalidate_cache()
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    checkpoints = bucket.fs.ls(f"{bucket.name}/runs/x/checkpoints")
    complete = [int(c.rsplit("-", 1)[1]) for c in checkpoints if bucket.fs.exists(f"{c}/_COMPLETE")]
    killed_at = max(complete)
    assert 10 <= killed_at < 40 and len(complete) <= 2  # the last two kept
    killed_stage = list(stages.glob("vqtok-run-*"))  # kill -9 gives no chance to remove it
    assert len(killed_stage) == 1

    refused = invoke("fit", *command[4:])
    assert refused.exit_code == 1 and "already holds checkpoints: pass --resume" in refused.output
    assert list(stages.glob("vqtok-run-*")) == killed_stage  # refused before it staged anything

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"exported model to {out}/model" in resumed.stdout + resumed.stderr
    assert list(stages.glob("vqtok-run-*")) == killed_stage  # the finished run removed its stage
    metrics = [json.loads(line) for line in bucket.fs.cat(f"{bucket.name}/runs/x/metrics.jsonl").splitlines()]
    starts = [m for m in metrics if "resumed_from" in m]
    assert [m["step"] for m in starts] == [0, killed_at]  # resumed from the bucket, not from step 0
    assert starts[1]["resumed_from"] == f"{out}/checkpoints/step-{killed_at:06d}"
    assert [m["step"] for m in metrics if "loss" in m][-1] == 40
    assert [m["step"] for m in metrics if m["split"] == "val"][-1] == 40
    assert bucket.fs.exists(f"{bucket.name}/runs/x/samples/step-000040.png")
    assert json.loads(bucket.fs.cat(f"{bucket.name}/runs/x/run.json"))["steps"] == 40
    model = VQVAE.from_pretrained(f"{out}/model")
    assert model.codebook_size == 8 and model.encode(torch.rand(1, 3, 16, 16)).shape == (1, 4, 4)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_prior_fit_writes_its_run_to_a_bucket(bucket, model_dir, make_shard, tmp_path):
    shard = make_shard("t.tar", image_samples([f"t{j}" for j in range(8)], seed=3))
    tokens = tmp_path / "tokens.parquet"
    assert invoke("encode", shard, tokens, "--model", model_dir, "--keep", "cls", "--num-workers", "0").exit_code == 0
    out = bucket.url("runs/p")
    tiny = ["--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "4", "--num-workers", "0"]
    args = ["prior", "fit", tokens, "--out", out, "--val", tokens, "--cond", "cls", *tiny, "--steps", "4"]
    result = invoke(*args, "--tokenizer", model_dir)
    assert result.exit_code == 0, result.output
    assert bucket.fs.exists(f"{bucket.name}/runs/p/checkpoints/step-000004/_COMPLETE")
    assert bucket.fs.exists(f"{bucket.name}/runs/p/samples/step-000004.png")
    assert Prior.from_pretrained(f"{out}/model").config.num_classes == 8
    info = invoke("info", f"{out}/model", "--json")
    assert info.exit_code == 0 and json.loads(info.output)["kind"] == "prior"


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_prior_fit_and_sample_read_and_write_a_bucket_with_storage_options(
    bucket, model_dir, make_shard, s3_endpoint, monkeypatch, tmp_path
):
    shard = make_shard("t.tar", image_samples([f"t{j}" for j in range(8)], seed=3))
    tokens = bucket.url("tokens.parquet")
    assert invoke("encode", shard, tokens, "--model", model_dir, "--keep", "cls", "--num-workers", "0").exit_code == 0
    VQVAE.from_pretrained(model_dir).save_pretrained(bucket.url("models/x"))
    point_at_s3(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path)  # the environment points nowhere...
    reach = ["--storage-options", json.dumps({"endpoint_url": s3_endpoint})]  # ...and the option to the server

    out = bucket.url("runs/p")
    tiny = ["--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "4", "--num-workers", "0"]
    args = ["prior", "fit", tokens, "--out", out, "--val", tokens, "--tokenizer", bucket.url("models/x"), *tiny]
    result = invoke(*args, "--cond", "cls", "--steps", "4", *reach)
    assert result.exit_code == 0, result.output
    assert "held-out" in result.output
    assert bucket.fs.exists(f"{bucket.name}/runs/p/checkpoints/step-000004/_COMPLETE")
    assert bucket.fs.exists(f"{bucket.name}/runs/p/samples/step-000004.png")
    assert bucket.fs.exists(f"{bucket.name}/runs/p/model/model.safetensors")

    samples = bucket.url("samples.parquet")
    result = invoke("prior", "sample", out, samples, "--per-class", "2", *reach)  # the run folder, in the bucket
    assert result.exit_code == 0, result.output
    assert f"sampled 16 grids into {samples}" in result.output
    keys, codes = read_codes(samples, storage_options={"endpoint_url": s3_endpoint})
    assert keys == [f"sample-{i:06d}" for i in range(16)] and codes.shape == (16, 4, 4) and (codes < 32).all()
    assert bucket.fs.exists(f"{bucket.name}/samples.parquet/{SUCCESS_NAME}")


def test_storage_options_reach_the_back_end_and_bad_ones_are_one_line(
    bucket, inputs, s3_endpoint, monkeypatch, tmp_path
):
    point_at_s3(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path)  # the environment points nowhere...
    options = json.dumps({"endpoint_url": s3_endpoint})  # ...and the option to the server
    result = invoke("info", bucket.url("models/x"), "--json", "--storage-options", options)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["codebook_size"] == 32
    monkeypatch.setenv("VQTOK_STORAGE_OPTIONS", options)  # the same, set once for the machine
    assert invoke("info", bucket.url("models/x")).exit_code == 0

    for text, message in [("{", "--storage-options is not JSON"), ("[1]", "must be a JSON object")]:
        result = invoke("info", bucket.url("models/x"), "--storage-options", text)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_decode_writes_into_a_local_folder_only(bucket, inputs, model_dir, tmp_path):
    result = invoke("decode", tmp_path / "no-tokens", bucket.url("decoded"), "--model", model_dir)
    assert result.exit_code == 1 and "decode writes images into a local folder" in result.output
