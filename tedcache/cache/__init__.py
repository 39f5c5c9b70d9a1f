"""The cache format, in one package: nothing outside it knows zarr paths, encodings or the metadata's
storage. layout (names, chunking, FORMAT_VERSION) -> metadata (typed schema) -> location (local or
fsspec, with exclusive and conditional writes) -> claims (the writer's lock, the readers' leases) ->
codecs (state precisions) and logits (sparse teacher distributions) -> writer (and background, which runs
it beside the computation) -> read (Cache, Split) -> verify -> catalog."""

from .background import BackgroundWriter
from .catalog import collect_garbage, inspect_cache, list_caches, remove_cache
from .claims import CacheLock, ReaderLease
from .codecs import CompactStates, UnitStates, calibrate_channel_scales, decode_values, encode_states
from .layout import FORMAT_VERSION, cache_key, cache_name, pack
from .location import Location
from .metadata import CacheMetadata, UnitRecord, load_metadata
from .read import Cache, Split
from .verify import Problem, repair, verify
from .writer import CacheWriter

__all__ = ["FORMAT_VERSION", "BackgroundWriter", "Cache", "CacheLock", "CacheMetadata", "CacheWriter", "CompactStates",
           "Location", "ReaderLease",
           "Problem", "Split", "UnitRecord", "UnitStates", "cache_key", "cache_name", "calibrate_channel_scales",
           "collect_garbage", "decode_values", "encode_states", "inspect_cache", "list_caches", "load_metadata",
           "pack", "remove_cache", "repair", "verify"]
