"""Where samples come from: WebDataset shards, folders of image files, and Parquet files with an image column.

Every input is cut into units of work, and every unit is read as one stream of Samples (key, unit name,
fields), so that training, evaluation and encoding never ask where images were kept:

- a WebDataset shard (a tar file): one unit; members are grouped into samples by key (`0001.jpg` and
  `0001.cls` are fields `jpg` and `cls` of sample `0001`);
- a folder of image files, searched recursively in sorted order: one unit per fixed slice of the listing
  (`files_per_part` files); a file's key is its path relative to the folder without its extension, and with
  `class_from_folder` its first folder level is an integer `cls` (class names numbered in sorted order);
- a Parquet file, as Hugging Face `datasets` writes them: one unit; the image column is a struct of `bytes`
  and `path` or plain binary, the key is the `key`, `__key__` or `id` column, else `<file stem>/<row>`, and
  other columns are carried under their own names and types. A row with a path and no bytes (`datasets`
  keeps only the path of a local file it did not embed) is read only under an `image_root` the user names:
  a path named inside a file is a stranger's choice, and nothing outside the root is opened for it.

How an input is recognised: a `.parquet` file is Parquet, any other file a tar; a folder holding tar files
(`.tar`, or compressed: `.tar.gz`, `.tgz`, `.tar.bz2`, `.tar.xz`) is those shards; otherwise a folder holding
image files is an image folder and one holding `.parquet` files (at any depth, `datasets`'
`data/train-00000-of-00002.parquet`) a Parquet dataset. Globs and brace patterns expand first; every path may
be a URL that fsspec opens (see `vqtok.storage`).

Reading runs over millions of images unattended, so nothing a file contains may stop it: a unit that breaks
mid-way yields the samples before the break and then raises BrokenShardError with the key it broke in, and a
folder's file that cannot be read is a Sample with an `error` instead of fields.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import reprlib
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

from braceexpand import UnbalancedBracesError, braceexpand

from vqtok.errors import DataError
from vqtok.storage import Location, is_storage_error, is_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm")
IMAGE_FIELD = "image"  # the field that holds a Parquet row's image, whatever its format
FILES_PER_PART = 1000
KEY_COLUMNS = ("key", "__key__", "id")  # a Parquet column that names its rows, the first one found
PARQUET_BATCH_ROWS = 256
REMOTE_FILES_AT_ONCE = 64  # a folder in a store: files fetched concurrently, in listing order
# Schemes webdataset opens itself (a shell pipe, curl), without fsspec; nothing can be listed there.
WEBDATASET_SCHEMES = ("pipe:", "http://", "https://")
# The shards a folder is read as: what Python's tarfile opens (zstd only from Python 3.14, so not .tar.zst).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


class BrokenShardError(DataError):
    """A unit that cannot be read to its end; `key` is the sample being read when it broke ("" if none)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class Sample(NamedTuple):
    key: str
    shard: str  # the name of the unit it came from
    # A tar member's extension (lower case: "jpg", "cls", "seg.png") or a Parquet column -> its bytes, or the
    # value of a carried Parquet column or a folder's class (int, float, bool, str).
    fields: dict[str, object]
    error: str | None = None  # why a file of a folder could not be read; no fields then


# ---------------------------------------------------------------------------------------------- units


@dataclass(frozen=True)
class Unit:
    """A unit of work: read whole, encoded into one part file, committed whole and resumed whole."""

    COUNTED_AS: ClassVar[str] = "parts"  # what a progress bar counts units of this kind as
    name: str  # what rows' `shard` column says, and what the token dataset's part file is named after

    def samples(self) -> Iterator[Sample]:
        raise NotImplementedError


@dataclass(frozen=True)
class TarShard(Unit):
    COUNTED_AS: ClassVar[str] = "shards"
    location: Location | None = None  # None: a URL that webdataset opens (pipe:, http://)

    def samples(self) -> Iterator[Sample]:
        return _tar_samples(self)


@dataclass(frozen=True)
class FileSlice(Unit):
    COUNTED_AS: ClassVar[str] = "folder slices"
    root: Location = None
    files: tuple[str, ...] = ()  # paths relative to root, '/'-separated
    classes: tuple[str, ...] | None = None  # with class_from_folder: the class names, numbered in this order

    def samples(self) -> Iterator[Sample]:
        return _file_samples(self)


@dataclass(frozen=True)
class ParquetPart(Unit):
    COUNTED_AS: ClassVar[str] = "Parquet files"
    location: Location = None
    image_column: str = ""
    carried: tuple[tuple[str, str], ...] = ()  # (column, type) of the columns to carry
    image_root: str | None = None  # a resolved local folder under which path-only rows are read

    def samples(self) -> Iterator[Sample]:
        return _parquet_samples(self)


def iter_samples(unit: Unit | str) -> Iterator[Sample]:
    """Stream a unit's samples (a string is a tar shard's path or URL); a broken unit yields its complete
    samples, then raises BrokenShardError."""
    if isinstance(unit, str):
        unit = TarShard(unit, None if unit.startswith(WEBDATASET_SCHEMES) else Location.of(unit))
    return unit.samples()


@dataclass
class Inputs:
    """What a list of input specifications expands to."""

    units: list[Unit]
    classes: tuple[str, ...] = ()  # class_from_folder's names; cls i is classes[i]
    # image folder -> {"files": n, "sha256": digest, "files_per_part": n}: what its slices depend on
    listings: dict[str, dict] = field(default_factory=dict)
    kept_types: tuple[str, ...] = ()  # the type of each carried field: int64, float64, bool or string

    @property
    def names(self) -> list[str]:
        return [unit.name for unit in self.units]


# ---------------------------------------------------------------------------------------------- expanding


def expand_inputs(
    specs: Sequence[str] | str,
    *,
    files_per_part: int = FILES_PER_PART,
    class_from_folder: bool = False,
    image_column: str | None = None,
    keep: Sequence[str] = (),
    image_root: str | os.PathLike | None = None,
    storage_options: dict | None = None,
) -> Inputs:
    """Tar files, folders (of tars, of images, of Parquet files), Parquet files, globs, brace patterns and URLs
    -> units of work, in order, once each. Local paths are resolved (`realpath`), so that one file has one
    name however it is reached. DataError names the spec that matched nothing or holds nothing readable.

    `image_root`, a local folder, opts in to reading the Parquet rows that hold a path and no image bytes:
    relative paths are resolved under it, absolute ones read only if they lie inside it (after symbolic
    links and `..` are resolved); any other path is that row's error."""
    if isinstance(specs, str):  # a lone string would otherwise be read as a list of one-letter specs
        specs = [specs]
    if files_per_part < 1:
        raise DataError(f"files per part must be at least 1, not {files_per_part}")
    root = _image_root(image_root)
    found: list[tuple[str, Location | str, str, list[str]]] = []  # (kind, where, what the user wrote, images)
    for spec in specs:
        try:
            expanded = list(braceexpand(spec))
        except UnbalancedBracesError as exc:
            raise DataError(f"{spec}: unbalanced braces") from exc
        for url in expanded:
            where = url if url == spec else f"{url} (from {spec})"
            found += [(kind, place, where, files) for kind, place, files in _expand_one(url, where, storage_options)]
    if not found:
        raise DataError("no inputs given")
    _check_remote_files_exist([(place, where) for kind, place, where, _ in found if kind != "folder"])

    folders = [(place, where, files) for kind, place, where, files in found if kind == "folder"]
    classes = _classes(folders) if class_from_folder else ()
    parquets = [place for kind, place, _, _ in found if kind == "parquet"]
    kinds = {kind for kind, _, _, _ in found}
    kept_types = tuple(_kept_type(name, kinds, class_from_folder, parquets) for name in keep)
    carried = tuple((name, t) for name, t in zip(keep, kept_types, strict=True))
    image_column = _image_column(parquets[0], image_column) if parquets else ""

    units: list[Unit] = []
    listings = {}
    for kind, place, _, files in found:
        if kind == "tar":
            units.append(TarShard(str(place), place if isinstance(place, Location) else None))
        elif kind == "parquet":
            units.append(ParquetPart(str(place), place, image_column, carried, root))
        else:
            listings[str(place)] = {**listing_record(files), "files_per_part": files_per_part}
            width = len(str(len(files)))
            for start in range(0, len(files), files_per_part):
                end = min(start + files_per_part, len(files))
                name = f"{place}[{start:0{width}d}:{end:0{width}d}]"
                units.append(FileSlice(name, place, tuple(files[start:end]), classes if class_from_folder else None))
    units = list({unit.name: unit for unit in units}.values())  # once each, first place kept
    return Inputs(units, classes, listings, kept_types)


def _image_root(image_root: str | os.PathLike | None) -> str | None:
    if image_root is None:
        return None
    image_root = os.fspath(image_root)
    if is_url(image_root):
        raise DataError(f"--image-root {image_root}: must be a local folder")
    if not os.path.isdir(image_root):
        raise DataError(f"--image-root {image_root}: no such folder")
    return os.path.realpath(image_root)


def listing_record(files: Sequence[str]) -> dict:
    """What identifies a folder's listing: its count and a SHA-256 over the sorted relative paths."""
    digest = hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest()
    return {"files": len(files), "sha256": digest}


def _expand_one(url: str, where: str, options: dict | None) -> list[tuple[str, Location | str, list[str]]]:
    """One expanded spec -> [(kind, location, image files)], kind "tar", "parquet" or "folder" (whose image
    files, relative to it and sorted, come with it)."""
    if url.startswith(WEBDATASET_SCHEMES):
        return [("tar", url, [])]
    if glob.has_magic(url):
        matches = Location.of(url, options).glob()
        if not matches:
            raise DataError(f"{where}: no files match")
        return [item for match in matches for item in _classify(_resolved(match), where)]
    return _classify(_resolved(Location.of(url, options)), where)


def _resolved(place: Location) -> Location:
    return place if is_url(place.url) else Location(os.path.realpath(place.url), place.options)


def _classify(place: Location, where: str) -> list[tuple[str, Location, list[str]]]:
    kind = "parquet" if place.url.lower().endswith(".parquet") else "tar"
    # A store is not asked about each of ten thousand named shards; they are looked up in their folders'
    # listings afterwards (_check_remote_files_exist).
    if not place.local and place.url.lower().endswith((*TAR_SUFFIXES, ".parquet")):
        return [(kind, place, [])]
    if place.isdir():
        return _folder(place, where)
    if place.local and not place.exists():
        raise DataError(f"{where}: no such file or directory")
    return [(kind, place, [])]


def _folder(place: Location, where: str) -> list[tuple[str, Location, list[str]]]:
    tars = [name for name in place.names() if name.lower().endswith(TAR_SUFFIXES)]
    if tars:
        return [("tar", place.join(name), []) for name in tars]
    files = place.find()
    images = [f for f in files if _extension(f) in IMAGE_EXTENSIONS]
    parquets = [f for f in files if f.endswith(".parquet") and not _underscored(f)]
    if images and parquets:
        raise DataError(f"{where}: holds both image files and .parquet files; give the folder or a glob of one kind")
    if images:
        _check_keys(images, where)
        return [("folder", place, images)]
    if parquets:
        return [("parquet", place.join(*f.split("/")), []) for f in parquets]
    raise DataError(
        f"{where}: holds no shards ({', '.join(TAR_SUFFIXES)}), no image files ({', '.join(IMAGE_EXTENSIONS)}) and "
        "no .parquet files"
    )


def _underscored(relative: str) -> bool:
    """Names starting with _ are a Parquet dataset's metadata (`_errors/`, `_delta_log/`), as pyarrow reads it."""
    return any(part.startswith("_") for part in relative.split("/"))


def _extension(relative: str) -> str:
    name = relative.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _check_remote_files_exist(places: list[tuple[Location | str, str]]) -> None:
    """A named file in a store is looked up in its folder's listing, one listing per folder, rather than one
    request per file: ten thousand shards of a brace pattern cost ten requests, not ten thousand."""
    by_parent: dict[Location, list[tuple[Location, str]]] = {}
    for place, where in places:
        if isinstance(place, Location) and not place.local:
            by_parent.setdefault(place.parent(), []).append((place, where))
    for parent, members in by_parent.items():
        names = set(parent.names())
        for place, where in members:
            if place.name not in names:
                raise DataError(f"{where}: no such file")


def _check_keys(files: list[str], where: str) -> None:
    keys: dict[str, str] = {}
    for f in files:
        key = _file_key(f)
        if key in keys:
            raise DataError(f"{where}: {keys[key]} and {f} would both have the key {key}; rename one")
        keys[key] = f


def _file_key(relative: str) -> str:
    folder, _, name = relative.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    return f"{folder}/{stem}" if folder else stem


def _classes(folders) -> tuple[str, ...]:
    names = set()
    for _, where, files in folders:
        loose = next((f for f in files if "/" not in f), None)
        if loose is not None:
            raise DataError(f"{where}: {loose} is in no class folder (--class-from-folder reads the first level)")
        names.update(f.split("/", 1)[0] for f in files)
    return tuple(sorted(names))


def _kept_type(name: str, kinds: set[str], class_from_folder: bool, parquets: list[Location]) -> str:
    """The column type of a carried field, the same from every kind of input or a DataError."""
    types = {}
    if "tar" in kinds:
        types["shards"] = "int64" if name == "cls" else "string"  # WebDataset's convention: cls is a class index
    if "folder" in kinds:
        if name != "cls" or not class_from_folder:
            raise DataError(f"cannot carry {name!r} from a folder of images: it has only cls, with --class-from-folder")
        types["image folders"] = "int64"
    if parquets:
        schema = _parquet_schema(parquets[0])
        if name not in schema.names:
            raise DataError(f"{parquets[0]}: no column {name!r} to carry (columns: {', '.join(schema.names)})")
        types["Parquet files"] = carried_type(schema.field(name).type, name, parquets[0])
    if len(set(types.values())) > 1:
        raise DataError(f"{name!r} has different types in {' and '.join(f'{k} ({v})' for k, v in types.items())}")
    return next(iter(types.values()))


def carried_type(arrow_type, name: str, where: object) -> str:
    import pyarrow as pa

    if pa.types.is_integer(arrow_type):
        return "int64"
    if pa.types.is_floating(arrow_type):
        return "float64"
    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    if pa.types.is_dictionary(arrow_type) and pa.types.is_string(arrow_type.value_type):
        return "string"
    raise DataError(f"{where}: column {name!r} is {arrow_type}; integers, floats, booleans and text can be carried")


# ---------------------------------------------------------------------------------------------- tar shards


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on its TarFile why the last header read failed.

    In stream mode tarfile ends the iteration without a word on a cut or corrupt header, exactly as on the
    end-of-archive marker; only the kind of failure of the last header tells a whole shard from a broken one.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.vqtok_last_header_error = exc
            raise


def _open_tar(unit: TarShard):
    if unit.location is None:
        import webdataset

        return webdataset.gopen(unit.name)
    if unit.location.local:
        return open(unit.location.path, "rb")
    return unit.location.open("rb", block_size=2**23)


def _tar_samples(unit: TarShard) -> Iterator[Sample]:
    url = unit.name
    try:
        raw = _open_tar(unit)
    except Exception as exc:  # each scheme's opener raises its own kind
        raise BrokenShardError(f"{url}: cannot open: {exc}") from exc
    key, fields, count = "", {}, 0
    try:
        tar = tarfile.open(fileobj=raw, mode="r|*", tarinfo=_EndAwareTarInfo)
        for member in tar:
            tar.members = []  # stream mode keeps every header otherwise: memory grows with the shard
            if not member.isfile() or member.name.startswith("__"):  # directories, links, __index__ and such
                continue
            folder, _, basename = member.name.rpartition("/")
            stem, dot, extension = basename.partition(".")
            if not stem or not dot:  # no key or no extension: not part of any sample, as in webdataset
                continue
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key:  # a new key's header: the sample before it is complete
                if fields:
                    yield Sample(key, url, fields)
                    count += 1
                key, fields = member_key, {}
            fields[extension.lower()] = tar.extractfile(member).read()
        end = getattr(tar, "vqtok_last_header_error", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            reason = "corrupt tar header" if isinstance(end, tarfile.InvalidHeaderError) else "cut short"
            raise BrokenShardError(f"{url}: {reason} after {count} complete samples", key)
    except BrokenShardError:
        raise
    except Exception as exc:
        if not isinstance(exc, tarfile.TarError | EOFError | zlib.error) and not is_storage_error(exc):
            raise
        # The sample being read when the shard broke is dropped (it may be missing fields); its key is kept.
        raise BrokenShardError(f"{url}: unreadable after {count} complete samples: {exc}", key) from exc
    finally:
        # The end-of-archive check above already tells whether the data is whole; a pipe's exit status
        # after that, or on an early close by the consumer, has nothing to add.
        with contextlib.suppress(Exception):
            raw.close()
    if fields:
        yield Sample(key, url, fields)


# ---------------------------------------------------------------------------------------------- folders


def _file_samples(unit: FileSlice) -> Iterator[Sample]:
    labels = {name: i for i, name in enumerate(unit.classes)} if unit.classes is not None else None
    for relative, data, error in _read_files(unit):
        fields: dict[str, object] = {}
        if data is not None:
            fields[_extension(relative)] = data
            if labels is not None:
                fields["cls"] = labels[relative.split("/", 1)[0]]
        yield Sample(_file_key(relative), unit.name, fields, error)


def _read_files(unit: FileSlice) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(relative path, bytes or None, why not) of each file, in order. On a local disk a file that cannot be
    read is that file's problem; in a store only a missing or forbidden file is, and anything else (an
    endpoint that stops answering) breaks the unit, to be done again by the next run."""
    root = unit.root
    if root.local:
        for relative in unit.files:
            try:
                with open(os.path.join(root.path, *relative.split("/")), "rb") as f:
                    yield relative, f.read(), None
            except OSError as exc:
                yield relative, None, f"cannot read: {exc.strerror or exc}"
        return
    fs, base = root.fs_and_path()
    done = 0
    for start in range(0, len(unit.files), REMOTE_FILES_AT_ONCE):
        chunk = unit.files[start : start + REMOTE_FILES_AT_ONCE]
        paths = [f"{base.rstrip('/')}/{relative}" for relative in chunk]
        try:
            # Fetched concurrently (an async back end gathers them), answered in order. fsspec would read a
            # list's [, * and ? as a glob: such names are fetched one by one.
            plain = [path for path in paths if not glob.has_magic(path)]
            found = fs.cat(plain, on_error="return") if plain else {}
            for path in paths:
                if glob.has_magic(path):
                    try:
                        found[path] = fs.cat_file(path)
                    except (FileNotFoundError, PermissionError) as exc:
                        found[path] = exc
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            raise BrokenShardError(f"{unit.name}: unreadable after {done} files: {exc}", _file_key(chunk[0])) from exc
        for relative, path in zip(chunk, paths, strict=True):
            data = found.get(path)
            if isinstance(data, FileNotFoundError | PermissionError):
                yield relative, None, f"cannot read: {type(data).__name__}: {data}"
            elif isinstance(data, BaseException):
                raise BrokenShardError(f"{unit.name}: unreadable after {done} files: {data}", _file_key(relative))
            else:
                yield relative, data, None
            done += 1


# ---------------------------------------------------------------------------------------------- Parquet


def _parquet_schema(place: Location):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vqtok.storage import reported

    try:
        with reported(place), place.open("rb") as f:
            return pq.read_schema(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{place}: not a Parquet file ({exc})") from exc


def _byte_columns(schema) -> list[str]:
    """Columns that can hold encoded images: binary, or a struct with a binary `bytes` field (what
    `datasets.Image()` writes)."""
    import pyarrow as pa

    names = []
    for f in schema:
        t = f.type
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            t = t.field("bytes").type
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            names.append(f.name)
    return names


def _image_candidates(schema) -> list[str]:
    """The byte columns `datasets` marks as images in the features it leaves in the file, else every one."""
    candidates = _byte_columns(schema)
    try:
        features = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))["info"]["features"]
        marked = [name for name in candidates if features.get(name, {}).get("_type") == "Image"]
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return candidates
    return marked or candidates


def _image_column(place: Location, chosen: str | None) -> str:
    schema = _parquet_schema(place)
    if chosen is not None:
        if chosen not in schema.names:
            raise DataError(f"{place}: no column {chosen!r} (columns: {', '.join(schema.names)})")
        if chosen not in _byte_columns(schema):
            raise DataError(f"{place}: column {chosen!r} holds no image bytes ({schema.field(chosen).type})")
        return chosen
    candidates = _image_candidates(schema)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DataError(
            f"{place}: no image column (binary, or a struct of bytes and path as datasets writes); "
            f"columns: {', '.join(schema.names)}"
        )
    raise DataError(f"{place}: several image columns ({', '.join(candidates)}); choose one with --image-column")


def _parquet_samples(unit: ParquetPart) -> Iterator[Sample]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = unit.location.name.removesuffix(".parquet")
    rows, key = 0, ""
    try:
        with contextlib.ExitStack() as stack:
            source = unit.location.path if unit.location.local else stack.enter_context(unit.location.open("rb"))
            parquet = stack.enter_context(pq.ParquetFile(source))
            schema = parquet.schema_arrow
            _check_parquet_schema(unit, schema)
            key_column = next((name for name in KEY_COLUMNS if name in schema.names), None)
            columns = [unit.image_column, *([key_column] if key_column else []), *(n for n, _ in unit.carried)]
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(dict.fromkeys(columns))):
                images = batch.column(unit.image_column)
                paths = [None] * batch.num_rows
                if pa.types.is_struct(images.type):
                    if images.type.get_field_index("path") >= 0:
                        paths = images.field("path").to_pylist()
                    images = images.field("bytes")
                images = images.to_pylist()
                keys = batch.column(key_column).to_pylist() if key_column else [None] * batch.num_rows
                carried = {name: batch.column(name).to_pylist() for name, _ in unit.carried}
                for i in range(batch.num_rows):
                    key = str(keys[i]) if keys[i] is not None else f"{stem}/{rows}"
                    image, error = images[i], None
                    if image is None:
                        image, error = _read_path(paths[i], unit.image_root)
                    if error is not None:
                        yield Sample(key, unit.name, {}, error)
                    else:
                        fields = {IMAGE_FIELD: image}
                        fields.update((name, values[i]) for name, values in carried.items() if values[i] is not None)
                        yield Sample(key, unit.name, fields)
                    rows += 1
    except BrokenShardError:
        raise
    except Exception as exc:
        if not isinstance(exc, pa.ArrowException) and not is_storage_error(exc):
            raise
        raise BrokenShardError(f"{unit.name}: unreadable after {rows} rows: {exc}", "") from exc


def _read_path(path: str | None, root: str | None) -> tuple[bytes | None, str | None]:
    """(bytes, None) of the file a path-only row names, or (None, why not). The path is a stranger's: it is
    read only under `root`, resolved (symbolic links, `..`) before it is checked."""
    if path is None:
        return None, "no image (null)"
    if not isinstance(path, str):  # a crafted file's path field can hold bytes or a number
        return None, f"not a path: {reprlib.repr(path)} is {type(path).__name__}, not text"
    if root is None:
        return None, f"only a path, no image bytes: {path} (a path inside a file is read only with --image-root DIR)"
    try:
        resolved = os.path.realpath(os.path.join(root, path))  # an absolute path stays itself
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return None, f"not a path: {path!r}: {exc}"
    if os.path.commonpath([root, resolved]) != root:
        return None, f"path outside --image-root: {path} is not under {root}"
    try:
        with open(resolved, "rb") as f:
            return f.read(), None
    except OSError as exc:
        return None, f"cannot read: {path}: {exc.strerror or exc}"


def _check_parquet_schema(unit: ParquetPart, schema) -> None:
    """Every file of a dataset is checked against the first one's image column and carried types."""
    if unit.image_column not in _byte_columns(schema):
        raise BrokenShardError(
            f"{unit.name}: no image column {unit.image_column!r} (columns: {', '.join(schema.names)})"
        )
    for name, expected in unit.carried:
        if name not in schema.names:
            raise BrokenShardError(f"{unit.name}: no column {name!r} to carry")
        actual = carried_type(schema.field(name).type, name, unit.name)
        if actual != expected:
            raise BrokenShardError(f"{unit.name}: column {name!r} is {actual} here, {expected} in the first file")
