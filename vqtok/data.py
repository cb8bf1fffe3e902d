"""Samples -> images: safe decoding, crops, and the datasets and loaders that training and evaluation read.

Samples come from shards, image folders or Parquet files (`vqtok.sources`, whose names are available here
too). Reading runs over millions of images unattended, so nothing a file contains may stop it: an image that
cannot be decoded becomes an error record (key, unit, reason), a unit that breaks mid-way yields the samples
before the break and one error record, and the caller decides what to do with them (encode writes them to
`_errors/`, training drops them).
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqtok.errors import DataError, plural
from vqtok.sources import (  # noqa: F401  (BrokenShardError, expand_inputs...: part of this module's interface)
    IMAGE_EXTENSIONS,
    IMAGE_FIELD,
    BrokenShardError,
    Sample,
    Unit,
    expand_inputs,
    iter_samples,
)

MAX_PIXELS = 100_000_000
WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An image that cannot be decoded; its message is the short reason that goes into the error record."""


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 (B, 3, S, S), the records that decoded
    keys: list[str]  # one per image
    shards: list[str]
    errors: list[tuple[str, str, str]]  # (key, shard, reason) of the records that did not


# ---------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> an RGB image, or ImageError with a short reason.

    Sizes are checked from the header before any pixel is decoded. PIL's own limit
    (`PIL.Image.MAX_IMAGE_PIXELS`) applies as well, since it also guards frames and tiles the header does not
    describe. With `size`, a large JPEG is decoded at 1/2, 1/4 or 1/8 scale, its shorter side kept >= size.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{width}x{height} is more than {max_pixels} pixels")
            if size is not None and img.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra views
                img.draft("RGB", (size, size))  # the DCT decoder downsamples for free; a no-op when not 2x larger
            img.load()
            return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageError("not an image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"too many pixels: {exc}") from exc
    except Exception as exc:  # PIL's plugins raise a zoo of types (OSError, SyntaxError, struct.error...) on bad data
        raise ImageError(f"truncated or corrupt: {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(img), "L").convert("RGB")
    if img.mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in img.info:  # palette or colour-key alpha too
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, HSV


def _to_uint8(img: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float gray image -> uint8, scaled by the range its data is stored in.

    PIL's own conversion clips at 255, which turns most 16-bit images white.
    """
    values = np.nan_to_num(np.asarray(img).astype(np.float64))
    low, high = values.min(), values.max()
    if img.mode == "F":
        top = 1.0 if 0 <= low and high <= 1 else 255.0 if 0 <= low and high <= 255 else None
    else:  # 16-bit data, also when PIL holds it in a 32-bit "I" image (16-bit PGM)
        top = 65535.0 if 0 <= low and high <= 65535 else None
    if top is None:  # no range to read from the data type: stretch what is there
        values, top = values - low, max(high - low, 1e-12)
    return np.rint(values * (255.0 / top)).clip(0, 255).astype(np.uint8)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side resized to `size`, then the centre `size` x `size` square."""
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return _resize(img, size, (left, top, left + side, top + side))


def random_crop_flip(img: Image.Image, size: int, rng: random.Random) -> Image.Image:
    """Shorter side resized to `size`, a random `size` x `size` square, mirrored with probability 1/2."""
    width, height = img.size
    scale = size / min(width, height)
    # The offset is drawn in whole pixels of the resized image, then mapped back to the source.
    left = rng.randint(0, max(0, round(width * scale) - size)) / scale
    top = rng.randint(0, max(0, round(height * scale) - size)) / scale
    side = size / scale
    crop = _resize(img, size, (left, top, min(width, left + side), min(height, top + side)))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _resize(img: Image.Image, size: int, box: tuple[float, float, float, float]) -> Image.Image:
    # Resizing only the box crops and scales in one step, without rounding an intermediate image's size.
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image -> uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


# ---------------------------------------------------------------------------------------------- datasets


def _image_field(fields: dict[str, object]) -> bytes | None:
    # The last part of the extension names the format, as in webdataset's decoders: "seg.png" is a PNG. A
    # Parquet row's image is IMAGE_FIELD, its format left to the decoder to recognise.
    for name, data in fields.items():
        if name == IMAGE_FIELD or name.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
            return data
    return None


def sample_image(sample: Sample, image_size: int, train_rng: random.Random | None = None) -> torch.Tensor:
    """A sample's image as uint8 (3, S, S): centre-cropped, or randomly cropped and flipped with `train_rng`.

    Raises ImageError with the reason when the sample has no image or it cannot be decoded.
    """
    if sample.error is not None:
        raise ImageError(sample.error)
    data = _image_field(sample.fields)
    if data is None:
        raise ImageError(f"no image field (fields: {', '.join(sample.fields) or 'none'})")
    img = decode_image(data, image_size)
    img = center_crop(img, image_size) if train_rng is None else random_crop_flip(img, image_size, train_rng)
    return to_tensor(img)


class ImageDataset(IterableDataset):
    """Units of work (`vqtok.sources`; a string is a tar shard) -> records {"key", "shard": the unit's name,
    "image": uint8 (3, S, S) or None, "error": reason or None}.

    `resample=False` (evaluation): every sample exactly once, units split across processes
    (unit i goes to rank i % world_size) and then across DataLoader workers; a broken unit adds one record
    with the key of the sample it broke in ("" before any). `resample=True` (training): an endless, shuffled
    stream of good images, each (rank, worker) drawing units at random with its own seed.
    """

    def __init__(
        self,
        shards: Sequence[Unit | str],
        image_size: int,
        *,
        train: bool = False,
        resample: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
    ) -> None:
        if not shards:
            raise DataError("no shards given")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards = list(shards)
        self.image_size = image_size
        self.train = train
        self.resample = resample
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self._passes = 0  # passes over the data in this process, so that each one crops and draws afresh

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = random.Random(f"vqtok:{self.seed}:{self.rank}:{worker}:{self._passes}")
        self._passes += 1
        if self.resample:
            return self._resampled(rng)
        mine = self.shards[self.rank :: self.world_size][worker::num_workers]
        return (record for unit in mine for record in self._records(unit, rng))

    def _records(self, unit: Unit | str, rng: random.Random) -> Iterator[dict]:
        try:
            for sample in iter_samples(unit):
                yield self._record(sample, rng)
        except DataError as exc:
            name = unit if isinstance(unit, str) else unit.name
            yield {"key": getattr(exc, "key", ""), "shard": name, "image": None, "error": str(exc)}

    def _record(self, sample: Sample, rng: random.Random) -> dict:
        record = {"key": sample.key, "shard": sample.shard, "image": None, "error": None}
        try:
            record["image"] = sample_image(sample, self.image_size, rng if self.train else None)
        except ImageError as exc:
            record["error"] = str(exc)
        return record

    def _resampled(self, rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        barren: set[int] = set()  # units whose last reading gave no image
        while True:
            index = rng.randrange(len(self.shards))
            found = False
            for record in self._records(self.shards[index], rng):
                if record["image"] is None:
                    continue
                found = True
                buffer.append(record)
                if len(buffer) >= self.shuffle_buffer:
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
            if found:
                barren.discard(index)
                continue
            barren.add(index)
            # Random draws reach every unit eventually; once each has given nothing, more draws never will.
            if len(barren) == len(self.shards):
                shards = f"{len(barren)} {plural(len(barren), 'shard')}"
                raise DataError(f"none of the {shards} holds an image that can be decoded")


def collate(records: list[dict], image_size: int | None = None) -> Batch:
    """Records -> a Batch of the images that decoded, and (key, shard, reason) for the others."""
    good = [r for r in records if r["image"] is not None]
    if good:
        images = torch.stack([r["image"] for r in good])
    else:
        side = image_size or 0
        images = torch.empty(0, 3, side, side, dtype=torch.uint8)
    errors = [(r["key"], r["shard"], r["error"]) for r in records if r["image"] is None]
    return Batch(images, [r["key"] for r in good], [r["shard"] for r in good], errors)


def make_loader(
    shards: Sequence[Unit | str],
    image_size: int,
    batch_size: int,
    *,
    train: bool = False,
    resample: bool = False,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 1000,
) -> DataLoader:
    """A DataLoader of Batches over an ImageDataset; a batch holds batch_size records, good or not."""
    dataset = ImageDataset(
        shards,
        image_size,
        train=train,
        resample=resample,
        seed=seed,
        rank=rank,
        world_size=world_size,
        shuffle_buffer=shuffle_buffer,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        collate_fn=partial(collate, image_size=image_size),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
    )
