"""Caches shared by a team (docs/design.md, "Sharing caches"): one writer per cache on a local disk and on a
real S3-compatible server (moto, directly and through the flaky proxy), locks that expire, and readers that
are not pulled out from under. Real processes throughout; no mock of the store."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
from helpers.caches import assert_same_cache, stored_files
from helpers.commands import MANY_UNITS, assert_one_line_error, extract_args, run_cli
from helpers.object_store import BUCKET, endpoint, flaky_proxy

from tedcache.cache import Location

HEARTBEAT = {"TEDCACHE_HEARTBEAT_S": "0.5"}


def _start(*args, **env) -> subprocess.Popen:
    """`tedcache ARGS` in a process of its own (the test's threads: the cache is compared with one written in
    the test's process, and float sums follow the thread count)."""
    return subprocess.Popen([sys.executable, "-m", "tedcache.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **HEARTBEAT,
                                                                    **env})


def _finish(proc: subprocess.Popen, seconds: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=seconds)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_for(condition, seconds: float = 120, what: str = "") -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def _local_copy(url: str, folder: Path) -> str:
    """An object-store cache copied to a local folder, to compare it file for file."""
    if "://" not in url:
        return url
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"])
    fs.get(url.split("://", 1)[1] + "/", str(folder), recursive=True)
    return str(folder)


def _same_as_clean(url: str, clean: str, folder: Path) -> None:
    """The cache at `url` equals the clean one: metadata, arrays, unit records and every stored file's bytes
    (the lock's and the leases' bookkeeping aside)."""
    copy = _local_copy(url, folder)
    assert_same_cache(copy, clean)
    data = {name: blob for name, blob in stored_files(copy).items() if not name.startswith(".")}
    assert data == {name: blob for name, blob in stored_files(clean).items() if not name.startswith(".")}


@pytest.fixture(scope="module")
def clean(assets, tmp_path_factory) -> tuple[dict, str]:
    """The extraction the tests race or kill (many 64-token units, so that its writer holds the lock a while):
    its arguments less --cache-dir, and the cache an uninterrupted run of them writes in this process."""
    given = {**MANY_UNITS, "stage1_epochs": 1, "eval_data": assets["eval"]}
    result = run_cli(*extract_args(assets, tmp_path_factory.mktemp("clean"), **given))
    assert result.returncode == 0, result.stderr
    return given, result.stdout.strip().splitlines()[-1]


@pytest.mark.process  # (servers)
def test_exclusive_and_conditional_writes_on_disk_and_on_s3(tmp_path, s3_env, monkeypatch):
    """Of two exclusive creates one wins, a replace or remove with a stale tag does nothing (a local disk, the
    S3 server); a store that drops the conditions is found out by the probe."""
    for url in (str(tmp_path / "local"), f"s3://{BUCKET}/primitives"):
        location = Location(url)
        tag = location.create_exclusive("claim", b"first")
        assert tag and location.create_exclusive("claim", b"second") is None
        assert location.read_tagged("claim") == (b"first", tag)
        newer = location.replace_tagged("claim", b"third", tag)
        assert newer not in (None, tag) and location.replace_tagged("claim", b"fourth", tag) is None
        assert not location.remove_tagged("claim", tag) and location.remove_tagged("claim", newer)
        assert location.read_tagged("claim") is None and location.honours_conditions()
    with flaky_proxy(s3_env["FSSPEC_S3_ENDPOINT_URL"], "--share", "0", "--drop-conditions") as (url, _):
        with endpoint(monkeypatch, url):
            assert not Location(f"s3://{BUCKET}/ignored").honours_conditions()


@pytest.mark.process
@pytest.mark.parametrize("store", ["local", "s3", pytest.param("flaky s3", marks=pytest.mark.long)])
def test_two_extractions_of_one_cache_write_it_once(assets, clean, tmp_path, s3_env, monkeypatch, store, fault_log):
    """Two `tedcache extract` processes started together for one cache: one writes it, the other waits and
    reuses it; the cache equals an uninterrupted extraction's, file for file."""
    given, clean_path = clean
    cache_dir = str(tmp_path / "caches") if store == "local" else f"s3://{BUCKET}/race-{store.split()[0]}"
    proxy = flaky_proxy(s3_env["FSSPEC_S3_ENDPOINT_URL"], "--share", "0.1", "--seed", "3")
    with proxy as (url, counts):
        with endpoint(monkeypatch, url if store == "flaky s3" else s3_env["FSSPEC_S3_ENDPOINT_URL"]):
            racers = [_start(*extract_args(assets, cache_dir, **given)) for _ in range(2)]
            results = [_finish(proc) for proc in racers]
        met = counts()
    for result in results:
        assert result.returncode == 0, result.stderr
    paths = {result.stdout.strip().splitlines()[-1] for result in results}
    assert len(paths) == 1 and paths.pop().rsplit("/", 1)[-1] == Path(clean_path).name
    second = [result for result in results if "reusing the cache" in result.stderr]
    assert len(second) == 1, [r.stderr for r in results]
    assert "is being written by pid" in second[0].stderr and "waiting up to" in second[0].stderr
    url = results[0].stdout.strip().splitlines()[-1]
    _same_as_clean(url, clean_path, tmp_path / "copy")
    if store == "flaky s3":
        assert met["slowdown"] + met["internal"] + met["reset"] > 0, met
    fault_log(f"two extractions of one cache started together ({store}"
              + (f", {met['requests']} requests, {met['slowdown'] + met['internal'] + met['reset']} failed" if
                 store == "flaky s3" else "") + "): one wrote it, the other waited and reused it; lost: nothing "
              "(the uninterrupted cache, file for file)")


@pytest.mark.process
def test_a_writer_killed_on_another_host_is_taken_over_after_its_heartbeat_expires(assets, clean, tmp_path, s3_env,
                                                                                    fault_log):
    """An extraction into S3 SIGKILLed mid-way, its lock rewritten to name another host: the next extraction
    waits until the lock's heartbeat has expired, takes it over naming the old holder, and resumes the cache
    to the uninterrupted one."""
    given, clean_path = clean
    cache_dir = f"s3://{BUCKET}/taken-over"
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["FSSPEC_S3_ENDPOINT_URL"])
    proc = _start(*extract_args(assets, cache_dir, **given))
    units = f"{BUCKET}/taken-over/*/units/train/*.json"
    _wait_for(lambda: len(fs.glob(units, refresh=True)) >= 3, what="three written units")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = fs.glob(f"{BUCKET}/taken-over/*/.lock", refresh=True)[0]
    claim = json.loads(fs.cat_file(lock))
    assert claim["host"] == socket.gethostname() and claim["pid"] == proc.pid
    claim.update(host="another-host", heartbeat_s=1.0, beat=time.time())  # it beat a moment ago, elsewhere
    fs.pipe_file(lock, json.dumps(claim).encode())
    started = time.time()
    resumed = _finish(_start(*extract_args(assets, cache_dir, **given)))
    assert resumed.returncode == 0, resumed.stderr
    assert time.time() - started > 3  # it waited out four missed beats of 1 s
    assert f"took over the lock of cache s3://{BUCKET}/taken-over/" in resumed.stderr
    assert f"from pid {proc.pid} on another-host" in resumed.stderr and "resuming: " in resumed.stderr
    _same_as_clean(resumed.stdout.strip().splitlines()[-1], clean_path, tmp_path / "copy")
    fault_log("an extraction into S3 SIGKILLed on \"another host\": its lock taken over once its heartbeat had "
              "expired (old holder named), the cache resumed; lost: nothing (the uninterrupted cache, file for file)")


@pytest.mark.process
def test_a_writer_that_lost_its_lock_stops_in_one_line(assets, tmp_path):
    """A lock renewed by its writer and then taken by someone else (another host, a fresh heartbeat) during Stage
    I: the writer's next renewal notices, and it stops with one line before writing a unit."""
    proc = _start(*extract_args(assets, tmp_path / "caches", **{**MANY_UNITS, "stage1_epochs": 20}),
                  TEDCACHE_HEARTBEAT_S="0.1")
    _wait_for(lambda: any((tmp_path / "caches").glob("*/.lock")), what="the writer's lock")
    lock = next((tmp_path / "caches").glob("*/.lock"))
    lock.write_text(json.dumps({"host": "another-host", "pid": 4242, "token": "theirs", "since": "now",
                                "beat": time.time() + 60, "heartbeat_s": 30}))
    result = _finish(proc)
    assert_one_line_error(result, "lost its lock on cache", "to pid 4242 on another-host", "stopped writing")
    assert lock.exists() and json.loads(lock.read_text())["token"] == "theirs"  # the new holder's lock stays
    assert not any(lock.parent.glob("units/train/*.json"))


@pytest.mark.process
def test_a_store_that_ignores_conditional_writes_is_refused_without_no_lock(assets, tmp_path, s3_env, monkeypatch):
    """Behind a proxy that drops If-None-Match / If-Match, extract refuses in one line naming --no-lock; with
    --no-lock it writes the cache."""
    args = extract_args(assets, f"s3://{BUCKET}/no-conditions", max_length=24, stage1_epochs=0)
    with flaky_proxy(s3_env["FSSPEC_S3_ENDPOINT_URL"], "--share", "0", "--drop-conditions") as (url, _):
        with endpoint(monkeypatch, url):
            refused = run_cli(*args)
            fs = s3fs.S3FileSystem(endpoint_url=url)
            left = fs.find(f"{BUCKET}/no-conditions", refresh=True)
            written = run_cli(*args, "--no-lock")
    assert_one_line_error(refused, "does not honour conditional writes", "--no-lock")
    assert left == []  # the probe object is gone again, and nothing else was written
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip().splitlines()[-1].startswith(f"s3://{BUCKET}/no-conditions/teacher-")


@pytest.mark.process
def test_readers_hold_the_cache_against_rm_and_gc_and_a_forced_rm_ends_the_run_in_one_line(assets, tmp_path,
                                                                                           fault_log):
    """A distill reading a cache holds a lease: `ls` names it, `rm` and `gc` leave the cache alone, `rm --force`
    removes it and the run ends in one line with exit 2, its checkpoint kept."""
    cache_dir = tmp_path / "caches"
    extracted = run_cli(*extract_args(assets, cache_dir, max_length=24, stage1_epochs=0, states="none"))
    cache = extracted.stdout.strip().splitlines()[-1]
    out = tmp_path / "run"
    reader = _start("distill", "--cache", cache, "--student", assets["student"], "--out", out, "--epochs", "1000",
                    "--batch-size", "4", "--checkpoint-every", "2")
    try:
        _wait_for(lambda: any(Path(f"{out}.checkpoint").glob("*")), what="the run's first checkpoint")
        listed = run_cli("ls", "--cache-dir", cache_dir)
        assert f"read by: pid {reader.pid} on {socket.gethostname()} (distill --method kd)" in listed.stdout
        assert_one_line_error(run_cli("rm", cache), "is being read by", f"pid {reader.pid}", "--force")
        meta_file = Path(cache) / "zarr.json"  # an incomplete cache is gc's to collect, unless read
        meta = json.loads(meta_file.read_text())
        meta["attributes"]["tedcache"]["complete"] = False
        meta_file.write_text(json.dumps(meta))
        collected = run_cli("gc", "--cache-dir", cache_dir)
        assert collected.returncode == 0 and collected.stdout == "" and meta_file.exists()
        assert run_cli("rm", "--force", cache).returncode == 0 and not Path(cache).exists()
        result = _finish(reader, 120)
    finally:
        if reader.poll() is None:
            reader.kill()
    assert result.returncode == 2
    assert_one_line_error(result, f"the cache {cache} was removed while this run read it",
                          f"its last checkpoint is kept in {out}.checkpoint")
    assert any(Path(f"{out}.checkpoint").glob("*"))
    fault_log("a cache read by a distill: rm and gc refused (reader named); rm --force removed it and the run "
              "ended in one line, exit 2; lost: the run's steps since its last checkpoint (kept)")
