"""Where files live: the local disk, or object storage and other file systems through fsspec.

A path without a scheme, or a `file://` URL, is on the local disk and goes through the operating system: a
file is committed by writing it under a temporary name, fsyncing it, renaming it and fsyncing its folder.
Any other URL (`s3://`, `gs://`, `az://`, `hf://`, `memory://`...) goes through fsspec and the back end
package that serves its scheme (s3fs, gcsfs, adlfs: vqtok's `s3`, `gcs` and `azure` extras). Credentials
and endpoints come the way each back end's users expect (for S3 the standard AWS variables and files, and
`AWS_ENDPOINT_URL` for MinIO, Ceph or a test server); `storage_options` (`--storage-options`) are passed to
fsspec as they are, for the rest. An object store has no rename, but an object is invisible until its
upload completes: a file is committed by uploading it whole under its final name.

Whatever a back end raises when the store refuses or cannot be reached (its own exception types, or OSError)
becomes a StorageError naming the location, so that the command line prints one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vqtok.errors import StorageError, VQTokError
from vqtok.files import sync, sync_folder, write_atomically

# A scheme of two or more letters (s3://, pipe:, file://); one letter is a Windows drive.
URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
# What installs each scheme's back end: vqtok's extras for the clouds.
INSTALL = {"s3": "pip install 'vqtok[s3]'", "gs": "pip install 'vqtok[gcs]'", "az": "pip install 'vqtok[azure]'"}
INSTALL |= {"s3a": INSTALL["s3"], "gcs": INSTALL["gs"], "abfs": INSTALL["az"], "abfss": INSTALL["az"]}
INSTALL |= {"hf": "pip install huggingface_hub"}
# Packages whose exceptions mean that a store refused or could not be reached; they are not all OSErrors
# (botocore's EndpointConnectionError, google.auth's errors).
BACKEND_PACKAGES = {"botocore", "aiobotocore", "aiohttp", "google", "azure", "requests", "urllib3", "huggingface_hub"}
BACKEND_PACKAGES |= {"fsspec", "s3fs", "gcsfs", "adlfs"}
# The HTTP clients huggingface_hub raises through, unwrapped (httpx2 and httpcore2 since huggingface_hub 2).
BACKEND_PACKAGES |= {"httpx", "httpcore", "httpx2", "httpcore2"}


def is_url(path: str | os.PathLike) -> bool:
    return isinstance(path, str) and bool(URL_SCHEME.match(path))


def is_storage_error(exc: BaseException) -> bool:
    """Whether an exception says that files could not be reached or written (not that their content is bad)."""
    if isinstance(exc, OSError):
        return True
    return any(cls.__module__.split(".")[0] in BACKEND_PACKAGES for cls in type(exc).__mro__[:-2])


def storage_error(exc: BaseException, where: object) -> StorageError:
    if isinstance(exc, FileNotFoundError):
        detail = str(exc) if str(exc) and str(exc) not in str(where) else ""
        return StorageError(f"{where}: not found{': ' + detail if detail else ''}")
    if isinstance(exc, PermissionError):
        return StorageError(f"{where}: access denied ({exc}); check the credentials for this store")
    if isinstance(exc, OSError):
        return StorageError(f"{where}: {exc.strerror or exc}")
    return StorageError(f"{where}: the store cannot be reached or refused: {exc}")


@contextlib.contextmanager
def reported(where: object) -> Iterator[None]:
    """Raise a back end's refusals and connection failures inside the block as one-line StorageErrors."""
    try:
        yield
    except VQTokError:
        raise
    except Exception as exc:
        if not is_storage_error(exc):
            raise
        raise storage_error(exc, where).with_traceback(None) from exc


def parse_options(text: str | None) -> dict:
    """`--storage-options` JSON -> a dict for fsspec; StorageError when it is not a JSON object."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise StorageError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def filesystem(url: str, options: dict):
    """(fsspec file system, path inside it) for a URL; StorageError naming the extra when its back end is not
    installed."""
    import fsspec

    scheme = url.split(":", 1)[0].lower()
    try:
        with reported(url):  # a back end may reach its store as its file system is made
            return fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        install = INSTALL.get(scheme, f"install the fsspec back end for {scheme}://")
        raise StorageError(f"{url}: reading {scheme}:// needs a package that is not installed: {install}") from exc
    except ValueError as exc:  # an unknown protocol
        raise StorageError(f"{url}: {exc}") from None
    except TypeError as exc:  # an option the back end does not take
        raise StorageError(f"{url}: --storage-options: {exc}") from None


@dataclass(frozen=True)
class Location:
    """A file or folder on the local disk or in a store: what the user wrote (`url`, a path or a URL) and the
    fsspec options that reach it, as JSON so that the location is hashable and goes to DataLoader workers."""

    url: str
    options: str = "{}"

    @classmethod
    def of(cls, path: str | os.PathLike | Location, storage_options: dict | None = None) -> Location:
        if isinstance(path, Location):
            return path
        try:
            options = json.dumps(storage_options or {}, sort_keys=True)
        except TypeError as exc:  # they travel to DataLoader workers and are compared as text
            raise StorageError(
                f"storage options must be JSON values (strings, numbers, lists, objects): {exc}"
            ) from None
        return cls(os.fspath(path), options)

    def __str__(self) -> str:
        return self.url

    @property
    def local(self) -> bool:
        return not is_url(self.url) or self.url.startswith("file://")

    @property
    def path(self) -> str:
        """The local path, or the path inside the store's file system."""
        if not is_url(self.url):
            return self.url
        if self.url.startswith("file://"):
            return self.url.removeprefix("file://")
        return self.fs_and_path()[1]

    def fs_and_path(self):
        return filesystem(self.url, json.loads(self.options))

    def _fresh(self):
        """(file system, path) with what the file system remembers of this path forgotten: another process
        may have written here since it was last listed."""
        fs, path = self.fs_and_path()
        with reported(self):  # huggingface_hub resolves the path on the Hub to forget it
            fs.invalidate_cache(path)
        return fs, path

    @property
    def fs(self):
        return self.fs_and_path()[0]

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *names: str) -> Location:
        return Location("/".join([self.url.rstrip("/"), *names]), self.options)

    def parent(self) -> Location:
        return Location(self.url.rstrip("/").rsplit("/", 1)[0], self.options)

    # -- looking ---------------------------------------------------------------------------------------------

    def kind(self) -> str | None:
        """ "file", "directory" or None when there is nothing here. A store that cannot be reached or refuses is
        a StorageError, never a None: fsspec's own exists() and isdir() answer False to those."""
        if self.local:
            path = self.path
            return "directory" if os.path.isdir(path) else "file" if os.path.exists(path) else None
        fs, path = self._fresh()
        with reported(self):
            try:
                return fs.info(path)["type"]
            except FileNotFoundError:
                return None

    def exists(self) -> bool:
        return self.kind() is not None

    def isdir(self) -> bool:
        return self.kind() == "directory"

    def isfile(self) -> bool:
        return self.kind() == "file"

    def size(self) -> int:
        with reported(self):
            return os.path.getsize(self.path) if self.local else self.fs.size(self.path)

    def names(self) -> list[str]:
        """The names in a folder (files and folders), sorted; [] when there is no such folder."""
        if self.local:
            return sorted(os.listdir(self.path)) if os.path.isdir(self.path) else []
        fs, path = self._fresh()
        with reported(self):
            try:
                entries = fs.ls(path, detail=False)
            except FileNotFoundError:
                if path.split("/", 1)[0] and not fs.exists(path.split("/", 1)[0]):
                    raise  # a missing bucket is an error; a missing folder inside one is only empty
                return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != path.rstrip("/"))

    def find(self) -> list[str]:
        """Every file beneath a folder as a path relative to it ('/'-separated), sorted; names that start with
        '.' (hidden files and folders) are skipped."""
        if self.local:
            found = []
            for folder, dirs, files in os.walk(self.path, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                relative = os.path.relpath(folder, self.path)
                prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
                found += [prefix + f for f in files if not f.startswith(".")]
            return sorted(found)
        fs, path = self._fresh()
        root = path.rstrip("/") + "/"
        with reported(self):
            files = fs.find(path)
        relative = (f[len(root) :] for f in files if f.startswith(root))
        return sorted(r for r in relative if not any(part.startswith(".") for part in r.split("/")))

    def glob(self) -> list[Location]:
        """The files a glob pattern matches, sorted."""
        if self.local:
            import glob

            return [Location(p, self.options) for p in sorted(glob.glob(self.path))]
        fs, path = self._fresh()
        with reported(self):
            matches = fs.glob(path)
        return [Location(fs.unstrip_protocol(m), self.options) for m in sorted(matches)]

    # -- reading ---------------------------------------------------------------------------------------------

    def open(self, mode: str = "rb", **kwargs):
        if self.local:
            return open(self.path, mode)
        with reported(self):
            return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self, missing_ok: bool = False) -> bytes | None:
        try:
            with reported(self):
                if self.local:
                    return Path(self.path).read_bytes()
                return self.fs.cat_file(self.path)
        except StorageError as exc:
            if missing_ok and isinstance(exc.__cause__, FileNotFoundError | NotADirectoryError):
                return None
            raise

    def read_text(self, missing_ok: bool = False) -> str | None:
        data = self.read_bytes(missing_ok)
        return None if data is None else data.decode("utf-8")

    # -- writing ---------------------------------------------------------------------------------------------

    def makedirs(self) -> None:
        """Make a local folder; nothing in a store, where folders are only prefixes of names (and where
        fsspec's makedirs would create a missing bucket instead of reporting it)."""
        if self.local:
            with reported(self):
                os.makedirs(self.path, exist_ok=True)

    def write_bytes(self, data: bytes) -> None:
        """The whole file or nothing: written under a temporary name, fsynced and renamed on a local disk
        (its folder made if need be); uploaded in one request to a store."""
        with reported(self):
            if self.local:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                write_atomically(self.path, lambda p: p.write_bytes(data))
            else:
                self.fs.pipe_file(self.path, data)

    def write_with(self, write: Callable[[Path], object]) -> None:
        """write(a local temporary path), then the file takes this location whole (see `publish`)."""
        if self.local:
            with reported(self):
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                write_atomically(self.path, write)
            return
        fd, name = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(Path(name))
            self.publish(Path(name))
        finally:
            Path(name).unlink(missing_ok=True)

    def publish(self, temporary: Path) -> None:
        """Give a finished temporary file this location's name. On a local disk its data, then the new name
        (its folder) are fsynced before this returns; to a store it is uploaded whole, then removed here."""
        with reported(self):
            if self.local:
                sync(temporary)
                os.replace(temporary, self.path)
                sync_folder(os.path.dirname(self.path) or ".")
            else:
                self.fs.put_file(str(temporary), self.path)
                temporary.unlink()

    def upload(self, path: Path) -> None:
        """Copy a local file to this location in a store, whole (the local file stays)."""
        with reported(self):
            self.fs.put_file(str(path), self.path)

    def download(self, folder: Path) -> None:
        """Copy this folder of a store, and everything beneath it, into a local folder. Whoever can write to the
        store chooses its keys, so every file must land inside folder: a key that would not (an absolute path,
        a `..` part) is a StorageError naming it, before anything is written."""
        fs, path = self._fresh()
        root = path.rstrip("/") + "/"
        inside = folder.resolve()
        with reported(self):
            files = fs.find(path)
        targets = []
        for file in files:
            relative = file[len(root) :] if file.startswith(root) else file
            target = inside.joinpath(*relative.split("/"))
            escapes = not file.startswith(root) or relative.startswith("/") or ".." in relative.split("/")
            if escapes or not target.resolve().is_relative_to(inside):
                raise StorageError(
                    f"{fs.unstrip_protocol(file)}: refused, this key would be written outside {folder}; nothing "
                    "was downloaded"
                )
            targets.append((file, target))
        with reported(self):
            for file, target in targets:
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(file, str(target))

    def remove(self, missing_ok: bool = True) -> None:
        with reported(self):
            try:
                if self.local:
                    os.unlink(self.path)
                else:
                    self.fs.rm_file(self.path)
            except FileNotFoundError:
                if not missing_ok:
                    raise

    def remove_tree(self) -> None:
        """Remove a folder and everything beneath it; nothing when there is none."""
        with reported(self):
            if self.local:
                shutil.rmtree(self.path, ignore_errors=True)
                return
            fs, path = self._fresh()
            files = fs.find(path)
            if files:
                fs.rm(files)
