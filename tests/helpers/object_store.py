"""A real S3-compatible server (moto) on loopback, and tests/flaky_store.py in front of it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import fsspec.config
import s3fs

BUCKET = "tedcache-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*command, port: int) -> subprocess.Popen:
    """A server process, returned once it accepts connections on `port`."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            assert time.time() < deadline and server.poll() is None, f"{command} did not start"
            time.sleep(0.2)


@contextlib.contextmanager
def s3_server():
    """A moto server with BUCKET, its endpoint and credentials set for this process and its children; yields
    those environment variables."""
    port = free_port()
    server = start_server(sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port), port=port)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"]).mkdir(BUCKET)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # for the CLI subprocesses (fsspec reads FSSPEC_S3_* when it is imported)
        fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = env["FSSPEC_S3_ENDPOINT_URL"]  # this process
        yield env
        fsspec.config.conf["s3"].pop("endpoint_url")
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    finally:
        server.terminate()
        server.wait()


@contextlib.contextmanager
def flaky_proxy(upstream: str, *flags):
    """tests/flaky_store.py in front of `upstream`; yields (its URL, a function returning its counts)."""
    port = free_port()
    script = Path(__file__).resolve().parent.parent / "flaky_store.py"
    server = start_server(sys.executable, str(script), "--upstream", upstream, "--port", str(port), *flags, port=port)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, lambda: Counter(json.loads(urllib.request.urlopen(f"{url}/_flaky/counts").read()))
    finally:
        server.terminate()
        server.wait()


@contextlib.contextmanager
def endpoint(monkeypatch, url: str):
    """Point this process and the commands' processes at the store endpoint `url` for the block."""
    previous = fsspec.config.conf["s3"]["endpoint_url"]
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", url)
    monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", url)
    try:
        yield
    finally:
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", previous)
        monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", previous)
