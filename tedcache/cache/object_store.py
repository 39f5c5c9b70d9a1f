"""Requests to an object store (s3://): how they are retried, how many were, and a store that keeps failing
said in one line.

Retrying is botocore's "standard" mode: a request that meets a throttle (503 SlowDown), a server error, a
reset connection or a timeout is sent again after a random wait of up to 1, 2, 4, ... seconds (capped at 20),
at most MAX_ATTEMPTS times in all. The usual AWS_RETRY_MODE and AWS_MAX_ATTEMPTS variables, or `retries` in
fsspec's s3 `config_kwargs`, override these defaults."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import fsspec.config

from ..errors import TedcacheError

MAX_ATTEMPTS = 10
OBJECT_STORES = ("s3", "s3a")


def storage_options(protocol: str) -> dict:
    """fsspec options for a filesystem of `protocol`: the retry defaults above for S3, the user's own fsspec
    settings kept."""
    if protocol not in OBJECT_STORES:
        return {}
    config = dict(fsspec.config.conf.get(protocol, {}).get("config_kwargs", {}))
    retries = dict(config.get("retries", {}))
    if "AWS_RETRY_MODE" not in os.environ:
        retries.setdefault("mode", "standard")
    if "AWS_MAX_ATTEMPTS" not in os.environ and "max_attempts" not in retries:
        retries.setdefault("total_max_attempts", MAX_ATTEMPTS)
    config["retries"] = retries
    return {"config_kwargs": config}


class _RetryCounter(logging.Filter):
    """Counts the retries botocore makes, from the debug record it writes before each wait (botocore has no
    counter one can read). Records the user did not ask for are dropped here, not printed."""

    MESSAGE = "Response received to retry"

    def __init__(self, logger: logging.Logger):
        super().__init__()
        self.count = 0
        self.shown_from = logger.getEffectiveLevel()
        logger.setLevel(logging.DEBUG)
        logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.MESSAGE):
            self.count += 1
        return record.levelno >= self.shown_from


_counter: _RetryCounter | None = None


def count_retries() -> None:
    """Count this process's retried requests from zero (each extract or distill reports its own)."""
    global _counter
    if _counter is None:
        _counter = _RetryCounter(logging.getLogger("botocore.endpoint"))
    _counter.count = 0


def retried_requests() -> int:
    """How many requests to an object store this process (and the writer processes it folded in with
    `add_retried`) has sent again since counting started."""
    return _counter.count if _counter is not None else 0


def add_retried(count: int) -> None:
    """Fold in the retries a child process counted (the cache writer's)."""
    if _counter is not None:
        _counter.count += count


def is_store_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) came from the object store's client: botocore's errors, and the
    OSErrors s3fs makes of them."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # (no S3 client installed: no store to fail)
        return False
    while exc is not None:
        if isinstance(exc, (BotoCoreError, ClientError)):
            return True
        exc = exc.__cause__
    return False


@contextmanager
def store_errors(url: str):
    """Say an object store that kept failing as one line naming `url` and the last error."""
    try:
        yield
    except Exception as exc:
        if not is_store_error(exc):
            raise
        raise store_failure(url, f"{type(exc).__name__}: {str(exc).strip()}") from exc


def store_failure(url: str, last_error: str) -> TedcacheError:
    """The one line for an object store that kept failing at `url`."""
    last_error = last_error.splitlines()[0] if last_error else "no detail"
    return TedcacheError(f"the object store failed for {url}: {last_error} ({retried_requests()} requests "
                         "retried in all); check the bucket, the credentials and the endpoint (AWS_ENDPOINT_URL / "
                         "FSSPEC_S3_ENDPOINT_URL), then run the same command to resume")
