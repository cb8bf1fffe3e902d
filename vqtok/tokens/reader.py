"""Reading token datasets back: `TokenSet`, the one reader behind decode, info, `TokenDataset` and the prior, and
`read_codes` for a quick look. No torch.

Every path may be a token dataset folder, one of its part files, or any Parquet file with a `key` column and a
`codes` column of (h, w) grids (another tool's, a prior's samples), local or a URL. A token dataset folder is
read only when its last run finished (`vqtok.tokens.writer.completion`): a prior trained on 37 of 100 shards
would otherwise look like a prior trained on all of them. `partial=True` reads the committed parts of an
unfinished one, and never a part without its commit marker.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa

from vqtok.errors import StoreError, plural
from vqtok.storage import Location

from .format import METADATA_KEY, SETTINGS_NAME, VIEWS_COLUMN, check_grid_type, codes_array, open_parquet
from .writer import Completion, completion


class UnfinishedDataset(StoreError):
    """A token dataset whose last run did not finish, asked for by a reader that trains on whole datasets."""


def unfinished_message(where: object, done: Completion) -> str:
    partial = ""
    if done.committed:
        count = len(done.committed)
        partial = f", or pass --partial (partial=True) to read its {count} committed {plural(count, 'part')} only"
    return (
        f"{where} is unfinished: {done.describe()}. Run the command that wrote it (vqtok encode or vqtok prior "
        f"sample) again to finish it{partial}"
    )


def dataset_files(
    path: str | os.PathLike | Location, storage_options: dict | None = None, partial: bool = False
) -> tuple[list[Location], Completion | None]:
    """The data files to read at `path`, in name order, and what the commit protocol says of the folder (None for
    a single file or a folder vqtok did not write). A vqtok dataset that did not finish is UnfinishedDataset,
    unless `partial`: then its committed parts alone."""
    here = Location.of(path, storage_options)
    if here.isfile():
        return [here], None
    if not here.isdir():
        raise StoreError(f"{here}: no such file or directory")
    done = completion(here)
    if done is None:  # another tool's folder of Parquet files: everything in it, as pyarrow reads it
        names = [n for n in here.names() if n.endswith(".parquet") and not n.startswith(("_", "."))]
        files = [here.join(n) for n in names if not here.local or os.path.isfile(os.path.join(here.path, n))]
        return files, None
    if not done.finished and not partial:
        raise UnfinishedDataset(unfinished_message(here, done))
    return [here.join(n) for n in done.committed], done


def read_metadata(path: str | os.PathLike | Location, storage_options: dict | None = None) -> dict | None:
    """The vqtok settings stored in a token file's metadata (the first committed part of a folder, or its settings
    file when it has none yet); None if absent."""
    files, _ = dataset_files(path, storage_options, partial=True)
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


def read_codes(
    path: str | os.PathLike, storage_options: dict | None = None, partial: bool = False
) -> tuple[list[str], np.ndarray]:
    """A token dataset (folder) or one Parquet file -> (keys, int64 codes (N, h, w)), rows in file order. An
    unfinished dataset is refused unless `partial`, which reads its committed parts."""
    tokens = TokenSet(path, storage_options=storage_options, partial=partial)
    keys: list[str] = []
    grids: list[np.ndarray] = []
    for file, group in tokens.units:
        table = read_row_group(file, group)
        keys += table.column("key").to_pylist()
        grids.append(codes_array(table.column("codes")))
    if not grids:
        return keys, np.zeros((0, 0, 0), dtype=np.int64)
    return keys, np.concatenate(grids)


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


def gives_codes(made_by: dict, model_id: str, codes_id: str | None) -> bool:
    """Whether a model (its model id and codes id) gives the codes that the tokenizer `made_by` describes
    ({"model_id", "codes_id"}, as token metadata and priors record it) made: by their codes ids where both are
    known, for models that share their encode side share their codes; else only the model that made them."""
    if made_by.get("codes_id") is not None and codes_id is not None:
        return made_by["codes_id"] == codes_id
    return made_by.get("model_id") == model_id


class TokenSet:
    """One or several token datasets or Parquet files of grids, read as one, with the checks every reader needs.

    The one reader behind `vqtok decode`, `vqtok info`, `TokenDataset` and the prior. Each path may be local or
    a URL that fsspec opens (`storage_options` go to it). Opening checks that every file has a string `key`
    column, a `codes` column of (h, w) integer grids and the `columns` asked for, and that the files carrying
    vqtok's metadata were all made by one tokenizer (model id, K, grid), and that every token dataset folder
    finished (UnfinishedDataset otherwise); with `partial`, the committed parts of unfinished ones are read
    instead, and `unfinished` says how far each got. Then: `tokenizer()` says which,
    `check_tokenizer` compares it with a model, `select` and `check_codes` find codes outside [0, K),
    `class_count` checks a column of class labels, and `read` streams the rows.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Location | Sequence[str | os.PathLike | Location],
        columns: Sequence[str] = (),
        storage_options: dict | None = None,
        partial: bool = False,
    ) -> None:
        paths = [paths] if isinstance(paths, str | os.PathLike | Location) else list(paths)
        if not paths:
            raise StoreError("no token datasets or Parquet files given")
        self.paths = [str(p) for p in paths]
        self.columns = tuple(columns)
        self.unfinished: dict[str, Completion] = {}  # path -> how far it got, for the unfinished ones read in part
        self.schemas: dict[Location, pa.Schema] = {}
        self.metadata: dict[Location, dict | None] = {}
        self.units: list[tuple[Location, int]] = []  # (file, row group): the unit readers split across workers
        self.unit_rows: list[int] = []
        seen = set()
        for path in paths:
            files, done = dataset_files(path, storage_options, partial)
            if done is not None and not done.finished:
                self.unfinished[str(path)] = done
            if not files:
                found = "Parquet data files" if done is None else f"committed parts ({done.describe()})"
                raise StoreError(f"{path}: no {found}")
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

    def check_tokenizer(
        self, model_id: str, codebook_size: int, grid_size, force: bool = False, codes_id: str | None = None
    ) -> None:
        """Refuse codes another model made: K and grid (grid_size(image_size) -> (h, w) is the model's), and unless
        force the model's identity (`gives_codes`). A file without vqtok metadata (another tool's grids) passes."""
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
            if force or gives_codes(meta, model_id, codes_id):
                continue
            if meta.get("model_id") == model_id:  # the same weights, imported with another lookup
                raise StoreError(
                    f"the codes were made by model {model_id} with another lookup (codes id {meta.get('codes_id')}, "
                    f"this one's {codes_id}); --force decodes them anyway"
                )
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
            raise StoreError(
                f"{len(missing)} {plural(len(missing), 'key')} not in the tokens: {', '.join(missing[:5])}"
            )
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
                rows = f"{values.null_count} {plural(values.null_count, 'row')}"
                raise StoreError(f"{file}: column {column!r} has {rows} without a class")
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
