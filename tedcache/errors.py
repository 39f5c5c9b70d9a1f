"""The one error type users see (the CLI prints it as a single line and exits non-zero), and status notes."""

import sys


class TedcacheError(Exception):
    """A problem with the user's input, phrased as `what is wrong; how to fix it`."""


def note(message: str) -> None:
    """Progress and status lines go to stderr, so stdout carries only results (e.g. a cache path)."""
    print(message, file=sys.stderr, flush=True)
