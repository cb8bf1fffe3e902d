"""Images -> token dataset: the batch tokenizer behind `vqtok encode`.

The unit of work is a shard, a slice of an image folder's listing or a Parquet file (`vqtok.sources`; all
called shards here): it becomes one part file, committed whole (see `vqtok.tokens.writer`). Under torchrun or
`accelerate launch` (RANK, WORLD_SIZE), shard i goes to process i % WORLD_SIZE, and within a process to one
DataLoader worker, so processes never talk and no sample is padded or read twice. Workers read, decode and
crop; each batch they hand over belongs to one shard, and the last batch of a shard says so, which lets the
main process, busy running the model, commit shards as they end without holding more than a batch each.

With `augment`, each image's extra views (`vqtok.tokens.format.AUGMENT_VIEWS`) are encoded beside it, on the device:
the plain crop mirrored, or ten crops of a larger centre square that the workers make as well.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vqtok.data import sample_image
from vqtok.distributed import process_rank
from vqtok.errors import MAX_ERROR_RATE, ConfigError, DataError, ErrorTally
from vqtok.progress import ProgressBar
from vqtok.sources import FILES_PER_PART, Unit, expand_inputs, iter_samples
from vqtok.tokenizers import Tokenizer, load_tokenizer, pick_device
from vqtok.tokens.format import AUGMENT_VIEWS, TEN_CROP_RANGE, TokenSettings, check_keep, parse_kept
from vqtok.tokens.writer import TokenStore

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# How images become model inputs (`vqtok.data.sample_image`), recorded with the codes.
PREPROCESSING = "RGB, alpha over white; shorter side resized to image_size (bicubic); centre square crop"
# A shard whose samples all failed is committed as done, its samples rows of _errors/: a plain rerun skips it.
RETRY = "The parts committed are kept and count as done: after fixing the cause, run again with --overwrite"


@dataclass
class EncodeResult:
    out: Path | str  # a URL when the dataset is in a store
    rank: int = 0
    world_size: int = 1
    shards: int = 0  # given to this process
    skipped: int = 0  # done by an earlier run
    encoded: int = 0  # done now
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard, reason): not readable to the end
    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0  # the main process waiting for decoded images
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    decode_seconds: float = 0.0  # worker time reading and decoding, summed over workers
    totals: dict | None = None  # the whole dataset's counts, once every shard is done and _SUCCESS written
    tally: ErrorTally = field(default_factory=ErrorTally)  # this run's samples and why those that failed did

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


class ShardBatches(IterableDataset):
    """Units -> batches of one unit each: {"shard" (its name), "images" uint8 (B, 3, S, S), "keys", "kept",
    "errors", "last", and on the last batch "samples", "failure", "read_seconds"}. `keep` is the carried
    fields, `keep_types` their column types. With `large_size` L, "large" holds each image's centre square
    cropped to L as well, uint8 (B, 3, L, L), which ten-crop cuts its crops from."""

    def __init__(
        self,
        units: Sequence[Unit | str],
        image_size: int,
        batch_size: int,
        keep: Sequence[str] = (),
        keep_types: Sequence[str] = (),
        large_size: int | None = None,
    ) -> None:
        self.units = list(units)
        self.image_size = image_size
        self.batch_size = batch_size
        self.keep = tuple(keep)
        self.keep_types = tuple(keep_types) or ("",) * len(self.keep)
        self.large_size = large_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units[worker::num_workers]:
            yield from self._batches(unit)

    def _batches(self, unit: Unit | str) -> Iterator[dict]:
        shard = unit if isinstance(unit, str) else unit.name
        batch = self._empty(shard)
        samples, failure, busy = 0, None, 0.0
        resumed = time.perf_counter()
        try:
            for sample in iter_samples(unit):
                samples += 1
                try:
                    image = sample_image(sample, self.image_size)
                    # Decoded again for the larger size: a JPEG is decoded at a scale that suits the size
                    # asked for, and the plain view must be the one a run without augmentation sees.
                    large = sample_image(sample, self.large_size) if self.large_size else None
                    kept = {
                        name: parse_kept(name, sample.fields.get(name), column_type)
                        for name, column_type in zip(self.keep, self.keep_types, strict=True)
                    }
                except ValueError as exc:  # ImageError, or a carried field that does not fit its column
                    batch["errors"].append((sample.key, str(exc)))
                    continue
                batch["images"].append(image)
                if large is not None:
                    batch["large"].append(large)
                batch["keys"].append(sample.key)
                for name, value in kept.items():
                    batch["kept"][name].append(value)
                if len(batch["images"]) == self.batch_size:
                    busy += time.perf_counter() - resumed
                    yield self._stack(batch)
                    resumed = time.perf_counter()
                    batch = self._empty(shard)
        except DataError as exc:  # cut or corrupt tar, a unit that cannot be opened or read to its end
            failure = str(exc)
            batch["errors"].append((getattr(exc, "key", ""), failure))  # the sample it broke in, if any
        busy += time.perf_counter() - resumed
        yield {**self._stack(batch), "last": True, "samples": samples, "failure": failure, "read_seconds": busy}

    def _empty(self, shard: str) -> dict:
        batch = {"shard": shard, "images": [], "keys": [], "kept": {n: [] for n in self.keep}, "errors": []}
        return {**batch, "large": []} if self.large_size else batch

    def _stack(self, batch: dict) -> dict:
        stacked = {**batch, "images": _stack_images(batch["images"], self.image_size), "last": False}
        if self.large_size:
            stacked["large"] = _stack_images(batch["large"], self.large_size)
        return stacked


def _stack_images(images: list[torch.Tensor], side: int) -> torch.Tensor:
    return torch.stack(images) if images else torch.empty(0, 3, side, side, dtype=torch.uint8)


def encode(
    inputs: Sequence[str],
    out: str | os.PathLike,
    model_dir: str | os.PathLike,
    *,
    image_size: int | None = None,
    batch_size: int = 256,
    num_workers: int = 2,
    keep: Sequence[str] = (),
    class_from_folder: bool = False,
    image_column: str | None = None,
    image_root: str | os.PathLike | None = None,
    files_per_part: int = FILES_PER_PART,
    device: str = "auto",
    precision: str = "fp32",
    overwrite: bool = False,
    max_error_rate: float = MAX_ERROR_RATE,
    storage_options: dict | None = None,
    show_progress: bool = True,
    augment: str = "none",
) -> EncodeResult:
    """Tokenize the images of `inputs` (shards, image folders, Parquet files; paths or URLs) into the token
    dataset `out`, skipping the units an earlier run finished. With `class_from_folder`, an image folder's
    first level becomes the carried integer `cls`; `image_root` reads Parquet rows that hold only a path
    (`vqtok.sources.expand_inputs`). With `augment` ("flip" or "ten-crop"), each row also holds the codes of
    the image's extra views, as LlamaGen's extract_codes_c2i.py makes them.

    TooManyErrors when every sample this process read failed, or more than `max_error_rate` of them (judged
    once 1,000 were seen, and at the end): the shards committed until then stay done, and `_SUCCESS` is not
    written. Each process judges its own samples; whichever finds every shard done judges the whole dataset,
    earlier runs included, so that a rerun skipping shards of nothing but errors fails as the first run did."""
    if augment not in AUGMENT_VIEWS:
        raise ConfigError(f"augment must be one of {', '.join(AUGMENT_VIEWS)}, not {augment!r}")
    started = time.perf_counter()
    tally = ErrorTally(max_error_rate)
    keep = check_keep([*keep, *(["cls"] if class_from_folder else [])])
    # One shard, one name: expand_inputs resolves `shards/x.tar`, `./shards/x.tar` and a link to it alike.
    found = expand_inputs(
        inputs,
        files_per_part=files_per_part,
        class_from_folder=class_from_folder,
        image_column=image_column,
        keep=keep,
        image_root=image_root,
        storage_options=storage_options,
    )
    urls = found.names
    rank, world_size = process_rank()
    torch_device = pick_device(device)
    autocast_dtype = pick_precision(precision, torch_device)
    model = load_tokenizer(model_dir, device=torch_device, storage_options=storage_options)
    model.to(memory_format=torch.channels_last)  # the layout CPU (oneDNN) and GPU convolutions run fastest in
    image_size = image_size or model.config.image_size
    settings = TokenSettings(
        model_id=model.model_id,
        codes_id=model.codes_id,
        codebook_size=model.codebook_size,
        grid=model.grid_size(image_size),
        image_size=image_size,
        preprocessing=PREPROCESSING,
        keep=keep,
        precision=precision,
        keep_types=found.kept_types,
        classes=found.classes,
        augment=augment,
    )
    store = TokenStore(out, settings, storage_options)
    mine = urls[rank::world_size]
    store.open(urls, mine, overwrite=overwrite, tidy=rank == 0, listings=found.listings)
    pending = set(store.pending(mine))
    todo = [unit for unit in found.units[rank::world_size] if unit.name in pending]

    result = EncodeResult(store.path, rank, world_size, shards=len(mine), skipped=len(mine) - len(todo), tally=tally)
    kinds = {unit.COUNTED_AS for unit in found.units}
    counted_as = kinds.pop() if len(kinds) == 1 else Unit.COUNTED_AS  # the inputs' own word, unless they mix
    progress = ProgressBar(
        f"encode {counted_as}", len(mine), len(mine) - len(todo), enabled=show_progress and rank == 0
    )
    if todo:
        large_size = int(image_size * TEN_CROP_RANGE) if augment == "ten-crop" else None  # LlamaGen's crop_size
        loader = DataLoader(
            ShardBatches(todo, image_size, batch_size, settings.keep, settings.keep_types, large_size),
            batch_size=None,  # batches are made in the workers, one shard each
            num_workers=min(num_workers, len(todo)),
            pin_memory=torch_device.type == "cuda",
            prefetch_factor=4 if num_workers else None,
        )
        with progress:
            _run(loader, model, store, autocast_dtype, result, progress, started)
    tally.check("encoded", final=True, advice=RETRY)
    result.totals = store.finish(urls, max_error_rate, advice=RETRY)
    result.seconds = time.perf_counter() - started
    return result


def _run(
    loader, model: Tokenizer, store: TokenStore, autocast_dtype, result: EncodeResult, progress, started: float
) -> None:
    writers = {}
    encode_seconds: dict[str, float] = {}
    try:
        waited = time.perf_counter()
        for batch in loader:
            result.wait_seconds += time.perf_counter() - waited
            shard = batch["shard"]
            writer = writers.get(shard) or writers.setdefault(shard, store.writer(shard))
            if len(batch["keys"]):
                encoding = time.perf_counter()
                codes = encode_images(model, batch["images"], autocast_dtype)
                augment = store.settings.augment
                views = None if augment == "none" else encode_views(model, batch, augment, autocast_dtype)
                encode_seconds[shard] = encode_seconds.get(shard, 0.0) + time.perf_counter() - encoding
                writer.add(batch["keys"], codes, batch["kept"], views)
            writer.add_errors([tuple(error) for error in batch["errors"]])  # DataLoader hands tuples over as lists
            result.images += len(batch["keys"])
            result.errors += len(batch["errors"])
            reasons = [reason for _, reason in batch["errors"]]
            if batch["last"] and batch["failure"]:  # the break, added last: a failed shard, retried on its own
                reasons.pop()
            result.tally.add(len(batch["keys"]), reasons)
            if batch["last"]:
                seconds = {"read": round(batch["read_seconds"], 4), "encode": round(encode_seconds.pop(shard, 0.0), 4)}
                marker = writers[shard].commit(
                    {"samples": batch["samples"], "process": result.rank, "seconds": seconds}, batch["failure"]
                )
                del writers[shard]  # only once committed: a failed commit is still aborted below
                result.encode_seconds += seconds["encode"]
                result.write_seconds += marker["seconds"]["write"]
                result.decode_seconds += seconds["read"]
                result.encoded += 1
                if batch["failure"]:
                    result.failed.append((shard, batch["failure"]))
            result.tally.check("encoded", advice=RETRY)
            rate = result.images / (time.perf_counter() - started)
            status = f"{result.images:,} images  {result.errors:,} errors  {rate:,.0f} img/s"
            progress.update(result.skipped + result.encoded, status)
            waited = time.perf_counter()
    finally:
        for writer in writers.values():  # shards cut short by an exception: nothing of them becomes visible
            writer.abort()


def encode_images(model: Tokenizer, images: torch.Tensor, autocast_dtype: torch.dtype | None = None):
    """uint8 (B, 3, S, S) -> codes as a numpy array (B, h, w), in the smallest type that holds K."""
    x = images.to(model.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    x = x.float().div_(255)  # (B, 3, S, S) in [0, 1], converted on the device: 4x less to copy
    with torch.inference_mode(), torch.autocast(model.device.type, autocast_dtype, enabled=autocast_dtype is not None):
        codes = model.encode(x)  # (B, h, w)
    dtype = torch.int32 if model.codebook_size > 2**16 else torch.uint16
    return codes.to(dtype).cpu().numpy()


def augmented_views(images: torch.Tensor, large: torch.Tensor | None, augment: str) -> torch.Tensor:
    """The extra views of a batch, uint8 (B, V, 3, S, S) in the order of AUGMENT_VIEWS[augment]: for "flip" the
    images (B, 3, S, S) mirrored left to right; for "ten-crop" torchvision's TenCrop(S) of the larger squares
    `large` (B, 3, L, L): four corners and the centre, then the same five of the squares mirrored."""
    if augment == "flip":
        return images.flip(-1)[:, None]
    side, full = images.shape[-1], large.shape[-1]
    centre = int(round((full - side) / 2))  # as torchvision's center_crop rounds
    corners = [(0, 0), (0, full - side), (full - side, 0), (full - side, full - side), (centre, centre)]
    squares = (large, large.flip(-1))
    crops = [square[..., top : top + side, left : left + side] for square in squares for top, left in corners]
    return torch.stack(crops, dim=1)


def encode_views(model: Tokenizer, batch: dict, augment: str, autocast_dtype: torch.dtype | None) -> np.ndarray:
    """The extra views of a batch of ShardBatches (see `augmented_views`), cut on the device and encoded B at a
    time, so that the model never sees more images at once than --batch-size -> codes (B, V, h, w)."""
    device = model.device
    large = batch["large"].to(device, non_blocking=True) if "large" in batch else None
    views = augmented_views(batch["images"].to(device, non_blocking=True), large, augment)  # (B, V, 3, S, S)
    flat = views.flatten(0, 1)  # (B * V, 3, S, S)
    step = len(views)
    codes = [encode_images(model, flat[i : i + step], autocast_dtype) for i in range(0, len(flat), step)]
    codes = np.concatenate(codes)  # (B * V, h, w)
    return codes.reshape(*views.shape[:2], *codes.shape[1:])


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    if name not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {name!r}")
    dtype = PRECISIONS[name]
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU does not support bfloat16; use fp16 or fp32")
    return dtype
