"""Where a cache lives (a local folder or an fsspec URL) and the lock that keeps two writers apart."""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem

from ..errors import TedcacheError
from .object_store import storage_options


class Location:
    """A cache folder: a local path or an fsspec URL (s3://bucket/prefix; endpoint and credentials come
    from the usual AWS_* variables or FSSPEC_S3_* settings)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.options = storage_options(fsspec.core.split_protocol(self.url)[0] or "file")
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

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Write `rel` only if it does not exist; False when it does. Local disks do this atomically
        (O_EXCL); object stores have no such primitive here, so there the last writer wins (documented)."""
        if not self.local:
            self.write_bytes(rel, data)
            return True
        try:
            fd = os.open(self.path(rel), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

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


LOCK = ".lock"


class CacheLock:
    """Keeps two extractions from writing one cache. The lock names its holder; a lock left by a dead
    process on this host is recognised as stale and taken over."""

    def __init__(self, location: Location):
        self.location = location
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def holder(self) -> dict | None:
        """The live holder, or None (no lock, or a stale one)."""
        if not self.location.exists(LOCK):
            return None
        try:
            held = json.loads(self.location.read_bytes(LOCK))
        except (FileNotFoundError, ValueError):
            return None
        if held.get("host") == socket.gethostname() and not process_alive(int(held.get("pid", -1))):
            return None
        return held

    def __enter__(self):
        held = self.holder()
        if held is not None and held.get("pid") != os.getpid():
            raise TedcacheError(f"cache {self.location} is being written by pid {held['pid']} on {held['host']} "
                                f"since {held['since']}; wait for it to finish (or, if that process is gone, "
                                f"delete {self.location}/{LOCK})")
        self.location.fs.makedirs(self.location.root, exist_ok=True)
        if self.location.exists(LOCK):
            self.location.remove(LOCK)  # stale, or our own (checked above)
        if not self.location.create_exclusive(LOCK, json.dumps(self.me).encode()):
            raise TedcacheError(f"cache {self.location} was locked by another extraction a moment ago; "
                                "wait for it to finish")
        return self

    def __exit__(self, *exc) -> None:
        if self.location.exists(LOCK):
            self.location.remove(LOCK)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
