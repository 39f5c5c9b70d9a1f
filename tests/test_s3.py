"""Caches on an S3-compatible object store: a real moto server on loopback, the real s3fs client."""

import json
import re

import fsspec.config
import numpy as np
import pytest
import s3fs
from helpers.commands import run_cli, run_cli_process
from helpers.object_store import BUCKET, flaky_proxy, free_port

from tedcache.cache import Cache, object_store
from tedcache.errors import TedcacheError


def _retried(stderr: str) -> int:
    found = re.findall(r"; (\d+) object-store requests retried", stderr)
    assert found, stderr
    return int(found[-1])


SHORT_DISTILL = ["--epochs", "1", "--batch-size", "16", "--seed", "3", "--method", "ted"]


@pytest.mark.process
def test_extract_reuse_verify_ls_and_distill_through_a_flaky_store(assets, tmp_path, s3_env, monkeypatch, fault_log):
    """A seeded tenth of the requests to the store meet a 503 SlowDown, a 500, a reset after the server
    acted, or a slow answer: extract, verify, ls and distill retry, and the cache and the run equal the clean
    local ones."""
    args = ["extract", "--teacher", assets["teacher"], "--data", assets["train"], "--eval-data", assets["eval"],
            "--max-length", "24", "--stage1-epochs", "0.5", "--shard-tokens", "512"]
    local = run_cli_process(*args, "--cache-dir", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    local_path = local.stdout.strip().splitlines()[-1]
    clean = run_cli_process("distill", "--cache", local_path, "--student", assets["student"], "--out",
                            tmp_path / "clean", *SHORT_DISTILL)
    assert clean.returncode == 0, clean.stderr

    with flaky_proxy(s3_env["FSSPEC_S3_ENDPOINT_URL"], "--share", "0.1", "--seed", "7") as (endpoint, counts):
        monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", endpoint)  # the commands' processes
        monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", endpoint)  # this one
        remote = run_cli_process(*args, "--cache-dir", f"s3://{BUCKET}/caches")
        assert remote.returncode == 0, remote.stderr
        url = remote.stdout.strip().splitlines()[-1]
        assert url.startswith(f"s3://{BUCKET}/caches/teacher-")
        assert url.rsplit("/", 1)[-1] == local_path.rsplit("/", 1)[-1]  # same inputs, same name
        again = run_cli(*args, "--cache-dir", f"s3://{BUCKET}/caches")
        assert again.stdout.strip().splitlines()[-1] == url and "reusing" in again.stderr, again.stderr
        checked = run_cli("verify", url)
        assert checked.returncode == 0 and checked.stdout.startswith("ok"), checked.stdout + checked.stderr
        listed = run_cli("ls", "--cache-dir", f"s3://{BUCKET}/caches")
        assert listed.returncode == 0 and url in listed.stdout and "complete" in listed.stdout
        flaky = run_cli_process("distill", "--cache", url, "--student", assets["student"], "--out",
                                tmp_path / "flaky", *SHORT_DISTILL)
        assert flaky.returncode == 0, flaky.stderr
        met = counts()
    monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", s3_env["FSSPEC_S3_ENDPOINT_URL"])
    retried = _retried(remote.stderr) + _retried(flaky.stderr)
    failed = met["slowdown"] + met["internal"] + met["reset"]
    assert failed > 0 and met["slow"] > 0, met
    assert 0 < retried <= failed, (retried, met)  # every retry answers a failure (a few are resent below botocore)

    remote_cache, local_cache = Cache(url), Cache(local_path)
    for layer in local_cache.layers:
        for got, want in zip(remote_cache.split("train").states(layer, 0, 1 << 20),
                             local_cache.split("train").states(layer, 0, 1 << 20)):
            assert np.array_equal(got, want)
    for split in ("train", "eval"):
        assert np.array_equal(remote_cache.split(split).teacher_logits, local_cache.split(split).teacher_logits)
    got, want = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("flaky", "clean"))
    assert got["history"] == want["history"] and got["best"] == want["best"]
    fault_log(f"an object store failing {failed / met['requests']:.0%} of {met['requests']} requests "
              f"({met['slowdown']} SlowDown, {met['internal']} 500, {met['reset']} resets, plus {met['slow']} slow "
              f"answers; seeded): extract and distill retried {retried} requests; lost: nothing (the clean cache "
              "array for array, the clean run's losses and scores)")


@pytest.mark.process  # (servers)
def test_a_store_that_keeps_failing_ends_in_one_line(assets, tmp_path, s3_env, monkeypatch, fault_log):
    """A missing bucket, denied access and a store that is gone: one line naming the URL and the last error,
    after a bounded number of attempts."""
    args = ["extract", "--teacher", assets["teacher"], "--data", assets["train"], "--max-length", "24",
            "--stage1-epochs", "0"]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    outcomes = {"a missing bucket": run_cli("distill", "--cache", "s3://no-such-bucket/caches/teacher-x",
                                            "--student", assets["student"], "--out", tmp_path / "run"),
                "a misspelt bucket": run_cli(*args, "--cache-dir", "s3://no-such-bucket/caches")}
    with flaky_proxy(s3_env["FSSPEC_S3_ENDPOINT_URL"], "--deny") as (endpoint, counts):
        monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", endpoint)
        outcomes["denied access"] = run_cli(*args, "--cache-dir", f"s3://{BUCKET}/denied")
        denied = counts()
    monkeypatch.setitem(fsspec.config.conf["s3"], "endpoint_url", f"http://127.0.0.1:{free_port()}")  # no one there
    outcomes["a store that is gone"] = run_cli(*args, "--cache-dir", f"s3://{BUCKET}/gone")
    outcomes["a store that is gone, for distill"] = run_cli("distill", "--cache", f"s3://{BUCKET}/gone/teacher-x",
                                                            "--student", assets["student"], "--out", tmp_path / "run")
    for what, outcome in outcomes.items():
        lines = outcome.stderr.strip().splitlines()
        assert outcome.returncode == 2 and lines[-1].startswith("error: "), (what, outcome.stderr)
        assert "Traceback" not in outcome.stderr, (what, outcome.stderr)
    assert "cache s3://no-such-bucket/caches/teacher-x does not exist" in outcomes["a missing bucket"].stderr
    assert "bucket no-such-bucket of s3://no-such-bucket/caches/teacher-" in outcomes["a misspelt bucket"].stderr
    assert not s3fs.S3FileSystem(endpoint_url=s3_env["FSSPEC_S3_ENDPOINT_URL"]).exists("no-such-bucket")
    last = outcomes["denied access"].stderr.splitlines()[-1]
    assert f"s3://{BUCKET}/denied/teacher-" in last and "PermissionError: Forbidden" in last, last
    assert denied["retries"] == 0 and denied["denied"] > 0, denied  # a refusal is not retried
    for what, url in (("a store that is gone", f"s3://{BUCKET}/gone/teacher-"),
                      ("a store that is gone, for distill", f"s3://{BUCKET}/gone/teacher-x")):
        last = outcomes[what].stderr.splitlines()[-1]
        assert url in last and "Could not connect" in last and "(2 requests retried in all)" in last, last
    fault_log("an object store that keeps failing (a missing bucket for extract and for distill, every request "
              "denied, nothing listening with AWS_MAX_ATTEMPTS=3): one line each naming the URL and the last "
              "error, after 2 retries where retrying could help and none where it could not; lost: nothing")


def test_retry_settings_default_to_bounded_standard_retries_and_yield_to_the_user_s(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    assert object_store.storage_options("file") == {}
    assert object_store.storage_options("s3") == {
        "config_kwargs": {"retries": {"mode": "standard", "total_max_attempts": object_store.MAX_ATTEMPTS}}}
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"retries": {"max_attempts": 4},
                                                                     "read_timeout": 5}})
    assert object_store.storage_options("s3") == {
        "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 4}, "read_timeout": 5}}
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert object_store.storage_options("s3") == {"config_kwargs": {"retries": {}}}


def test_only_the_store_client_s_errors_are_said_as_the_store_s():
    from botocore.exceptions import ClientError, EndpointConnectionError

    refused = ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "PutObject")
    translated = PermissionError("Access Denied")
    translated.__cause__ = refused
    assert object_store.is_store_error(translated) and object_store.is_store_error(refused)
    assert object_store.is_store_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not object_store.is_store_error(PermissionError("a local folder"))
    with pytest.raises(TedcacheError, match=r"^the object store failed for s3://b/c: PermissionError: Access Denied"):
        with object_store.store_errors("s3://b/c"):
            raise translated
    with pytest.raises(PermissionError, match="a local folder"):
        with object_store.store_errors("s3://b/c"):
            raise PermissionError("a local folder")
