"""The token dataset's commit protocol, both sides of it: how shards are written so that no reader ever sees
half of one, and what counts as committed and finished when a dataset is read back.

Writing. Independent processes share one dataset without talking: each writes only the shards it was given,
and the settings file is the same from every process. On a local disk every file is written under a temporary
name (`.part-...tmp`, which readers skip), fsynced and renamed, and its folder fsynced, before the next file of
the commit; in an object store, which has no rename, every file is uploaded whole under its final name (an
object is invisible until its upload completes). A shard's commit is its errors, then its part, then its marker
(`_stats/`), each durable before the next. Whichever process finds every shard done writes `_SUCCESS`. A crash
at any moment leaves at most a shard to do again; a rerun skips the shards whose marker says done and does the
others again, replacing what they left under the same names.

Reading. A part is committed when its marker names it; a dataset is finished when `_SUCCESS` is there and every
part is committed (`completion`). Readers that train on tokens refuse an unfinished dataset unless asked to read
its committed parts only (`vqtok.tokens.reader`). docs/token-format.md states the guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vqtok import __version__
from vqtok.errors import ErrorTally, StoreError, plural
from vqtok.storage import Location, reported

from .format import (
    ERRORS_DIR,
    ERRORS_SCHEMA,
    PLANNED_KEY,
    ROW_GROUP_ROWS,
    SETTINGS_NAME,
    STATS_DIR,
    SUCCESS_NAME,
    WRITE_OPTIONS,
    TokenSettings,
    grid_array,
    open_parquet,
    part_name,
    token_schema,
)


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
    asked = None if names is None else set(names)
    wanted = [n for n in present if asked is None or n in asked]
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
        settings_file = here.join(SETTINGS_NAME)
        settings_bytes = settings_file.read_bytes(missing_ok=True)
        foreign = any(not _ours(name) for name in here.names())
        if foreign and settings_bytes is None:  # even with --overwrite: its files are somebody else's
            raise StoreError(f"{here} is not empty and is not a vqtok token dataset: choose another folder")
        listed: dict = {}
        if overwrite:
            everyone, own = {part_name(s) for s in shards}, {part_name(s) for s in mine}
            self._remove_files(lambda name: name in own or (tidy and name not in everyone))
        elif settings_bytes is not None:
            try:
                saved = json.loads(settings_bytes)
                existing = TokenSettings.from_dict(saved)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                raise StoreError(f"{settings_file}: not vqtok's settings ({exc}); use --overwrite") from exc
            changes = self.settings.differences(existing)
            if changes:
                raise StoreError(
                    f"{here} holds tokens made with other settings ({'; '.join(changes)}); "
                    "use --overwrite to replace them"
                )
            listed = saved.get("listings") or {}
            check_listings(listed, listings or {})
        here.join(ERRORS_DIR).makedirs()
        here.join(STATS_DIR).makedirs()
        recorded = {**self.settings.to_dict(), "listings": {**listed, **(listings or {})}, PLANNED_KEY: len(shards)}
        _write_json(settings_file, recorded)
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

    def commit(self, stats: dict, failure: str | None = None) -> dict:
        """Make the shard visible: its errors, then its part, then the marker that says it is done, or with a
        `failure` (why the shard could not be read to its end) that it failed, its readable rows kept and the
        shard done again by the next run. Each file is whole and durable (fsynced with its folder, or uploaded)
        before the next is written. `stats` (counts, timings) go into the marker."""
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
            "status": "failed" if failure else "done",
            "failure": failure,
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


def read_errors(path: str | os.PathLike, storage_options: dict | None = None) -> pa.Table:
    """The `_errors` rows of a token dataset: key, shard, reason."""
    folder = Location.of(path, storage_options).join(ERRORS_DIR)
    tables = []
    for name in folder.names():
        if name.startswith("part-") and name.endswith(".parquet"):
            with open_parquet(folder.join(name)) as parquet:
                tables.append(parquet.read().cast(ERRORS_SCHEMA))
    return pa.concat_tables(tables) if tables else ERRORS_SCHEMA.empty_table()


@dataclass(frozen=True)
class Completion:
    """What the commit protocol says of a token dataset folder, as `completion` finds it."""

    parts: tuple[str, ...]  # the part files present (names), in name order
    committed: tuple[str, ...]  # those whose marker names them: whole, and counted in the dataset
    done: int  # shards whose marker says done
    failed: tuple[str, ...]  # shards whose marker says failed: read only in part, done again by a rerun
    planned: int | None  # the shards its last run was given; None for datasets written before that was recorded
    success: bool  # _SUCCESS is there

    @property
    def finished(self) -> bool:
        """The last run finished every shard, and no part lacks its marker."""
        return self.success and len(self.committed) == len(self.parts)

    def describe(self) -> str:
        """How far the dataset got, in words: "37 of 100 shards done, 1 failed"."""
        if self.planned is not None and self.done >= self.planned and not self.failed and not self.success:
            words = [f"all {self.planned} shards done, but the run did not end (stopped, or too many samples failed)"]
        else:
            done = f"{self.done} of {self.planned}" if self.planned is not None else f"{self.done}"
            words = [f"{done} {plural(self.planned if self.planned is not None else self.done, 'shard')} done"]
        if self.failed:
            words.append(f"{len(self.failed)} failed")
        uncommitted = len(self.parts) - len(self.committed)
        if uncommitted:
            words.append(f"{uncommitted} {plural(uncommitted, 'part file')} without a commit marker")
        return ", ".join(words)


def completion(path: str | os.PathLike | Location, storage_options: dict | None = None) -> Completion | None:
    """Which parts of a token dataset folder are committed and whether its last run finished; None for a folder
    vqtok did not write (no settings file). One listing of each folder; the markers themselves are read only
    when the run did not finish, to count the shards done."""
    here = Location.of(path, storage_options)
    settings = here.join(SETTINGS_NAME).read_bytes(missing_ok=True)
    if settings is None:
        return None
    names = here.names()
    parts = tuple(n for n in names if n.startswith("part-") and n.endswith(".parquet"))
    marked = {n.removesuffix(".json") for n in here.join(STATS_DIR).names() if n.endswith(".json")}
    committed = tuple(n for n in parts if n.removesuffix(".parquet") in marked)
    success = SUCCESS_NAME in names
    planned = None
    with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError):
        recorded = json.loads(settings).get(PLANNED_KEY)
        planned = int(recorded) if recorded is not None else None
    if success and len(committed) == len(parts):
        return Completion(parts, committed, len(committed), (), planned, success)
    markers = read_markers(here, [n.removesuffix(".parquet") for n in committed]).values()
    done = sum(m.get("status") == "done" for m in markers)
    failed = tuple(str(m.get("shard")) for m in markers if m.get("status") == "failed")
    return Completion(parts, committed, done, failed, planned, success)
