"""Caches on an S3-compatible object store: a real moto server on loopback, the real s3fs client."""

import os
import socket
import subprocess
import sys
import time

import fsspec.config
import numpy as np
import pytest
from conftest import run_cli_process as run_cli

from tedcache.cache import Cache

BUCKET = "tedcache-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.time() < deadline, "moto server did not start"
                time.sleep(0.2)
        import s3fs

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


@pytest.mark.process
def test_extract_verify_ls_distill_on_s3(assets, tmp_path, s3_env):
    args = ["extract", "--teacher", assets["teacher"], "--data", assets["train"], "--eval-data", assets["eval"],
            "--max-length", "24", "--stage1-epochs", "0.5", "--shard-tokens", "256"]
    remote = run_cli(*args, "--cache-dir", f"s3://{BUCKET}/caches")
    assert remote.returncode == 0, remote.stderr
    url = remote.stdout.strip().splitlines()[-1]
    assert url.startswith(f"s3://{BUCKET}/caches/teacher-")
    again = run_cli(*args, "--cache-dir", f"s3://{BUCKET}/caches")
    assert again.stdout.strip().splitlines()[-1] == url and "reusing" in again.stderr

    checked = run_cli("verify", url)
    assert checked.returncode == 0 and checked.stdout.startswith("ok"), checked.stdout + checked.stderr
    listed = run_cli("ls", "--cache-dir", f"s3://{BUCKET}/caches")
    assert listed.returncode == 0 and url in listed.stdout and "complete" in listed.stdout
    trained = run_cli("distill", "--cache", url, "--student", assets["student"], "--out", tmp_path / "run",
                      "--epochs", "1", "--batch-size", "16", "--verify")
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "run" / "metrics.json").exists()

    local = run_cli(*args, "--cache-dir", tmp_path / "local")
    local_path = local.stdout.strip().splitlines()[-1]
    assert local_path.rsplit("/", 1)[-1] == url.rsplit("/", 1)[-1]  # same inputs, same name
    remote_cache, local_cache = Cache(url), Cache(local_path)
    for layer in local_cache.layers:
        for got, want in zip(remote_cache.split("train").states(layer, 0, 1 << 20),
                             local_cache.split("train").states(layer, 0, 1 << 20)):
            assert np.array_equal(got, want)
    assert np.array_equal(remote_cache.split("eval").teacher_logits, local_cache.split("eval").teacher_logits)
