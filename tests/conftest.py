"""Builders shared by the tests: WebDataset shards and encoded images, made on the spot in tmp_path."""

import io
import json
import os
import signal
import socket
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image


def image_bytes(image, fmt: str = "PNG", **save_options) -> bytes:
    """A PIL image or a uint8/uint16 array ((H, W) or (H, W, C)) -> the bytes of an image file."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def random_image(seed: int, height: int = 24, width: int = 32) -> np.ndarray:
    """A (H, W, 3) uint8 array of noise, different for each seed."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_shard(path, samples: list[dict]) -> str:
    """Write samples as a WebDataset tar: each a dict of "__key__" and extension -> bytes (or str, int)."""
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def image_samples(keys, seed: int = 0) -> list[dict]:
    """One PNG and a class label per key."""
    return [
        {"__key__": key, "png": image_bytes(random_image(seed + i)), "cls": str(i).encode()}
        for i, key in enumerate(keys)
    ]


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels."""
    data = bytearray(image_bytes(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR: length, "IHDR", then width and height
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)


def bad_samples() -> list[dict]:
    """One sample of each kind that cannot become an image, keyed by what is wrong with it."""
    return [
        {"__key__": "truncated", "jpg": image_bytes(random_image(5, 64, 64), "JPEG")[:300]},
        {"__key__": "empty", "png": b""},
        {"__key__": "text", "jpg": b"hello"},
        {"__key__": "bomb", "png": bomb_png(30000, 30000)},
        {"__key__": "label-only", "cls": b"3"},
    ]


def broken_copy(path, cut=None, overwrite=None):
    """A copy of a shard cut at byte `cut`, or with 100 bytes of garbage written at `overwrite`."""
    data = bytearray(Path(path).read_bytes())
    if overwrite is not None:
        data[overwrite : overwrite + 100] = b"\xff" * 100
    broken = path.replace(".tar", "-broken.tar")
    Path(broken).write_bytes(bytes(data[:cut]))
    return broken


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out: Path) -> list[dict]:
    """A run folder's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_and_resume(command: list[str], out: Path, steps: int, change: list[str], changed: str) -> None:
    """Run a training command of `steps` steps that saves a checkpoint every 5, kill it (SIGKILL, its whole
    process group) after its second checkpoint, and check that it resumes from the last one: the same command
    without --resume and with --resume plus the `change` option are refused, with --resume it finishes."""
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "step-000010").is_dir():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its second checkpoint"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    killed_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-??????"))
    assert 10 <= killed_at < steps

    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    other = subprocess.run([*command, "--resume", *change], capture_output=True, text=True)
    assert other.returncode == 1 and f"{changed} changed" in other.stderr

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "resumed_from" in m] == [0, killed_at]  # not from step 0 again
    assert [m["step"] for m in metrics if "loss" in m][-1] == steps


@pytest.fixture
def make_shard(tmp_path):
    """make_shard(name, samples) -> the path of a shard written in tmp_path."""

    def make(name: str, samples: list[dict]) -> str:
        return write_shard(tmp_path / name, samples)

    return make


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A small untrained model whose codebook is spread over its encoder's outputs, so codes vary."""
    import torch

    from vqtok import VQVAE, ModelConfig

    torch.manual_seed(0)
    model = VQVAE(ModelConfig(hidden_channels=8, codebook_size=32, code_dim=4, image_size=16))
    with torch.no_grad():
        z = model.encoder(torch.rand(8, 3, 16, 16) * 2 - 1)  # (8, D, 4, 4)
        model.quantizer.codebook.copy_(z.permute(0, 2, 3, 1).reshape(-1, 4)[torch.randperm(128)[:32]])
    return str(model.save_pretrained(tmp_path_factory.mktemp("model") / "model"))


@pytest.fixture
def fresh_accelerate_state():
    """Accelerator state is a process-wide singleton; each in-process fit starts from a clean one."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
