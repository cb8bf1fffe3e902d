"""Token dataset -> images: the decoder behind `vqtok decode`.

Reads a token dataset written by `vqtok encode`, one of its Parquet files, or any Parquet file with a `key` and
a `codes` column of (h, w) grids (what a prior samples). Of a dataset whose run did not finish, the committed
parts are decoded, and the result says how far it got. Checked before the first image is written: that every
file's codes were made by this model, that every code lies in [0, K) (for vqtok's own files, from the row-group
statistics, and again on each batch as it is decoded), that the keys asked for exist. A row group the
statistics vouch for is not read beforehand, so a row in it without a key is found when its batch is, and the
decode stops there (a WebDataset shard it was writing is removed). Keys are data from strangers: they become
file names only through `key_path`, which keeps every file inside the output folder.

Under `accelerate launch` or torchrun, batch i of the selection goes to process i mod world size. Every process
still reads every batch's keys and names them all in one order, so a key's file name does not depend on how many
processes there are; the processes never talk to each other.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import unicodedata
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from vqtok.distributed import process_rank
from vqtok.errors import ConfigError, StoreError
from vqtok.files import write_atomically
from vqtok.progress import ProgressBar
from vqtok.storage import is_url
from vqtok.tokenizers import load_tokenizer, pick_device
from vqtok.tokens.format import RESERVED_COLUMNS, codes_array
from vqtok.tokens.reader import TokenSet, check_code_range

FORMATS = ("png", "wds")
WDS_SHARD_SAMPLES = 10_000
_UNSAFE = re.compile(r"[\x00-\x1f\x7f%\\.]")  # control characters, dots, and % and \ for unambiguity


@dataclass
class DecodeResult:
    out: Path
    rank: int = 0
    world_size: int = 1
    images: int = 0  # this process's
    renamed: int = 0  # keys of the whole selection whose name another key had taken, written under a longer one
    files: int = 0  # PNG files, or tar shards with --format wds, that this process wrote
    seconds: float = 0.0
    decode_seconds: float = 0.0  # the model
    write_seconds: float = 0.0  # the main process waiting for PNG encoding and writing
    unfinished: dict[str, str] = field(default_factory=dict)  # token dataset -> how far it got, if it did not finish

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def key_path(key: str) -> PurePosixPath:
    """A key -> a relative path that stays inside the folder it is joined to, keeping the key's sub-folders.

    `/` separates folders and empty parts are dropped; `.`, `%`, `\\` and control characters are %-escaped
    (so `../../x` becomes `%2E%2E/%2E%2E/x`), and over-long names are shortened with a hash. With no dot
    left in any part, a folder can never be named like a file (`KEY.png`), and WebDataset, which splits a
    member name at its first dot, reads the key back whole.
    """
    parts = []
    for part in key.split("/"):
        if not part:
            continue
        part = _UNSAFE.sub(lambda m: f"%{ord(m.group()):02X}", part)
        if len(part.encode()) > 200:  # file systems stop at 255 bytes; room for a suffix and extension
            part = part.encode()[:180].decode(errors="ignore") + "~" + hashlib.sha256(part.encode()).hexdigest()[:12]
        parts.append(part)
    return PurePosixPath(*parts) if parts else PurePosixPath("%00")


class UniqueNames:
    """Keys -> distinct relative names: a key whose name another took (`a//b` and `a/b`, or `A` and `a` on
    a file system that ignores case) gets a suffix made from a hash of the key, and a counter if need be."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.renamed = 0

    def claim(self, key: str) -> PurePosixPath:
        name = key_path(key)
        if self._fold(name) in self.taken:
            self.renamed += 1
            stem, n = f"{name.name}~{hashlib.sha256(key.encode()).hexdigest()[:8]}", 1
            name = name.with_name(stem)
            while self._fold(name) in self.taken:
                n += 1
                name = name.with_name(f"{stem}-{n}")
        self.taken.add(self._fold(name))
        return name

    @staticmethod
    def _fold(name: PurePosixPath) -> str:
        return unicodedata.normalize("NFC", str(name)).casefold()


def decode(
    tokens: str | os.PathLike,
    out: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    format: str = "png",
    limit: int | None = None,
    keys: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    force: bool = False,
    storage_options: dict | None = None,
    show_progress: bool = True,
) -> DecodeResult:
    """Decode the code grids of `tokens` (a local path or a URL) into PNGs (or WebDataset shards) under the
    local folder `out`; of several processes, this one's share of them."""
    if format not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if is_url(os.fspath(out)):
        raise ConfigError(f"decode writes images into a local folder; {out} is a URL")
    started = time.perf_counter()
    rank, world_size = process_rank()
    model = load_tokenizer(model_dir, device=pick_device(device), storage_options=storage_options)
    model.to(memory_format=torch.channels_last)
    # Every file's columns, and one tokenizer; an unfinished dataset's committed parts, which the result notes.
    token_set = TokenSet(tokens, storage_options=storage_options, partial=True)
    token_set.check_tokenizer(model.model_id, model.codebook_size, model.grid_size, force, model.codes_id)
    first = next(iter(token_set.schemas.values()))
    carried = [name for name in first.names if name not in RESERVED_COLUMNS] if format == "wds" else []
    selection = token_set.select(model.codebook_size, keys, limit)
    # The sizes of the batches TokenSet.read yields, in its order: this process decodes every world_size-th.
    batches = [
        min(batch_size, len(rows) - start) for rows in selection.values() for start in range(0, len(rows), batch_size)
    ]

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unfinished = {path: done.describe() for path, done in token_set.unfinished.items()}
    result = DecodeResult(out, rank, world_size, unfinished=unfinished)
    progress = ProgressBar("decode", sum(batches[rank::world_size]), enabled=show_progress and rank == 0)
    names = UniqueNames()
    # A lone process writes decoded-NNNNNN.tar; of several, each puts its rank in its shards' names, so none collide.
    prefix = "decoded" if world_size == 1 else f"decoded-r{rank:03d}"
    writer = PngWriter(out) if format == "png" else WdsWriter(out, prefix)
    with progress, writer:
        for i, table in enumerate(token_set.read(selection, carried, batch_size)):
            keys = table.column("key").to_pylist()
            if None in keys:
                raise StoreError("a row has no key")
            # Claimed for every batch, the other processes' too: two keys that map to one name get the same
            # names in every process, whichever process writes them.
            claimed = [names.claim(key) for key in keys]
            if i % world_size != rank:
                continue
            decoding = time.perf_counter()
            grids = codes_array(table.column("codes"))
            check_code_range(keys, grids, model.codebook_size)  # in case statistics that vouched for rows lied
            images = model.decode(torch.from_numpy(grids))  # (B, 3, H, W) in [0, 1]
            pixels = images.mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
            result.decode_seconds += time.perf_counter() - decoding
            extra = {name: table.column(name).to_pylist() for name in carried}
            writer.write(keys, claimed, pixels, extra)
            result.images += len(pixels)
            progress.update(result.images, f"{result.images / (time.perf_counter() - started):,.0f} img/s")
    result.renamed, result.files, result.write_seconds = names.renamed, writer.files, writer.wait_seconds
    result.seconds = time.perf_counter() - started
    return result


class PngWriter:
    """PNG files named after their keys, encoded and written by a thread pool (zlib and file I/O release the
    GIL) while the model decodes the next batch. A file is written under a temporary name and renamed."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.root = os.path.realpath(out)
        self.ready: set[Path] = set()  # folders known to lie inside out
        self.files = 0
        self.wait_seconds = 0.0
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2)
        self.pending: list[tuple[str, Future]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._wait(0)
        finally:
            self.pool.shutdown()

    def write(self, keys: list[str], names: list[PurePosixPath], pixels: np.ndarray, extra: dict) -> None:
        for key, name, image in zip(keys, names, pixels, strict=True):
            path = self._path_for(key, name)
            self.pending.append((key, self.pool.submit(_write_png, path, image)))
        self._wait(4 * len(keys))  # keep a few batches in flight: memory stays bounded

    def _path_for(self, key: str, name: PurePosixPath) -> Path:
        path = self.out / f"{name}.png"
        self.files += 1
        if path.parent in self.ready:  # checked and made for an earlier key
            return path
        # A folder inside out that is a symbolic link could lead elsewhere: look before creating anything.
        existing = path.parent
        while not existing.exists():
            existing = existing.parent
        self._check_inside(key, existing)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"key {key!r}: cannot make its folder: {exc}") from exc
        self._check_inside(key, path.parent)
        self.ready.add(path.parent)
        return path

    def _check_inside(self, key: str, folder: Path) -> None:
        if os.path.commonpath([self.root, os.path.realpath(folder)]) != self.root:
            raise StoreError(f"key {key!r} leads outside {self.out} through a symbolic link")

    def _wait(self, keep: int) -> None:
        started = time.perf_counter()
        while len(self.pending) > keep:
            key, future = self.pending.pop(0)
            try:
                future.result()
            except OSError as exc:  # a full disk, a name too long for the file system
                raise StoreError(f"key {key!r}: cannot write its PNG: {exc}") from exc
        self.wait_seconds += time.perf_counter() - started


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    # Level 1: several times faster than the default 6, a few percent larger. Not flushed to disk one by one:
    # that would cost more than the decoding, and a lost PNG is made again by running the command again.
    write_atomically(path, lambda p: Image.fromarray(pixels).save(p, "PNG", compress_level=1), durable=False)


class WdsWriter:
    """WebDataset shards `PREFIX-NNNNNN.tar` of WDS_SHARD_SAMPLES samples each (the last may hold fewer): KEY.png
    plus the carried fields, keys made safe as for PNGs. Each shard is written under a temporary name and renamed
    when it is complete; when decoding fails, the shard it was writing is removed, so every published one is whole.
    """

    def __init__(self, out: Path, prefix: str) -> None:
        self.out = out
        self.prefix = prefix
        self.files = 0  # shards published
        self.tar = None  # the shard being written, under self.temporary, and how many samples it holds
        self.temporary: Path | None = None
        self.samples = 0
        self.wait_seconds = 0.0

    def __enter__(self):
        return self

    def __exit__(self, failure, *exc) -> None:
        if self.tar is None:
            return
        if failure is None:
            self._publish()
            return
        try:
            self.tar.close()
        finally:
            self.temporary.unlink(missing_ok=True)

    def write(self, keys: list[str], names: list[PurePosixPath], pixels: np.ndarray, extra: dict) -> None:
        import io

        from PIL import Image

        started = time.perf_counter()
        for i, (name, image) in enumerate(zip(names, pixels, strict=True)):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG", compress_level=1)
            sample = {"__key__": str(name), "png": buffer.getvalue()}
            sample.update({field: str(values[i]) for field, values in extra.items() if values[i] is not None})
            if self.tar is None:
                self._open()
            self.tar.write(sample)
            self.samples += 1
            if self.samples == WDS_SHARD_SAMPLES:
                self._publish()
        self.wait_seconds += time.perf_counter() - started

    def _open(self) -> None:
        import webdataset

        self.temporary = self.out / f".{self.prefix}-{self.files:06d}.tar.tmp"
        self.tar = webdataset.TarWriter(str(self.temporary))
        self.samples = 0

    def _publish(self) -> None:
        self.tar.close()
        os.replace(self.temporary, self.out / f"{self.prefix}-{self.files:06d}.tar")
        self.tar = None
        self.files += 1
