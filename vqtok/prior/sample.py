"""Prior -> token dataset: the sampler behind `vqtok prior sample`.

OUT is a token dataset as `vqtok encode` writes them (`vqtok.tokens`), whose metadata names the tokenizer the
prior's training tokens came from (model id, codes id where they recorded one, K, grid, image size):
`vqtok decode OUT images/ --model TOKENIZER` turns it into images with that tokenizer or one that shares its
codes (a decoder-only fine-tune of it), and refuses any other. Rows: `key` (`sample-000000`, ...), `shard`, `codes`
and `cls` (empty for grids sampled without a class); the metadata's `preprocessing` says how they were drawn.

The grids are drawn in shards of SHARD_ROWS, each with its own random generator seeded from the seed and
the shard's number, and each committed whole: the same seed gives the same codes whatever the batch size;
running the same command again skips the shards already done, which is how an interrupted run resumes; and
under `accelerate launch` or torchrun shard i goes to process i mod world size.

The prior and OUT may be URLs that fsspec opens, with `storage_options` for both.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vqtok.distributed import process_rank
from vqtok.errors import ConfigError
from vqtok.pretrained import CONFIG_NAME, run_model
from vqtok.progress import ProgressBar
from vqtok.storage import Location
from vqtok.tokenizers import pick_device
from vqtok.tokens import TokenSettings, TokenStore

from .model import Prior

SHARD_ROWS = 1024
DEFAULT_N = 64


@dataclass
class SampleResult:
    out: Path | str  # a URL when OUT is in a store
    rank: int = 0
    world_size: int = 1
    grids: int = 0  # sampled now by this process
    shards: int = 0  # given to this process
    skipped: int = 0  # done by an earlier run
    seconds: float = 0.0
    tokenizer: str | None = None  # the model id that decodes the grids
    total: int | None = None  # grids in the dataset, once every shard is done
    codes_per_grid: int = 0

    @property
    def codes_per_second(self) -> float:
        return self.grids * self.codes_per_grid / self.seconds if self.seconds else 0.0


def row_classes(prior: Prior, n: int | None, cls, per_class: int | None) -> list[int | None]:
    """Each grid's class: none; one class for all (an int); a list cycled through; or per_class of each class."""
    classes = prior.config.num_classes
    if per_class is not None:
        if cls is not None:
            raise ConfigError("--cls and --per-class exclude each other")
        if n is not None:
            raise ConfigError("--n and --per-class exclude each other: --per-class N makes N grids of each class")
        if not classes:
            raise ConfigError("--per-class: this prior is unconditional")
        return [label for label in range(classes) for _ in range(per_class)]
    n = DEFAULT_N if n is None else n
    if cls is None:
        return [None] * n
    labels = [cls] if isinstance(cls, int) else list(cls)
    if not labels:
        raise ConfigError("--cls: no class given")
    if not classes:
        raise ConfigError("--cls: this prior is unconditional")
    outside = [c for c in labels if not 0 <= c < classes]
    if outside:
        raise ConfigError(f"--cls {outside[0]}: this prior's classes are 0 to {classes - 1}")
    return [labels[i % len(labels)] for i in range(n)]


def shard_generator(seed: int, shard: int) -> torch.Generator:
    digest = hashlib.sha256(f"vqtok-prior-sample:{seed}:{shard}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample(
    prior_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n: int | None = None,
    cls: int | list[int] | None = None,
    per_class: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    overwrite: bool = False,
    show_progress: bool = True,
    storage_options: dict | None = None,
) -> SampleResult:
    """Sample grids from the prior in prior_dir (or in the run folder prior_dir/model) into the token dataset
    `out`, skipping shards already done. Either may be a URL (`storage_options` go to fsspec)."""
    started = time.perf_counter()
    rank, world_size = process_rank()
    prior_dir = Location.of(prior_dir, storage_options)
    if not prior_dir.join(CONFIG_NAME).exists():
        prior_dir = run_model(prior_dir) or prior_dir  # a run folder of vqtok prior fit: its exported prior
    prior = Prior.from_pretrained(prior_dir, device=pick_device(device))
    config = prior.config
    if config.tokenizer is None or config.image_size is None:
        raise ConfigError(f"{prior_dir}: the prior does not record the tokenizer its codes belong to")
    labels = row_classes(prior, n, cls, per_class)
    if guidance != 0 and None in labels:
        raise ConfigError("--guidance needs classes to guide towards: give --cls or --per-class")
    how = {
        "prior": prior.model_id,
        "n": len(labels),
        "classes": "per class" if per_class is not None else cls,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "guidance": guidance,
        "seed": seed,
    }
    settings = TokenSettings(
        model_id=config.tokenizer,
        codes_id=config.codes_id,
        codebook_size=config.codebook_size,
        grid=config.grid,
        image_size=config.image_size,
        preprocessing=f"sampled from a prior: {json.dumps(how)}",
        keep=("cls",),
    )
    store = TokenStore(out, settings, storage_options)
    shards = [f"samples-{i:06d}" for i in range(-(-len(labels) // SHARD_ROWS))]
    mine = shards[rank::world_size]
    store.open(shards, mine, overwrite=overwrite, tidy=rank == 0)
    todo = [shard for shard in mine if not store.done(shard)]
    result = SampleResult(store.path, rank, world_size, shards=len(mine), skipped=len(mine) - len(todo))
    result.tokenizer, result.codes_per_grid = config.tokenizer, config.length

    def rows_of(shard: str) -> range:
        start = int(shard.rsplit("-", 1)[1]) * SHARD_ROWS
        return range(start, min(start + SHARD_ROWS, len(labels)))

    progress = ProgressBar("prior sample", sum(len(rows_of(s)) for s in todo), enabled=show_progress and rank == 0)
    with progress:
        for shard in todo:
            rows = rows_of(shard)
            generator = shard_generator(seed, int(shard.rsplit("-", 1)[1]))
            writer = store.writer(shard)
            try:
                shard_started = time.perf_counter()
                for start in range(rows.start, rows.stop, batch_size):
                    batch = range(start, min(start + batch_size, rows.stop))
                    batch_labels = [labels[i] for i in batch]
                    codes = prior.sample(
                        len(batch),
                        cls=None if batch_labels[0] is None else batch_labels,
                        temperature=temperature,
                        top_k=top_k,
                        top_p=top_p,
                        guidance=guidance,
                        generator=generator,
                    )  # (b, h, w)
                    keys = [f"sample-{i:06d}" for i in batch]
                    writer.add(keys, codes.cpu().numpy(), {"cls": batch_labels})
                    result.grids += len(batch)
                    rate = result.grids * config.length / (time.perf_counter() - started)
                    progress.update(result.grids, f"{rate:,.0f} codes/s")
                seconds = {"sample": round(time.perf_counter() - shard_started, 4)}
                writer.commit({"samples": len(rows), "process": rank, "seconds": seconds})
            except BaseException:
                writer.abort()
                raise
    totals = store.finish(shards)
    result.total = totals["rows"] if totals else None
    result.seconds = time.perf_counter() - started
    return result
