"""The token dataset: grids of code indices in Parquet, one file per input shard. No torch here.

A token dataset is a directory that pyarrow and pandas read as one table (they skip names that start with `_`
or `.`), and polars, DuckDB and Hugging Face `datasets` read through the glob `out.parquet/*.parquet`:

    out.parquet/
        part-<shard>-<hash>.parquet   one per input shard: key, shard, codes and any carried fields
        _errors/part-....parquet      the samples that could not be encoded: key, shard, reason
        _stats/part-....json          a shard's commit marker, written last: status, counts, timings
        _vqtok.json                   the run's settings; a later run with other settings is refused
        _SUCCESS                      every shard of the last run is done

The directory may be a local path or any URL fsspec opens (`vqtok.storage`). On a local disk every file is
written under a temporary name (`.part-...tmp`, which readers skip), fsynced and renamed, and its folder
fsynced, before the next file of the commit; in an object store, which has no rename, every file is uploaded
whole under its final name (an object is invisible until its upload completes). Either way a reader never
sees half a file, a shard's marker is written only after its data, and a crash at any moment leaves at most
a shard to do again. A shard is done when its marker says so; a rerun skips done shards and does the others
again, replacing what they left under the same names. docs/token-format.md states the guarantee.

`codes` is `fixed_size_list<fixed_size_list<uint16>[w]>[h]` (int32 when K > 65536). A dataset encoded with
augmented views (`--augment`) has one more column, `aug_codes`: each image's extra grids, a fixed-size list of
grids of the same type, named in the metadata's `views`; one row stays one image. Every part file's metadata
holds the settings under the key `vqtok` as JSON: K, grid, image size, preprocessing, model id and vqtok
version. Compression is zstd over dictionary-encoded codes, which stores a code in close to its entropy.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqtok import __version__
from vqtok.errors import ErrorTally, StoreError
from vqtok.storage import Location, reported

FORMAT_VERSION = 1
METADATA_KEY = b"vqtok"
SETTINGS_NAME = "_vqtok.json"
SUCCESS_NAME = "_SUCCESS"
ERRORS_DIR = "_errors"
STATS_DIR = "_stats"
ROW_GROUP_ROWS = 4096  # the unit a prior's data loader reads at once: ~8 MB of 32x32 uint16 grids
VIEWS_COLUMN = "aug_codes"
RESERVED_COLUMNS = ("key", "shard", "codes", VIEWS_COLUMN)
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("reason", pa.string())])
WRITE_OPTIONS = {"compression": "zstd", "use_dictionary": True}
CARRIED_TYPES = ("int64", "float64", "bool", "string")
# The extra grids each --augment stores in `aug_codes`, in order, after LlamaGen's extract_codes_c2i.py: the plain
# view mirrored left to right; or torchvision's TenCrop of a TEN_CROP_RANGE times larger centre square: its four
# corners and centre, then the same five crops of that square mirrored.
CROPS = ("top_left", "top_right", "bottom_left", "bottom_right", "center")
AUGMENT_VIEWS = {"none": (), "flip": ("flip",), "ten-crop": (*CROPS, *(f"flip_{crop}" for crop in CROPS))}
TEN_CROP_RANGE = 1.1


@dataclass(frozen=True)
class TokenSettings:
    """What makes the codes of one run comparable: a later run into the same dataset must match them all."""

    model_id: str
    codebook_size: int
    grid: tuple[int, int]  # (h, w)
    image_size: int
    preprocessing: str
    keep: tuple[str, ...] = ()  # sample fields carried into columns
    precision: str = "fp32"  # the encoder's: bf16 or fp16 pick other codes for about 1% of vectors
    keep_types: tuple[str, ...] = ()  # each carried column's type; by default cls int64 and the others string
    classes: tuple[str, ...] = ()  # the class names that cls numbers (--class-from-folder), if any
    augment: str = "none"  # the extra views in `aug_codes`: a key of AUGMENT_VIEWS

    def __post_init__(self) -> None:
        if not self.keep_types:  # what datasets written before the types were recorded hold
            object.__setattr__(self, "keep_types", tuple(default_kept_type(name) for name in self.keep))
        if len(self.keep_types) != len(self.keep) or not set(self.keep_types) <= set(CARRIED_TYPES):
            raise StoreError(f"carried types {self.keep_types} do not fit the carried fields {self.keep}")
        if self.augment not in AUGMENT_VIEWS:
            raise StoreError(f"augment must be one of {', '.join(AUGMENT_VIEWS)}, not {self.augment!r}")

    @property
    def views(self) -> tuple[str, ...]:
        """The names of the grids in `aug_codes`, in order; () without augmentation."""
        return AUGMENT_VIEWS[self.augment]

    def to_dict(self) -> dict:
        data = {
            "format_version": FORMAT_VERSION,
            **asdict(self),
            "grid": list(self.grid),
            "keep": list(self.keep),
            "keep_types": list(self.keep_types),
            "classes": list(self.classes),
        }
        # Without augmentation the settings are those written before it existed, byte for byte.
        if self.augment == "none":
            del data["augment"]
        else:
            data["views"] = list(self.views)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TokenSettings:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"token format version {version} is not {FORMAT_VERSION}, the one this vqtok reads")
        try:
            return cls(
                model_id=str(data["model_id"]),
                codebook_size=int(data["codebook_size"]),
                grid=tuple(int(n) for n in data["grid"]),
                image_size=int(data["image_size"]),
                preprocessing=str(data["preprocessing"]),
                keep=tuple(data.get("keep", ())),
                precision=str(data.get("precision", "fp32")),
                keep_types=tuple(data.get("keep_types", ())),
                classes=tuple(data.get("classes", ())),
                augment=str(data.get("augment", "none")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed token settings: {exc!r}") from exc

    def differences(self, other: TokenSettings) -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{name} {theirs[name]!r} -> {mine[name]!r}" for name in mine if mine[name] != theirs[name]]


# ---------------------------------------------------------------------------------------------- schema


def code_type(codebook_size: int) -> pa.DataType:
    return pa.uint16() if codebook_size <= 2**16 else pa.int32()


def default_kept_type(field: str) -> str:
    """A carried shard field's column type: `cls` is an integer class label (WebDataset's convention), others
    text."""
    return "int64" if field == "cls" else "string"


def parse_kept(field: str, data: object, column_type: str = "") -> object:
    """A sample field -> its column value. A tar member's bytes are text, or an integer in an int64 column
    (a shard's `cls`); a value that comes typed (a Parquet column, a folder's class) is kept as it is.
    ValueError when bytes do not fit the column's type."""
    if not isinstance(data, bytes):
        return data
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"field {field} is not UTF-8 text") from exc
    if (column_type or default_kept_type(field)) == "int64":
        try:
            return int(text.strip())
        except ValueError:
            raise ValueError(f"field {field} is not an integer: {text[:40]!r}") from None
    return text


def check_keep(fields: Sequence[str]) -> tuple[str, ...]:
    for field in fields:
        if field in RESERVED_COLUMNS:
            raise StoreError(f"cannot carry field {field!r}: names {', '.join(RESERVED_COLUMNS)} are taken")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", field):
            raise StoreError(f"cannot carry field {field!r}: use letters, digits, '_', '.' and '-'")
    return tuple(dict.fromkeys(fields))


def token_schema(settings: TokenSettings) -> pa.Schema:
    h, w = settings.grid
    codes = pa.list_(pa.list_(code_type(settings.codebook_size), w), h)
    fields = [("key", pa.string()), ("shard", pa.string()), ("codes", codes)]
    if settings.views:
        fields.append((VIEWS_COLUMN, pa.list_(codes, len(settings.views))))
    fields += [(name, pa.type_for_alias(t)) for name, t in zip(settings.keep, settings.keep_types, strict=True)]
    metadata = {METADATA_KEY: json.dumps({**settings.to_dict(), "vqtok_version": __version__}).encode()}
    return pa.schema(fields, metadata=metadata)


def grid_array(codes: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(N, h, w) integers -> a fixed_size_list<fixed_size_list<value_type>[w]>[h] array, without copying rows;
    (N, V, h, w) -> a fixed-size list of V such grids per row (`aug_codes`)."""
    array = pa.array(np.ascontiguousarray(codes).reshape(-1).astype(value_type.to_pandas_dtype(), copy=False))
    for size in reversed(codes.shape[1:]):
        array = pa.FixedSizeListArray.from_arrays(array, size)
    return array


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def check_grid_type(t: pa.DataType, views: bool = False) -> None:
    """StoreError unless t is a list of lists of integers, the type of (h, w) grids; with `views`, a list of such
    grids (`aug_codes`)."""
    inner = t
    for _ in range(3 if views else 2):
        if not _is_list(inner):
            inner = None
            break
        inner = inner.value_type
    if inner is None or not pa.types.is_integer(inner):
        what = f"{VIEWS_COLUMN} must be lists of (h, w) grids" if views else "codes must be (h, w) grids"
        raise StoreError(f"{what} of integers, got {t}")


def codes_array(column: pa.ChunkedArray | pa.Array, views: bool = False) -> np.ndarray:
    """A `codes` column of (h, w) grids -> int64 (N, h, w), or with `views` an `aug_codes` column of lists of
    grids -> int64 (N, V, h, w); StoreError when it holds something else.

    Reads the fixed-size lists vqtok writes and the variable-size lists other writers (pandas, polars, a
    prior's sampler) make of the same grids.
    """
    check_grid_type(column.type, views)
    name = VIEWS_COLUMN if views else "codes"
    column = _combined(column)
    n = len(column)
    if column.null_count:
        raise StoreError(f"{name} column holds nulls")
    shape, array = [], column
    for _ in range(3 if views else 2):
        if pa.types.is_fixed_size_list(array.type):
            shape.append(array.type.list_size)
        else:
            lengths = np.asarray(array.value_lengths())
            size = int(lengths[0]) if len(lengths) else 0
            if (lengths != size).any():
                raise StoreError(f"{name} grids differ in shape from row to row")
            shape.append(size)
        array = array.flatten()
    if array.null_count:
        raise StoreError(f"{name} grids hold nulls")
    return np.array(array.to_numpy(zero_copy_only=False), dtype=np.int64).reshape(n, *shape)  # a writable copy


def _combined(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column


def view_count(column: pa.ChunkedArray | pa.Array) -> int:
    """How many grids each row of an `aug_codes` column holds; StoreError when rows differ, or have none."""
    check_grid_type(column.type, views=True)
    column = _combined(column)
    if column.null_count:
        raise StoreError(f"{VIEWS_COLUMN} column holds nulls")
    if pa.types.is_fixed_size_list(column.type):
        return column.type.list_size
    lengths = np.asarray(column.value_lengths())
    count = int(lengths[0]) if len(lengths) else 0
    if (lengths != count).any():
        raise StoreError(f"{VIEWS_COLUMN}: rows hold different numbers of views")
    return count


def take_views(column: pa.ChunkedArray | pa.Array, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
    """Row rows[i]'s view views[i] of an `aug_codes` column -> int64 (len(rows), h, w), converting only those
    grids."""
    count = view_count(column)
    grids = _combined(column).flatten()  # (N * V) grids, a row's views one after another
    return codes_array(grids.take(pa.array(np.asarray(rows) * count + np.asarray(views), pa.int64())))


# ---------------------------------------------------------------------------------------------- writing


def part_name(shard: str) -> str:
    """The stem of a shard's files: its file name for a reader, a hash of its whole URL to make it unique."""
    stem = re.sub(r"(\.tar(\.\w+)?|\.parquet)$", "", shard.rstrip("/").rsplit("/", 1)[-1])
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "shard"
    return f"part-{stem}-{hashlib.sha256(shard.encode()).hexdigest()[:12]}"


def _ours(name: str) -> bool:
    """Whether a name is what another process of the same run may have made a moment ago, before its
    settings file (part files come only after it)."""
    return name.startswith(".") or name in (ERRORS_DIR, STATS_DIR)


def _write_json(place: Location, data: dict) -> None:
    place.write_bytes((json.dumps(data, indent=2) + "\n").encode())


def read_markers(path: str | os.PathLike | Location, names: Sequence[str] | None = None) -> dict[str, dict]:
    """Part name -> its commit marker, for the markers in `_stats/` (those of `names` only, if given). A
    store's markers are fetched concurrently, not one request after another: a rerun of ten thousand shards
    asks for ten thousand markers."""
    stats = Location.of(path).join(STATS_DIR)
    present = [n.removesuffix(".json") for n in stats.names() if n.startswith("part-") and n.endswith(".json")]
    wanted = [n for n in present if names is None or n in set(names)]
    if stats.local:
        contents = {n: stats.join(f"{n}.json").read_bytes(missing_ok=True) for n in wanted}
    else:
        fs, base = stats.fs_and_path()
        paths = {n: f"{base.rstrip('/')}/{n}.json" for n in wanted}
        with reported(stats):
            found = fs.cat(list(paths.values()), on_error="return") if paths else {}
        contents = {n: found.get(path) for n, path in paths.items()}
    markers = {}
    for name, data in contents.items():
        with contextlib.suppress(TypeError, json.JSONDecodeError, UnicodeDecodeError):  # a missing or torn one
            marker = json.loads(data)
            if isinstance(marker, dict):
                markers[name] = marker
    return markers


class TokenStore:
    """The writing side of a token dataset directory, shared by independent processes without talking.

    Each process writes only the shards it was given; every file it writes is complete before it has its
    name, and the settings file is the same from every process, so concurrent writers never conflict. The
    directory may be a local path or a URL (`storage_options` go to fsspec); `path` is then the URL.
    """

    def __init__(self, path: str | os.PathLike, settings: TokenSettings, storage_options: dict | None = None) -> None:
        self.location = Location.of(path, storage_options)
        self.path = Path(self.location.path) if self.location.local else self.location.url
        self.settings = settings
        self.schema = token_schema(settings)

    def open(
        self,
        shards: Sequence[str],
        mine: Sequence[str],
        overwrite: bool = False,
        tidy: bool = False,
        listings: dict[str, dict] | None = None,
    ) -> None:
        """Check or record the settings. With overwrite, first remove this process's shards' files, and with
        tidy (asked by one process) also the files of shards not in `shards`, never another process's.

        `listings` (image folder -> its count and digest) are recorded too: a folder whose listing changed
        since they were recorded would cut its slices elsewhere, so a rerun on it is refused."""
        here = self.location
        if here.isfile():
            raise StoreError(f"{here} exists and is not a directory")
        settings_text = here.join(SETTINGS_NAME).read_text(missing_ok=True)
        foreign = any(not _ours(name) for name in here.names())
        if foreign and settings_text is None:  # even with --overwrite: its files are somebody else's
            raise StoreError(f"{here} is not empty and is not a vqtok token dataset: choose another folder")
        recorded: dict = {}
        if overwrite:
            everyone, own = {part_name(s) for s in shards}, {part_name(s) for s in mine}
            self._remove_files(lambda name: name in own or (tidy and name not in everyone))
        elif settings_text is not None:
            try:
                saved = json.loads(settings_text)
                existing = TokenSettings.from_dict(saved)
            except (json.JSONDecodeError, AttributeError) as exc:
                raise StoreError(f"{here / SETTINGS_NAME}: not vqtok's settings ({exc}); use --overwrite") from exc
            changes = self.settings.differences(existing)
            if changes:
                raise StoreError(
                    f"{here} holds tokens made with other settings ({'; '.join(changes)}); "
                    "use --overwrite to replace them"
                )
            recorded = saved.get("listings") or {}
            check_listings(recorded, listings or {})
        here.join(ERRORS_DIR).makedirs()
        here.join(STATS_DIR).makedirs()
        _write_json(here.join(SETTINGS_NAME), {**self.settings.to_dict(), "listings": {**recorded, **(listings or {})}})
        if self.pending(shards):
            here.join(SUCCESS_NAME).remove()

    def _remove_files(self, remove) -> None:
        """Remove the files of the part names `remove(name)` is true for: markers first, so that a crash
        half-way never leaves a shard marked done without its data."""
        here = self.location
        here.join(SUCCESS_NAME).remove()
        kinds = [(here.join(STATS_DIR), ".json"), (here.join(ERRORS_DIR), ".parquet"), (here, ".parquet")]
        for folder, suffix in kinds:
            for name in folder.names():
                if name.startswith("part-") and name.endswith(suffix) and remove(name.removesuffix(suffix)):
                    folder.join(name).remove()

    def marker(self, shard: str) -> dict | None:
        return read_markers(self.location, [part_name(shard)]).get(part_name(shard))

    def done(self, shard: str) -> bool:
        return not self.pending([shard])

    def pending(self, shards: Sequence[str]) -> list[str]:
        """The shards not done: no marker that says done and names the shard, or no data file beside it.
        Looked up with one listing of each folder and, in a store, the markers fetched together."""
        names = {shard: part_name(shard) for shard in shards}
        markers = read_markers(self.location, list(names.values()))
        parts = set(self.location.names()) if markers else set()

        def done(shard: str) -> bool:
            marker = markers.get(names[shard])
            if marker is None or marker.get("status") != "done" or marker.get("shard") != shard:
                return False
            return f"{names[shard]}.parquet" in parts

        return [shard for shard in shards if not done(shard)]

    def writer(self, shard: str) -> ShardWriter:
        return ShardWriter(self, shard)

    def finish(self, shards: Sequence[str], max_error_rate: float | None = None, advice: str = "") -> dict | None:
        """Write _SUCCESS with the totals if every shard is done (whichever process gets here last does).

        With `max_error_rate`, the whole dataset is judged first, whichever run or process committed its
        shards: TooManyErrors (`advice` after the reason) instead of _SUCCESS when every sample failed, or more
        than that share. Otherwise a rerun that skips shards done with nothing but errors would finish them."""
        found = read_markers(self.location, [part_name(shard) for shard in shards])
        markers = [found.get(part_name(shard)) for shard in shards]
        if not all(m is not None and m.get("status") == "done" for m in markers):
            return None
        totals = {
            "shards": len(markers),
            "rows": sum(m["rows"] for m in markers),
            "errors": sum(m["errors"] for m in markers),
            "settings": self.settings.to_dict(),
        }
        if max_error_rate is not None:
            self._check_errors(shards, totals["rows"], totals["errors"], max_error_rate, advice)
        _write_json(self.location.join(SUCCESS_NAME), totals)
        return totals

    def _check_errors(self, shards: Sequence[str], rows: int, errors: int, max_rate: float, advice: str) -> None:
        """TooManyErrors naming the commonest reason among the shards' `_errors/` rows, read only when the
        markers' counts are already too many."""
        counted = ErrorTally(max_rate)
        counted.seen, counted.failed = rows + errors, errors
        if not counted.too_many(final=True):
            return
        wanted = set(shards)
        tally = ErrorTally(max_rate)
        tally.add(rows, [e["reason"] for e in read_errors(self.location).to_pylist() if e["shard"] in wanted])
        tally.check(f"encoded into {self.path}", final=True, advice=advice)


def check_listings(recorded: dict[str, dict], listings: dict[str, dict]) -> None:
    """StoreError naming the first folder whose listing differs from the one recorded for it."""
    for folder, listing in listings.items():
        before = recorded.get(folder)
        if before is None or before == listing:
            continue
        if before.get("files_per_part") != listing.get("files_per_part"):
            raise StoreError(
                f"{folder} was cut into parts of {before.get('files_per_part')} files, not "
                f"{listing.get('files_per_part')}: give --files-per-part {before.get('files_per_part')}, "
                "or --overwrite to start again"
            )
        change = f"{before.get('files')} files -> {listing['files']}"
        if before.get("files") == listing["files"]:
            change = f"{listing['files']} files, other names"
        raise StoreError(
            f"{folder} changed since this token dataset was started ({change}): its slices would no longer "
            "match the parts written; use --overwrite to start again"
        )


class ShardWriter:
    """One shard's rows, streamed into a temporary part file and committed as a whole by `commit`.

    The temporary file is local: beside the part on a local disk (renamed into place), in the temporary
    folder when the dataset is in a store (uploaded whole)."""

    def __init__(self, store: TokenStore, shard: str) -> None:
        self.store = store
        self.shard = shard
        self.name = part_name(shard)
        self.rows = 0
        self.write_seconds = 0.0
        self._errors: list[tuple[str, str]] = []
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        here = store.location
        self._part = here.join(f"{self.name}.parquet")
        if here.local:
            root = Path(here.path)
            for folder in (root, root / ERRORS_DIR, root / STATS_DIR):  # what a killed run left
                for stale in folder.glob(f".{self.name}.*.tmp"):
                    stale.unlink(missing_ok=True)
            self._temporary = root / f".{self.name}.parquet.{os.getpid()}.tmp"
        else:
            fd, name = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".parquet.tmp")
            os.close(fd)
            self._temporary = Path(name)
        try:
            self._writer = pq.ParquetWriter(self._temporary, store.schema, **WRITE_OPTIONS)
        except OSError as exc:
            self._temporary.unlink(missing_ok=True)
            raise StoreError(f"{self._part}: cannot write: {exc}") from exc

    def add(
        self,
        keys: Sequence[str],
        codes: np.ndarray,
        kept: dict[str, list] | None = None,
        views: np.ndarray | None = None,
    ) -> None:
        """Rows of keys, (N, h, w) codes, the carried fields' values and, with augmentation, the (N, V, h, w)
        grids of the settings' views."""
        started = time.perf_counter()
        schema = self.store.schema
        code_type = schema.field("codes").type.value_type.value_type
        columns = [
            pa.array(keys, pa.string()),
            pa.array([self.shard] * len(keys), pa.string()),
            grid_array(codes, code_type),
        ]
        if self.store.settings.views:
            if views is None or views.shape != (len(keys), len(self.store.settings.views), *codes.shape[1:]):
                shape = None if views is None else views.shape
                raise StoreError(f"{self.shard}: views of shape {shape} do not fit {self.store.settings.augment}")
            columns.append(grid_array(views, code_type))
        columns += [pa.array((kept or {})[name], schema.field(name).type) for name in self.store.settings.keep]
        self._pending.append(pa.RecordBatch.from_arrays(columns, schema=schema))
        self._pending_rows += len(keys)
        self.rows += len(keys)
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush()
        self.write_seconds += time.perf_counter() - started

    def add_errors(self, errors: Sequence[tuple[str, str]]) -> None:
        """(key, reason) of samples of this shard that could not be encoded."""
        self._errors += errors

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending), row_group_size=ROW_GROUP_ROWS)
            self._pending, self._pending_rows = [], 0

    def commit(self, stats: dict) -> dict:
        """Make the shard visible: its errors, then its part, then the marker that says it is done. Each is
        whole and durable (fsynced with its folder, or uploaded) before the next is written."""
        started = time.perf_counter()
        self._flush()
        self._writer.close()
        errors = pa.table(
            [[k for k, _ in self._errors], [self.shard] * len(self._errors), [r for _, r in self._errors]],
            schema=ERRORS_SCHEMA,
        )
        here = self.store.location
        here.join(ERRORS_DIR, f"{self.name}.parquet").write_with(lambda p: pq.write_table(errors, p, **WRITE_OPTIONS))
        self._part.publish(self._temporary)
        self.write_seconds += time.perf_counter() - started
        marker = {
            "shard": self.shard,
            "part": self._part.name,
            **stats,
            "rows": self.rows,
            "errors": len(self._errors),
            "seconds": {**stats.get("seconds", {}), "write": round(self.write_seconds, 4)},
            "settings": self.store.settings.to_dict(),
            "vqtok_version": __version__,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_json(here.join(STATS_DIR, f"{self.name}.json"), marker)
        return marker

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._temporary.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- reading


def part_files(path: str | os.PathLike | Location, storage_options: dict | None = None) -> list[Location]:
    """The data files of a token dataset directory (in name order), or [path] for a single Parquet file."""
    here = Location.of(path, storage_options)
    if here.isfile():
        return [here]
    if not here.isdir():
        raise StoreError(f"{here}: no such file or directory")
    names = [n for n in here.names() if n.endswith(".parquet") and not n.startswith(("_", "."))]
    return [here.join(n) for n in names if not here.local or os.path.isfile(os.path.join(here.path, n))]


@contextlib.contextmanager
def open_parquet(file: Location) -> Iterator[pq.ParquetFile]:
    """A Parquet file on the local disk or in a store; StoreError when it is not one or cannot be reached."""
    with contextlib.ExitStack() as stack:
        try:
            with reported(file):
                source = file.path if file.local else stack.enter_context(file.open("rb"))
                parquet = stack.enter_context(pq.ParquetFile(source))
        except (OSError, pa.ArrowInvalid) as exc:
            raise StoreError(f"{file}: not a Parquet file ({exc})") from exc
        with reported(file):
            yield parquet


def read_metadata(path: str | os.PathLike | Location, storage_options: dict | None = None) -> dict | None:
    """The vqtok settings stored in a token file's metadata (the first part of a directory); None if absent."""
    files = part_files(path, storage_options)
    if not files:
        settings = Location.of(path, storage_options).join(SETTINGS_NAME).read_text(missing_ok=True)
        return json.loads(settings) if settings is not None else None
    return file_metadata(files[0])


def file_metadata(file: Location) -> dict | None:
    """One Parquet file's vqtok metadata; None when it has none (written by another tool)."""
    return schema_metadata(read_schema(file), file)


def read_schema(file: str | os.PathLike | Location) -> pa.Schema:
    with open_parquet(Location.of(file)) as parquet:
        return parquet.schema_arrow


def schema_metadata(schema: pa.Schema, file: object) -> dict | None:
    """The vqtok metadata of a file's schema; None when it has none."""
    metadata = schema.metadata or {}
    if METADATA_KEY not in metadata:
        return None
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{file}: its vqtok metadata is not JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"{file}: its vqtok metadata is not a JSON object")
    return meta


def read_codes(path: str | os.PathLike, storage_options: dict | None = None) -> tuple[list[str], np.ndarray]:
    """A token dataset (directory) or one Parquet file -> (keys, int64 codes (N, h, w)), rows in file order."""
    keys: list[str] = []
    grids: list[np.ndarray] = []
    for file, group in row_groups(path, storage_options):
        table = read_row_group(file, group)
        keys += table.column("key").to_pylist()
        grids.append(codes_array(table.column("codes")))
    if not grids:
        return keys, np.zeros((0, 0, 0), dtype=np.int64)
    return keys, np.concatenate(grids)


def row_groups(path: str | os.PathLike, storage_options: dict | None = None) -> list[tuple[Location, int]]:
    """(file, row group index) of every row group: the units that readers split across workers."""
    units = []
    for file in part_files(path, storage_options):
        with open_parquet(file) as parquet:
            units += [(file, i) for i in range(parquet.num_row_groups)]
    return units


def read_row_group(file: str | os.PathLike | Location, index: int, columns: Sequence[str] = ()) -> pa.Table:
    """One row group's `key` and `codes` columns, and the carried columns asked for."""
    with open_parquet(Location.of(file)) as parquet:
        names = parquet.schema_arrow.names
        for needed in ("key", "codes", *columns):
            if needed not in names:
                raise StoreError(f"{file}: no {needed!r} column (columns: {', '.join(names)})")
        return parquet.read_row_group(index, columns=["key", "codes", *columns])


def group_code_range(
    file: str | os.PathLike | Location, index: int, column_name: str = "codes"
) -> tuple[int, int | None, int | None]:
    """(rows, smallest code, largest code) of a row group of vqtok's own grids (`codes`, or the views of
    `aug_codes`), from the file's statistics without reading the data; the range is (None, None) unless the
    codes are fixed-size grids (never ragged) with statistics and no nulls."""
    views = column_name == VIEWS_COLUMN
    with open_parquet(Location.of(file)) as parquet:
        group = parquet.metadata.row_group(index)
        names = parquet.schema_arrow.names
        codes_type = parquet.schema_arrow.field(column_name).type if column_name in names else None
    fixed, inner = codes_type is not None, codes_type
    for _ in range(3 if views else 2):
        fixed = fixed and pa.types.is_fixed_size_list(inner)
        inner = inner.value_type if fixed else None
    if fixed:
        check_grid_type(codes_type, views)  # another level of lists is no grid, whatever the statistics say
    for i in range(group.num_columns):
        column = group.column(i)
        stats = column.statistics
        if fixed and column.path_in_schema.split(".")[0] == column_name and stats is not None and stats.has_min_max:
            if stats.has_null_count and stats.null_count == 0:
                return group.num_rows, int(stats.min), int(stats.max)
    return group.num_rows, None, None


def read_errors(path: str | os.PathLike, storage_options: dict | None = None) -> pa.Table:
    """The `_errors` rows of a token dataset: key, shard, reason."""
    folder = Location.of(path, storage_options).join(ERRORS_DIR)
    tables = []
    for name in folder.names():
        if name.startswith("part-") and name.endswith(".parquet"):
            with open_parquet(folder.join(name)) as parquet:
                tables.append(parquet.read().cast(ERRORS_SCHEMA))
    return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()


def code_entropy(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per code of a histogram of codes."""
    p = counts[counts > 0] / max(1, counts.sum())
    return float(-(p * np.log2(p)).sum()) if len(p) else 0.0


def summarize(path: str | os.PathLike, storage_options: dict | None = None) -> dict:
    """What a token dataset or Parquet file of codes holds: rows, shards, errors, grid, K, model id, codebook
    usage and perplexity, bits per code (order-0 entropy), bytes on disk per image, whether it is complete,
    and the class names that `cls` numbers."""
    here = Location.of(path, storage_options)
    files = part_files(here)
    folder = not (len(files) == 1 and files[0] == here)
    if folder and not files and not here.join(SETTINGS_NAME).exists():
        raise StoreError(
            f"{here} is neither a model directory (no config.json) nor a token dataset (no .parquet files)"
        )
    meta = read_metadata(here) or {}
    counts = np.zeros(meta.get("codebook_size", 0), dtype=np.int64)
    rows, grid, shards = 0, None, set()
    token_set = TokenSet(here) if files else None  # checks every file's columns, and one tokenizer for all
    has_shard_column = {file: "shard" in schema.names for file, schema in token_set.schemas.items()} if files else {}
    for file, group in token_set.units if token_set else []:
        has_shard = has_shard_column[file]
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
    entropy = code_entropy(counts)
    markers = list(read_markers(here).values()) if folder else []
    return {
        "path": str(here),
        "rows": rows,
        "files": len(files),
        "shards": len(markers) if markers else len(shards) if shards else None,
        "errors": len(read_errors(here)) if folder else None,
        "failed_shards": [m["shard"] for m in markers if m.get("status") == "failed"],
        "grid": grid or meta.get("grid"),
        "codebook_size": K,
        "model_id": meta.get("model_id"),
        "image_size": meta.get("image_size"),
        "codes_used": int((counts[:K] > 0).sum()),
        "usage": float((counts[:K] > 0).sum() / K) if K else None,
        "perplexity": float(2**entropy),
        "bits_per_code": entropy,
        "bytes_per_image": sum(f.size() for f in files) / rows if rows else None,
        "complete": here.join(SUCCESS_NAME).exists() if folder else None,
        "classes": meta.get("classes") or None,
        "vqtok_version": meta.get("vqtok_version"),
    }


# ---------------------------------------------------------------------------------------------- a token set


def check_columns(schema: pa.Schema, file: Location, columns: Sequence[str] = ()) -> None:
    """StoreError unless the file has a string `key` column, a `codes` column of grids and `columns`."""
    for name in ("key", "codes", *columns):
        if name not in schema.names:
            raise StoreError(f"{file}: no {name!r} column (columns: {', '.join(schema.names)})")
    if not (pa.types.is_string(schema.field("key").type) or pa.types.is_large_string(schema.field("key").type)):
        raise StoreError(f"{file}: keys must be strings, not {schema.field('key').type}")
    check_grid_type(schema.field("codes").type)


def check_code_range(keys: list[str], codes: np.ndarray, codebook_size: int, where: str = "") -> None:
    """StoreError naming the first key whose (h, w) grid holds a code outside [0, codebook_size)."""
    outside = (codes < 0) | (codes >= codebook_size)  # (N, h, w)
    bad = np.flatnonzero(outside.reshape(len(codes), -1).any(axis=1))
    if len(bad):
        value = codes[bad[0]][outside[bad[0]]][0]
        raise StoreError(f"{where}key {keys[bad[0]]!r} holds code {value}, outside [0, {codebook_size})")


TOKENIZER_FIELDS = ("model_id", "codebook_size", "grid")  # what says which tokenizer made a file's codes


class TokenSet:
    """One or several token datasets or Parquet files of grids, read as one, with the checks every reader needs.

    The one reader behind `vqtok decode`, `vqtok info`, `TokenDataset` and the prior. Each path may be local or
    a URL that fsspec opens (`storage_options` go to it). Opening checks that every file has a string `key`
    column, a `codes` column of (h, w) integer grids and the `columns` asked for, and that the files carrying
    vqtok's metadata were all made by one tokenizer (model id, K, grid). Then: `tokenizer()` says which,
    `check_tokenizer` compares it with a model, `select` and `check_codes` find codes outside [0, K),
    `class_count` checks a column of class labels, and `read` streams the rows.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Location | Sequence[str | os.PathLike | Location],
        columns: Sequence[str] = (),
        storage_options: dict | None = None,
    ) -> None:
        paths = [paths] if isinstance(paths, str | os.PathLike | Location) else list(paths)
        if not paths:
            raise StoreError("no token datasets or Parquet files given")
        self.paths = [str(p) for p in paths]
        self.columns = tuple(columns)
        self.schemas: dict[Location, pa.Schema] = {}
        self.metadata: dict[Location, dict | None] = {}
        self.units: list[tuple[Location, int]] = []  # (file, row group): the unit readers split across workers
        self.unit_rows: list[int] = []
        seen = set()
        for path in paths:
            files = part_files(path, storage_options)
            if not files:
                raise StoreError(f"{path}: no Parquet data files")
            for file in files:
                # One file named twice (a folder and one of its parts) is read once.
                identity = os.path.realpath(file.path) if file.local else file.url
                if identity in seen:
                    continue
                seen.add(identity)
                with open_parquet(file) as parquet:
                    schema = parquet.schema_arrow
                    row_group_rows = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
                check_columns(schema, file, self.columns)
                self.schemas[file] = schema
                self.metadata[file] = schema_metadata(schema, file)
                self.units += [(file, i) for i in range(len(row_group_rows))]
                self.unit_rows += row_group_rows
        self._check_one_tokenizer()

    @property
    def rows(self) -> int:
        return sum(self.unit_rows)

    def _check_one_tokenizer(self) -> None:
        first: tuple[Location, dict] | None = None
        for file, meta in self.metadata.items():
            if meta is None:
                continue
            if first is None:
                first = (file, meta)
                continue
            differences = [
                f"{name} {first[1].get(name)} vs {meta.get(name)}"
                for name in TOKENIZER_FIELDS
                if first[1].get(name) != meta.get(name)
            ]
            if differences:
                raise StoreError(f"{first[0]} and {file} hold codes of different tokenizers ({', '.join(differences)})")

    def tokenizer(self) -> dict:
        """The metadata of the tokenizer that made every file's codes ({"model_id", "codebook_size", "grid",
        "image_size", ...}); StoreError for a file that does not say."""
        for file, meta in self.metadata.items():
            if meta is None:
                raise StoreError(
                    f"{file}: no vqtok metadata says which tokenizer made its codes (K, grid, model id); "
                    "use token datasets written by vqtok encode"
                )
        return next(iter(self.metadata.values()))

    def check_tokenizer(self, model_id: str, codebook_size: int, grid_size, force: bool = False) -> None:
        """Refuse codes another model made: K and grid (grid_size(image_size) -> (h, w) is the model's), and the
        model id unless force. A file without vqtok metadata (another tool's grids) passes."""
        for meta in self.metadata.values():
            if meta is None:
                continue
            K = meta.get("codebook_size")
            if K != codebook_size:
                raise StoreError(
                    f"the codes are indices into a codebook of {K} entries; this model has {codebook_size}"
                )
            grid, size = meta.get("grid"), meta.get("image_size")
            if grid is not None and size is not None and list(grid_size(size)) != list(grid):
                raise StoreError(
                    f"the codes are {grid[0]}x{grid[1]} grids of {size}px images; this model makes "
                    f"{'x'.join(map(str, grid_size(size)))} grids at that size"
                )
            if meta.get("model_id") != model_id and not force:
                raise StoreError(
                    f"the codes were made by model {meta.get('model_id')}, not by this one ({model_id}); "
                    "--force decodes them anyway"
                )

    def select(
        self, codebook_size: int, keys: Sequence[str] | None = None, limit: int | None = None
    ) -> dict[int, np.ndarray]:
        """Unit index -> the row numbers of the rows wanted in it (all, the `keys`, or the first `limit`);
        raises StoreError for a code outside [0, codebook_size) in them or a key that is missing. vqtok's own
        fixed-size grids are vouched for by their row groups' statistics, others are read."""
        wanted = set(keys) if keys is not None else None
        found: set[str] = set()
        selection, total = {}, 0
        for i, (file, group) in enumerate(self.units):
            if limit is not None and total >= limit:
                break
            if wanted is None:
                rows_in_group, low, high = group_code_range(file, group)
                if low is not None and 0 <= low and high < codebook_size:  # the statistics vouch for every row
                    rows = np.arange(rows_in_group if limit is None else min(rows_in_group, limit - total))
                    selection[i] = rows
                    total += len(rows)
                    continue
            table = read_row_group(file, group)
            group_keys = table.column("key").to_pylist()
            if None in group_keys:
                raise StoreError(f"{file}: a row has no key")
            rows = np.arange(len(group_keys)) if wanted is None else np.flatnonzero([k in wanted for k in group_keys])
            if limit is not None:
                rows = rows[: limit - total]
            if not len(rows):
                continue
            codes = codes_array(table.column("codes").take(pa.array(rows)))
            check_code_range([group_keys[r] for r in rows], codes, codebook_size, where=f"{file}: ")
            found.update(group_keys[r] for r in rows)
            selection[i] = rows
            total += len(rows)
        if wanted is not None and wanted - found:
            missing = sorted(wanted - found)
            raise StoreError(f"{len(missing)} key(s) not in the tokens: {', '.join(missing[:5])}")
        return selection

    def has_views(self, file: Location) -> bool:
        """Whether a file holds augmented views (an `aug_codes` column); StoreError when that column is not lists
        of grids."""
        schema = self.schemas[file]
        if VIEWS_COLUMN not in schema.names:
            return False
        try:
            check_grid_type(schema.field(VIEWS_COLUMN).type, views=True)
        except StoreError as exc:
            raise StoreError(f"{file}: {exc}") from None
        return True

    def check_codes(self, codebook_size: int) -> None:
        """StoreError, naming the key, if any code lies outside [0, codebook_size), in `codes` or in the augmented
        views."""
        self.select(codebook_size)
        for file, group in self.units:
            if not self.has_views(file):
                continue
            _, low, high = group_code_range(file, group, VIEWS_COLUMN)
            if low is not None and 0 <= low and high < codebook_size:  # the statistics vouch for every row
                continue
            table = read_row_group(file, group, [VIEWS_COLUMN])
            views = codes_array(table.column(VIEWS_COLUMN), views=True)  # (n, V, h, w)
            n, v, h, w = views.shape
            grids = views.reshape(n, v * h, w)  # a row's views one under another
            check_code_range(table.column("key").to_pylist(), grids, codebook_size, where=f"{file}: {VIEWS_COLUMN}: ")

    def class_count(self, column: str, classes: int | None = None) -> int:
        """Check a column of class labels: integers, none missing, all in [0, classes). Returns classes, which
        is the largest label plus one when not given."""
        labels = {}
        for file, schema in self.schemas.items():
            if column not in schema.names:
                raise StoreError(f"{file}: no {column!r} column (columns: {', '.join(schema.names)})")
            if not pa.types.is_integer(schema.field(column).type):
                raise StoreError(f"{file}: column {column!r} holds {schema.field(column).type}, not integer classes")
            with open_parquet(file) as parquet:
                values = parquet.read(columns=[column]).column(column)
            if values.null_count:
                raise StoreError(f"{file}: column {column!r} has {values.null_count} row(s) without a class")
            labels[file] = values.to_numpy()
        largest = max((int(v.max()) for v in labels.values() if len(v)), default=-1)
        classes = largest + 1 if classes is None else classes
        for file, values in labels.items():
            outside = values[(values < 0) | (values >= classes)]
            if len(outside):
                raise StoreError(f"{file}: column {column!r} holds class {outside[0]}, outside [0, {classes})")
        return classes

    def read(self, selection: dict[int, np.ndarray], columns: Sequence[str], batch_size: int) -> Iterator[pa.Table]:
        """The selected rows' key, codes and `columns`, batch_size rows at a time."""
        for i, rows in selection.items():
            file, group = self.units[i]
            table = read_row_group(file, group, columns).take(pa.array(rows))
            for start in range(0, table.num_rows, batch_size):
                yield table.slice(start, batch_size)
