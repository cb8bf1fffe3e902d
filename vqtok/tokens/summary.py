"""What a token dataset holds, as `vqtok info` reports it: rows, shards, errors, grid, K, model id, codebook
usage, bits per code, bytes per image, and how far its last run got. No torch.

An unfinished dataset is summarised too, over its committed parts, and says so: `complete` is False and
`progress` says how many shards are done.
"""

from __future__ import annotations

import os

import numpy as np

from vqtok.errors import StoreError
from vqtok.storage import Location
from vqtok.usage import CodeUsage

from .format import codes_array
from .reader import TokenSet, dataset_files, read_metadata, read_row_group
from .writer import read_errors


def summarize(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """What a token dataset or Parquet file of codes holds: rows, shards, errors, grid, K, model id, codebook
    usage and perplexity, bits per code (order-0 entropy), bytes on disk per image, whether its last run
    finished (and if not, how far it got), and the class names that `cls` numbers."""
    here = Location.of(path, storage_options)
    files, done = dataset_files(here, partial=True)  # the completion is looked up once, here
    folder = not (len(files) == 1 and files[0] == here)
    if folder and done is None and not files:
        raise StoreError(
            f"{here} is neither a model directory (no config.json) nor a token dataset (no .parquet files)"
        )
    token_set = TokenSet(files) if files else None  # every file's columns, and one tokenizer for all
    meta = (next(iter(token_set.metadata.values())) if token_set else read_metadata(here)) or {}
    counts = np.zeros(meta.get("codebook_size", 0), dtype=np.int64)
    rows, grid, shards = 0, None, set()
    for file, group in token_set.units if token_set else []:
        has_shard = "shard" in token_set.schemas[file].names
        table = read_row_group(file, group, ["shard"] if has_shard else [])
        codes = codes_array(table.column("codes"))
        if len(codes):
            if codes.min() < 0:
                raise StoreError(f"{file}: codes hold negative values")
            grid = list(codes.shape[1:])
            histogram = np.bincount(codes.ravel())
            if len(histogram) > len(counts):  # no K in the metadata: the largest code seen sets it
                counts = np.pad(counts, (0, len(histogram) - len(counts)))
            counts[: len(histogram)] += histogram
        rows += len(codes)
        if has_shard:
            shards.update(table.column("shard").unique().to_pylist())
    K = meta.get("codebook_size") or len(counts)
    usage = CodeUsage.of(counts, K)
    return {
        "path": str(here),
        "rows": rows,
        "files": len(files),
        "shards": len(done.committed) if done is not None else len(shards) if shards else None,
        "planned_shards": done.planned if done is not None else None,
        "errors": len(read_errors(here)) if done is not None else None,
        "failed_shards": list(done.failed) if done is not None else [],
        "grid": grid or meta.get("grid"),
        "codebook_size": K,
        "model_id": meta.get("model_id"),
        "codes_id": meta.get("codes_id"),
        "image_size": meta.get("image_size"),
        "codes_used": usage.codes_used,
        "usage": usage.usage,
        "perplexity": usage.perplexity,
        "bits_per_code": usage.bits_per_code,
        "bytes_per_image": sum(f.size() for f in files) / rows if rows else None,
        "complete": done.finished if done is not None else None,
        "progress": done.describe() if done is not None else None,
        "classes": meta.get("classes") or None,
        "vqtok_version": meta.get("vqtok_version"),
    }
