"""The one error type users see (the CLI prints it as a single line and exits non-zero), status notes, and
the environment's errors (a full disk, a folder one may not write) phrased as such."""

import errno
import sys


class TedcacheError(Exception):
    """A problem with the user's input, phrased as `what is wrong; how to fix it`."""


def note(message: str) -> None:
    """Progress and status lines go to stderr, so stdout carries only results (e.g. a cache path)."""
    print(message, file=sys.stderr, flush=True)


NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}
NO_WRITING = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
              errno.EROFS: "a read-only file system"}


def environment_error(exc: OSError, folder: str, needed: int | None = None) -> TedcacheError | None:
    """`exc` as the one line a user needs when it is the environment's doing (no room, no right to write
    in `folder`; `needed`: bytes still to write), or None for any other OSError."""
    if exc.errno in NO_ROOM:
        more = f": it needs about {size_text(needed)} more" if needed else ""
        return TedcacheError(f"{NO_ROOM[exc.errno]} where the cache is written ({folder}){more}; free space and run "
                             "the same command to resume")
    if exc.errno in NO_WRITING:
        return TedcacheError(f"cannot write in {folder} ({NO_WRITING[exc.errno]}); make it writable or give another "
                             "--cache-dir, and run the same command to resume")
    return None


def size_text(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
