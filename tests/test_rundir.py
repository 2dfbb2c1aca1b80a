"""The run directory's lock (gradual_jax.rundir) and the world cache's stale builds: liveness by
host, pid namespace and heartbeat, stale locks taken over, live ones refused with their holder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from gradual_jax import rundir
from gradual_jax.rundir import RunDirBusy, RunLock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(root, **owner) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / rundir.LOCK_FILE).write_text(json.dumps(owner))


def test_lock_refuses_a_second_holder_and_is_released(tmp_path):
    first = RunLock(tmp_path / "run", token="launch-a")
    first.acquire()
    held = json.loads((tmp_path / "run" / rundir.LOCK_FILE).read_text())
    assert held["token"] == "launch-a" and held["pid"] == os.getpid() and held["state"] == "starting"
    with pytest.raises(RunDirBusy, match=r"in use by another run \(host .*pid %d, launch launch-a" % os.getpid()):
        RunLock(tmp_path / "run", token="launch-b").acquire()
    with pytest.raises(RunDirBusy, match="launch launch-a"):
        RunLock(tmp_path / "run", token="launch-b").check()
    RunLock(tmp_path / "run", token="launch-a").check()  # a peer of the same launch goes on
    first.release()
    assert not (tmp_path / "run" / rundir.LOCK_FILE).exists()
    second = RunLock(tmp_path / "run", token="launch-b")
    second.acquire()
    second.release()


def test_stale_lock_of_a_dead_local_process_is_taken_over(tmp_path, capsys):
    me = rundir.this_host()
    _write_lock(tmp_path, **{**me, "pid": _dead_pid(), "token": "old", "state": "running"})
    RunLock(tmp_path, token="old-peer").check()  # stale: a peer leaves it to process 0
    lock = RunLock(tmp_path, token="new")
    lock.acquire()
    assert "no longer runs; taking it over" in capsys.readouterr().out
    assert json.loads((tmp_path / rundir.LOCK_FILE).read_text())["token"] == "new"
    lock.release()


def test_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path):
    owner = {"host": "elsewhere", "pid_ns": "1", "pid": os.getpid(), "token": "remote", "state": "running"}
    _write_lock(tmp_path, **owner)
    with pytest.raises(RunDirBusy, match="host elsewhere"):
        RunLock(tmp_path, token="mine").acquire()
    old = time.time() - rundir.STALE_AFTER_S - 5
    os.utime(tmp_path / rundir.LOCK_FILE, (old, old))  # the remote holder stopped beating
    lock = RunLock(tmp_path, token="mine")
    lock.acquire()
    lock.release()


def test_peer_without_token_refuses_only_a_running_launch(tmp_path, monkeypatch):
    for var in ("GRADUAL_JAX_LAUNCH_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    me = rundir.this_host()
    _write_lock(tmp_path, **{**me, "token": "local-x", "state": "starting", "coordinator": "h:1"})
    RunLock(tmp_path, coordinator="h:1").check()  # maybe its own launch's process 0, still joining
    with pytest.raises(RunDirBusy):  # another launch's: it connects elsewhere
        RunLock(tmp_path, coordinator="h:2").check()
    _write_lock(tmp_path, **{**me, "token": "local-x", "state": "running", "coordinator": "h:1"})
    with pytest.raises(RunDirBusy):  # every process of that launch has joined already
        RunLock(tmp_path, coordinator="h:1").check()


def test_launch_token_from_the_environment(monkeypatch):
    monkeypatch.delenv("GRADUAL_JAX_LAUNCH_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert rundir.launch_token() == "slurm-77.3"
    monkeypatch.setenv("GRADUAL_JAX_LAUNCH_ID", "given")
    assert rundir.launch_token() == "given"


def test_heartbeat_keeps_the_lock_fresh(tmp_path):
    path = tmp_path / "beat"
    path.write_text("")
    old = time.time() - 100
    os.utime(path, (old, old))
    beat = rundir.Heartbeat(path, interval=0.05)
    time.sleep(0.3)
    beat.stop()
    assert time.time() - path.stat().st_mtime < 5


def test_world_cache_removes_only_builds_whose_builder_is_gone(tmp_path):
    from gradual_jax.world.cache import _owner_file, _remove_stale_tmp

    final = tmp_path / "abc"
    builds = {name: tmp_path / f".tmp-abc-{name}" for name in ("remote_live", "remote_dead", "local_dead", "local_live")}
    owners = {"remote_live": {"host": "elsewhere", "pid_ns": "1", "pid": 1},
              "remote_dead": {"host": "elsewhere", "pid_ns": "1", "pid": 1},
              "local_dead": {**rundir.this_host(), "pid": _dead_pid()},
              "local_live": rundir.this_host()}
    for name, tmp in builds.items():
        tmp.mkdir()
        _owner_file(tmp).write_text(json.dumps(owners[name]))
    old = time.time() - rundir.STALE_AFTER_S - 5
    os.utime(_owner_file(builds["remote_dead"]), (old, old))
    _remove_stale_tmp(final)
    assert {n for n, p in builds.items() if p.exists()} == {"remote_live", "local_live"}
