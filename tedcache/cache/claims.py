"""Who writes a cache and who reads it: the writer's lock (one per cache) and the readers' leases (one each).

Both are small JSON objects in the cache's folder that name their holder (host, pid, since) and carry a
heartbeat: the holder rewrites them every HEARTBEAT_S seconds. A claim is live while its holder runs: on
its own host, while its pid exists; from another host, until MISSED_BEATS beats were missed (the hosts'
clocks are assumed to agree within that margin). The lock is taken with an exclusive create and renewed
or taken over with a write conditional on the tag it had (docs/design.md, "Sharing caches")."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from ..errors import TedcacheError, note
from .location import Location

LOCK = ".lock"
READERS = ".readers"
HEARTBEAT_S = float(os.environ.get("TEDCACHE_HEARTBEAT_S", "30"))
MISSED_BEATS = 4
WAIT_POLL_S = 2.0

_lost_locks: dict[str, dict] = {}  # cache url -> the holder that took this process's lock
_removed_while_read: set[str] = set()  # cache urls whose lease vanished under a reader of this process


def _claim(**extra) -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "beat": now, "heartbeat_s": HEARTBEAT_S, **extra}


def beat_age(claim: dict) -> float:
    """Seconds since the claim's last heartbeat (by this host's clock)."""
    return max(0.0, time.time() - float(claim.get("beat", 0)))


def is_live(claim: dict) -> bool:
    """On this host: its process exists; elsewhere: its heartbeat is at most MISSED_BEATS beats old."""
    if claim.get("host") == socket.gethostname():
        return process_alive(int(claim.get("pid", -1)))
    return beat_age(claim) <= MISSED_BEATS * float(claim.get("heartbeat_s", HEARTBEAT_S))


def describe(claim: dict) -> str:
    what = f" ({claim['what']})" if claim.get("what") else ""
    return f"pid {claim['pid']} on {claim['host']}{what}, heartbeat {beat_age(claim):.0f}s ago"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _parse(data: bytes) -> dict:
    try:
        claim = json.loads(data)
    except ValueError:
        return {}
    return claim if isinstance(claim, dict) and "pid" in claim else {}


class _Heartbeat:
    """Calls `beat()` every HEARTBEAT_S seconds in a daemon thread until `beat()` returns False or stop()."""

    def __init__(self, beat):
        self._beat, self._stop = beat, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tedcache-heartbeat")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._beat():
                    return
            except Exception:  # a store that fails now: the next beat tries again
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class CacheLock:
    """The one writer of a cache. Entering takes the lock, waiting up to `wait` seconds for a live holder and
    taking over an expired one (said in one line); a heartbeat renews it while held. A holder whose renewal
    finds the lock taken stops writing at its next unit (check_lock)."""

    def __init__(self, location: Location, wait: float = 0.0, log=note):
        self.location, self.wait, self.log = location, wait, log
        self.me = _claim()
        self.tag: str | None = None
        self._heartbeat: _Heartbeat | None = None

    def holder(self) -> dict | None:
        """The live holder, or None (no lock, or an expired one)."""
        found = self.location.read_tagged(LOCK)
        claim = _parse(found[0]) if found else {}
        return claim if claim and is_live(claim) else None

    def __enter__(self):
        location = self.location
        if not location.honours_conditions():
            raise TedcacheError(f"the store of {location} does not honour conditional writes (If-None-Match, If-Match; "
                                "tedcache uses them on S3 and S3-compatible stores), so two extractions could write "
                                "this cache at once; pass --no-lock to extract anyway, when nothing else writes to "
                                "this cache")
        deadline, said = time.monotonic() + self.wait, False
        while not self._take():
            held = self.holder()
            if held is None:
                continue  # released or expired a moment ago
            if time.monotonic() >= deadline:
                waited = f" after waiting {self.wait:.0f}s" if self.wait else ""
                raise TedcacheError(f"cache {location} is being written by {describe(held)} since {held['since']}"
                                    f"{waited}; wait longer (--wait SECONDS), or stop that extraction")
            if not said:
                self.log(f"cache {location} is being written by {describe(held)}; waiting up to {self.wait:.0f}s "
                         "for it to finish (--wait)")
                said = True
            time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
        _lost_locks.pop(location.url, None)
        self._heartbeat = _Heartbeat(self._renew)
        return self

    def _take(self) -> bool:
        """Create the lock, or take over an expired one; False while someone else holds it."""
        mine = json.dumps(self.me).encode()
        self.tag = self.location.create_exclusive(LOCK, mine)
        if self.tag is not None:
            return True
        found = self.location.read_tagged(LOCK)
        if found is None:
            return False
        held = _parse(found[0])
        if held and is_live(held):
            return False
        self.tag = self.location.replace_tagged(LOCK, mine, found[1])
        if self.tag is not None and held:
            self.log(f"took over the lock of cache {self.location} from {describe(held)}: its holder is gone")
        return self.tag is not None

    def _renew(self) -> bool:
        self.me["beat"] = time.time()
        tag = self.location.replace_tagged(LOCK, json.dumps(self.me).encode(), self.tag)
        if tag is not None:
            self.tag = tag
            return True
        found = self.location.read_tagged(LOCK)
        _lost_locks[self.location.url] = _parse(found[0]) if found else {}
        return False

    def __exit__(self, *exc) -> None:
        self._heartbeat.stop()
        if self.location.url not in _lost_locks:
            self.location.remove_tagged(LOCK, self.tag)


def check_lock(location: Location) -> None:
    """Raise if this process held the lock of `location` and lost it (its renewal found another holder)."""
    if location.url in _lost_locks:
        taker = _lost_locks[location.url]
        by = f" to {describe(taker)}" if taker else ""
        raise TedcacheError(f"this extraction lost its lock on cache {location}{by} (its heartbeat was not renewed "
                            "in time) and stopped writing; run the same command again to wait for that writer, "
                            "then reuse or resume the cache")


class ReaderLease:
    """A reader's claim on a cache (distill, a tune trial, CacheDataset): `tedcache rm` and `gc` leave a cache
    with a live lease alone. Its heartbeat notices when the lease, and so the cache, was removed anyway."""

    def __init__(self, location: Location, what: str):
        self.location = location
        self.me = _claim(what=what)
        self.rel = f"{READERS}/{self.me['host']}-{self.me['pid']}-{self.me['token'][:8]}.json"
        self._heartbeat: _Heartbeat | None = None

    def __enter__(self):
        """Take the lease; nothing is written where there is no cache (opening it then says what is wrong)."""
        _removed_while_read.discard(self.location.url)
        if self.location.exists("zarr.json"):
            self.location.write_bytes(self.rel, json.dumps(self.me).encode())
            self._heartbeat = _Heartbeat(self._renew)
        return self

    def _renew(self) -> bool:
        if not self.location.exists(self.rel):
            _removed_while_read.add(self.location.url)
            return False
        self.me["beat"] = time.time()
        self.location.write_bytes(self.rel, json.dumps(self.me).encode())
        return True

    def __exit__(self, *exc) -> None:
        if self._heartbeat is None:
            return
        self._heartbeat.stop()
        self._heartbeat = None
        if self.location.exists(self.rel):
            self.location.remove(self.rel)


def readers(location: Location) -> list[dict]:
    """The live reader leases of a cache."""
    found = []
    for name in location.listdir(READERS):
        data = location.read_tagged(f"{READERS}/{name}")
        claim = _parse(data[0]) if data else {}
        if claim and is_live(claim):
            found.append(claim)
    return found


def check_reading(url: str) -> None:
    """Raise (one line) once this process's lease on the cache at `url` has vanished: the cache was removed."""
    if str(url).rstrip("/") in _removed_while_read:
        raise removed_error(str(url).rstrip("/"))


def removed_while_read(location: Location) -> bool:
    """Whether the cache at `location` is gone under this process's reading (its lease vanished, or its
    metadata did)."""
    return location.url in _removed_while_read or not location.exists("zarr.json")


def removed_error(url: str, checkpoint: str | None = None) -> TedcacheError:
    kept = f"; its last checkpoint is kept in {checkpoint}" if checkpoint else ""
    return TedcacheError(f"the cache {url} was removed while this run read it{kept}; build it again (the same "
                         "tedcache extract command), then run the same command to resume")
