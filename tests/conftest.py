"""Builders shared by the tests: WebDataset shards and encoded images, made on the spot in tmp_path."""

import io

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


@pytest.fixture
def make_shard(tmp_path):
    """make_shard(name, samples) -> the path of a shard written in tmp_path."""

    def make(name: str, samples: list[dict]) -> str:
        return write_shard(tmp_path / name, samples)

    return make
