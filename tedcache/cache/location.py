"""Where a cache lives (a local folder or an fsspec URL), with the exclusive and conditional writes its lock
and leases are built on (claims.py)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import uuid
from contextlib import contextmanager, nullcontext

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem

from ..errors import TedcacheError
from .object_store import OBJECT_STORES, storage_options


class Location:
    """A cache folder: a local path or an fsspec URL (s3://bucket/prefix; endpoint and credentials come
    from the usual AWS_* variables or FSSPEC_S3_* settings)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        self.options = storage_options(self.protocol)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def child(self, name: str) -> "Location":
        return Location(f"{self.url}/{name}")

    def exists(self, rel: str = "") -> bool:
        """Whether `rel` (the folder itself by default) is there; a store that fails raises (s3fs's `exists`
        would answer False)."""
        target = self.path(rel) if rel else self.root
        if self.local:
            return self.fs.exists(target)
        try:
            self.fs.info(target)
        except FileNotFoundError:
            return False
        return True

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a local file is renamed into place; an object store publishes whole objects."""
        target = self.path(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.local:
            staging = f"{target}.tmp-{os.getpid()}"
            with open(staging, "wb") as f:
                f.write(data)
            os.replace(staging, target)
        else:
            self.fs.pipe_file(target, data)

    def create_exclusive(self, rel: str, data: bytes) -> str | None:
        """Write `rel` only if it does not exist: its tag (see read_tagged), or None when it exists. Local
        disks use O_EXCL; object stores a conditional PUT (If-None-Match: *). A write whose answer was lost
        and whose retry met its own object counts as done (`data` must be unique to the writer)."""
        target = self.path(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if self.local:
            try:
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return _digest(data)
        try:
            answer = self.fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            return self._landed(rel, data)
        return self._tag_of(rel, answer)

    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        """`rel`'s bytes and a tag that changes with every write of it (an object's ETag, read before its
        bytes; a local file's digest), or None when it is not there."""
        target = self.path(rel)
        try:
            if self.local:
                with open(target, "rb") as f:
                    data = f.read()
                return data, _digest(data)
            self.fs.invalidate_cache(target)
            tag = self.fs.info(target)["ETag"].strip('"')
            return self.fs.cat_file(target), tag
        except FileNotFoundError:
            return None

    def replace_tagged(self, rel: str, data: bytes, tag: str) -> str | None:
        """Overwrite `rel` with `data` only if it still has `tag`: the new tag, or None (it changed or is gone).
        Object stores: a conditional PUT (If-Match); local disks: under an flock held by every replacer."""
        target = self.path(rel)
        if self.local:
            with self._guard(rel):
                found = self.read_tagged(rel)
                if found is None or found[1] != tag:
                    return None
                self.write_bytes(rel, data)
                return _digest(data)
        try:
            answer = self.fs.pipe_file(target, data, IfMatch=f'"{tag}"')
        except FileNotFoundError:
            return None
        except OSError as exc:
            if not _precondition_failed(exc):
                raise
            return self._landed(rel, data)
        return self._tag_of(rel, answer)

    def remove_tagged(self, rel: str, tag: str) -> bool:
        """Remove `rel` if it still has `tag` (on an object store, checked just before the delete)."""
        with self._guard(rel) if self.local else nullcontext():
            found = self.read_tagged(rel)
            if found is None or found[1] != tag:
                return False
            self.fs.rm_file(self.path(rel))
            return True

    def honours_conditions(self) -> bool:
        """Whether this store refuses a second exclusive create and a replace with a stale tag (asked once per
        store and process, with a probe object that is removed again); local disks always do."""
        if self.local:
            return True
        if self.protocol not in OBJECT_STORES:  # (GCS, Azure, ...: their preconditions are not wired in yet)
            return False
        key = (self.root.split("/")[0], repr(self.options), os.environ.get("FSSPEC_S3_ENDPOINT_URL"))
        if key not in _CONDITIONS_HONOURED:
            probe = f".probe-{uuid.uuid4().hex}"
            first = self.create_exclusive(probe, b"first")
            second = self.create_exclusive(probe, b"second")
            stale = self.replace_tagged(probe, b"third", "0" * 32)
            self.fs.rm_file(self.path(probe))
            _CONDITIONS_HONOURED[key] = first is not None and second is None and stale is None
        return _CONDITIONS_HONOURED[key]

    def _landed(self, rel: str, data: bytes) -> str | None:
        """After a refused conditional write: its tag if what is there is `data` (an earlier attempt of this
        very write landed and its answer was lost), else None."""
        found = self.read_tagged(rel)
        return found[1] if found is not None and found[0] == data else None

    def _tag_of(self, rel: str, answer) -> str:
        etag = answer.get("ETag") if isinstance(answer, dict) else None
        return etag.strip('"') if etag else self.read_tagged(rel)[1]

    @contextmanager
    def _guard(self, rel: str):
        """An exclusive flock on `rel`.guard, beside it (local disks)."""
        with open(f"{self.path(rel)}.guard", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            yield

    def remove(self, rel: str = "") -> None:
        target = self.path(rel) if rel else self.root
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def listdir(self, rel: str = "") -> list[str]:
        target = self.path(rel) if rel else self.root
        if not self.fs.exists(target):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(target, detail=False))

    def check_bucket(self) -> None:
        """On an object store, refuse a bucket that does not exist (fsspec would make one for a misspelt name,
        and `exists` would hide a store that fails)."""
        if self.local:
            return
        bucket = self.root.split("/")[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise TedcacheError(f"the bucket {bucket} of {self.url} does not exist; create it, or fix the bucket "
                                "name in --cache-dir") from None

    def size(self, rel: str = "") -> int:
        """Bytes under `rel` (the whole folder by default); 0 when absent."""
        return int(self.fs.du(self.path(rel) if rel else self.root)) if self.exists(rel) else 0

    def zarr_store(self, read_only: bool):
        if self.local:
            return zarr.storage.LocalStore(self.root, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)

    def __str__(self) -> str:
        return self.url


_CONDITIONS_HONOURED: dict[tuple, bool] = {}


def _digest(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _precondition_failed(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a store's 412 Precondition Failed."""
    while exc is not None:
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        exc = exc.__cause__
    return False
