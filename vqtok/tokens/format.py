"""The token dataset's format: its names, its settings, its schema, and grids of codes to and from Arrow. No torch.

A token dataset is a directory that pyarrow and pandas read as one table (they skip names that start with `_`
or `.`), and polars, DuckDB and Hugging Face `datasets` read through the glob `out.parquet/*.parquet`:

    out.parquet/
        part-<shard>-<hash>.parquet   one per input shard: key, shard, codes and any carried fields
        _errors/part-....parquet      the samples that could not be encoded: key, shard, reason
        _stats/part-....json          a shard's commit marker, written last: status, counts, timings
        _vqtok.json                   the run's settings and planned shards; a later run with other settings is refused
        _SUCCESS                      every shard of the last run is done

How these files are written and when a dataset counts as finished is the commit protocol (`vqtok.tokens.writer`);
this module says what they are called and what a part file holds.

`codes` is `fixed_size_list<fixed_size_list<uint16>[w]>[h]` (int32 when K > 65536). A dataset encoded with
augmented views (`--augment`) has one more column, `aug_codes`: each image's extra grids, a fixed-size list of
grids of the same type, named in the metadata's `views`; one row stays one image. Every part file's metadata
holds the settings under the key `vqtok` as JSON: K, grid, image size, preprocessing, model id, codes id and
vqtok version. Compression is zstd over dictionary-encoded codes, which stores a code in close to its entropy.
docs/token-format.md specifies the layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqtok import __version__
from vqtok.errors import StoreError
from vqtok.storage import Location, reported

FORMAT_VERSION = 1
METADATA_KEY = b"vqtok"
SETTINGS_NAME = "_vqtok.json"
PLANNED_KEY = "planned_shards"  # in the settings file: how many shards the last run was given
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
    # The tokenizer's codes id (`Tokenizer.codes_id`): every model that has it gives these codes. None where not
    # known: datasets written before codes ids, samples of a prior trained on such tokens.
    codes_id: str | None = None

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
        if self.codes_id is None:
            del data["codes_id"]
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
                codes_id=None if data.get("codes_id") is None else str(data["codes_id"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"malformed token settings: {exc!r}") from exc

    def differences(self, other: TokenSettings) -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        if mine["codes_id"] is None or theirs["codes_id"] is None:  # not known to one side: model_id still compares
            del mine["codes_id"], theirs["codes_id"]
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


# ---------------------------------------------------------------------------------------------- names and files


def part_name(shard: str) -> str:
    """The stem of a shard's files: its file name for a reader, a hash of its whole URL to make it unique."""
    stem = re.sub(r"(\.tar(\.\w+)?|\.parquet)$", "", shard.rstrip("/").rsplit("/", 1)[-1])
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:80] or "shard"
    return f"part-{stem}-{hashlib.sha256(shard.encode()).hexdigest()[:12]}"


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
