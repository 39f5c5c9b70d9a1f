"""Checking a cache object by object against its recorded checksums, and forgetting damaged units so
that the extract command recomputes just those."""

from __future__ import annotations

from dataclasses import dataclass

import zarr

from ..errors import TedcacheError
from . import layout
from .location import Location
from .metadata import UnitRecord, load_metadata
from .writer import sha256


@dataclass
class Problem:
    """A missing or corrupt part of a cache; `unit` is (split, unit) when recomputing that unit fixes it."""

    message: str
    unit: tuple[str, int] | None = None

    def __str__(self) -> str:
        return self.message


def verify(url: str) -> list[Problem]:
    """Read every checksummed object of a cache; return one Problem per missing or corrupt one."""
    location = Location(url)
    meta = load_metadata(location)
    problems = []
    if not meta.complete:
        problems.append(Problem("incomplete: the extraction did not finish (re-run it to resume)"))
    expected = {key: (digest, None) for key, digest in meta.checksums.items()}
    for split, units in meta.units.items():
        for unit in range(units):
            rel = layout.unit_record(split, unit)
            if not location.exists(rel):
                problems.append(Problem(f"missing: unit {split}/{unit} (no record {rel})", (split, unit)))
                continue
            try:
                record = UnitRecord.from_bytes(location.read_bytes(rel))
            except (ValueError, TedcacheError):
                problems.append(Problem(f"corrupt: {rel} (unreadable unit record)", (split, unit)))
                continue
            expected.update({key: (digest, (split, unit)) for key, digest in record.checksums.items()})
    for key, (digest, unit) in sorted(expected.items()):
        where = f" (unit {unit[0]}/{unit[1]})" if unit else ""
        if not location.exists(key):
            problems.append(Problem(f"missing: {key}{where}", unit))
        elif sha256(location.read_bytes(key)) != digest:
            problems.append(Problem(f"corrupt: {key}{where} (checksum mismatch)", unit))
    return problems


def repair(url: str, problems: list[Problem]) -> int:
    """Forget the units that failed verification, so that re-running the extract command recomputes just
    those; returns how many. Damage outside the units needs a rebuild (extract --force)."""
    fatal = [p for p in problems if p.unit is None and not p.message.startswith("incomplete")]
    if fatal:
        raise TedcacheError(f"{fatal[0]} is outside the teacher-pass units and cannot be repaired; rebuild "
                            "the cache with the extract command plus --force")
    location = Location(url)
    units = {p.unit for p in problems if p.unit is not None}
    for split, unit in units:
        location.remove(layout.unit_record(split, unit))
    root = zarr.open_group(store=location.zarr_store(read_only=False), mode="r+", zarr_format=3)
    root.attrs["tedcache"] = {**root.attrs["tedcache"], "complete": False}
    return len(units)
