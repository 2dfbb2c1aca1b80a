"""A run directory belongs to one run: the lock file ``<run>/run.lock`` and who may hold it.

The lock is a JSON file created exclusively (``O_EXCL``) by process 0 of a launch before the
slow start-up (before ``jax.distributed.initialize`` where process 0 knows its index then). It
names its holder: launch token, host, pid namespace, pid, start time, state (``starting`` until
every process has joined, then ``running``). Process 0 touches the file every `HEARTBEAT_S`
seconds while the run lives, so its mtime is the holder's heartbeat.

**Liveness across hosts.** A holder on this host (same host name and pid namespace) is alive
while its pid is; a holder on another host is alive while its heartbeat is younger than
`STALE_AFTER_S`. A lock whose holder is not alive was left by a killed run: the next launch
takes it over and says so.

**The processes of one launch** recognise each other by the launch token
(`launch_token`): ``GRADUAL_JAX_LAUNCH_ID`` when set (``launch/tpu_pod.sh`` sets one per run),
else SLURM's job and step id. A process other than 0 checks the lock before joining the job:
a live lock of another token refuses at once, so a second launch never connects to the first
one's coordinator. Without a token, a process other than 0 refuses a live lock of another
coordinator address, or one whose holder has reached ``running`` (every process of that launch
has joined already), and goes on past a ``starting`` one of its own coordinator address, which
may be its own launch's: two launches with one coordinator address and no token can meet only
within the first one's start-up.

**Shared storage.** After the job is joined, process 0 writes the job's token into the lock and
every other process reads it back (`confirm`); a process that cannot see it refuses the run
for every process, since the run directory must be storage all of them share.

Refusals are `RunDirBusy` / `RunDirNotShared` (UserError: one line, exit 2).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradual_jax import io
from gradual_jax.errors import UserError

log = logging.getLogger("gradual_jax")

LOCK_FILE = "run.lock"
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0


class RunDirBusy(UserError):
    """The run directory is held by another live run."""


class RunDirNotShared(UserError):
    """A process of the job cannot see the run directory process 0 writes."""


def launch_token() -> str | None:
    """The token the processes of one launch share, from the environment (None if unset)."""
    explicit = os.environ.get("GRADUAL_JAX_LAUNCH_ID")
    if explicit:
        return explicit
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}.{os.environ.get('SLURM_STEP_ID', '0')}"
    return None


def cluster_detected() -> bool:
    """True when the environment names a multi-process job (SLURM with >1 task, a TPU pod)."""
    if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def pre_init_process_id(enabled: bool, process_id: int | None) -> int | None:
    """This process's index as known before `jax.distributed.initialize`: 0 for a
    single-process run (``enabled`` false and no cluster in the environment), else
    ``process_id`` or SLURM's ``SLURM_PROCID``; None when only JAX's cluster detection will
    tell (a TPU pod's metadata)."""
    if not (enabled or cluster_detected()):
        return 0
    if process_id is not None:
        return process_id
    procid = os.environ.get("SLURM_PROCID", "")
    return int(procid) if procid.isdigit() else None


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def this_host() -> dict[str, Any]:
    """This process's identity as liveness checks read it: host name, pid namespace, pid."""
    return {"host": socket.gethostname(), "pid_ns": _pid_namespace(), "pid": os.getpid()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_alive(owner: dict[str, Any], heartbeat_mtime: float, *, now: float | None = None) -> bool:
    """Whether the process ``owner`` describes (`this_host` fields) still runs: by its pid when
    it ran on this host and pid namespace, else by its heartbeat (file mtime) being younger
    than `STALE_AFTER_S`."""
    me = this_host()
    if owner.get("host") == me["host"] and owner.get("pid_ns") == me["pid_ns"] and owner.get("pid"):
        return _pid_alive(int(owner["pid"]))
    age = (time.time() if now is None else now) - heartbeat_mtime
    return age < STALE_AFTER_S


def describe(owner: dict[str, Any], heartbeat_mtime: float | None = None) -> str:
    """One phrase naming a holder: host, pid, launch token, start and heartbeat age."""
    parts = [f"host {owner.get('host', '?')}", f"pid {owner.get('pid', '?')}"]
    if owner.get("token"):
        parts.append(f"launch {owner['token']}")
    if owner.get("started"):
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["started"])))
    if heartbeat_mtime is not None:
        parts.append(f"heartbeat {max(0.0, time.time() - heartbeat_mtime):.0f} s ago")
    return ", ".join(parts)


class Heartbeat:
    """A daemon thread touching ``path`` every ``interval`` seconds until `stop`."""

    def __init__(self, path: Path, interval: float = HEARTBEAT_S):
        self.path, self.interval = Path(path), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="gradual_jax-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.path)
            except OSError:
                return  # the file went away (released or taken over): nothing left to keep alive

    def stop(self) -> None:
        self._stop.set()


class RunLock:
    """The lock of run directory ``root`` as one process of a launch sees it.

    Process 0 calls `acquire` (before or after joining the job), every other process `check`
    before joining it; once joined, every process calls `confirm` (a collective). Process 0
    calls `release` when the run ends, however it ends.
    """

    def __init__(self, root: str | os.PathLike, token: str | None = None, *,
                 coordinator: str | None = None):
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
        self.token = token or launch_token()
        self.coordinator = coordinator
        self.held = False
        self._created = False
        self._heartbeat: Heartbeat | None = None

    def read(self) -> tuple[dict[str, Any], float] | None:
        """(holder, heartbeat mtime) of the lock on disk, None when there is none. A lock
        being written (empty or cut) reads as a holder with no fields."""
        try:
            mtime = self.path.stat().st_mtime
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(text)
        except json.JSONDecodeError:
            owner = {}
        return (owner if isinstance(owner, dict) else {}), mtime

    def acquire(self) -> None:
        """Take the lock for this launch: create it, take over a stale one (logged), or raise
        RunDirBusy naming the live holder. Starts the heartbeat."""
        if self.held:
            return
        if self.token is None:
            self.token = f"local-{uuid.uuid4().hex[:12]}"
        self._created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            record = {**this_host(), "token": self.token, "started": time.time(), "state": "starting",
                      "coordinator": self.coordinator}
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._deal_with_holder()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f)
            self.held = True
            self._heartbeat = Heartbeat(self.path)
            return
        raise RunDirBusy(f"run directory {self.root}: could not take {self.path} (it keeps changing)")

    def _deal_with_holder(self) -> None:
        found = self.read()
        if found is None:
            return
        owner, mtime = found
        if not owner:  # being written right now: alive unless it stays empty
            if time.time() - mtime < 5.0:
                time.sleep(0.2)
                return
        elif owner.get("token") == self.token and owner.get("pid") == os.getpid():
            return self._take_over(owner, mtime, quiet=True)
        elif holder_alive(owner, mtime):
            raise RunDirBusy(f"run directory {self.root} is in use by another run ({describe(owner, mtime)}); "
                             f"wait for it to end, or give this run another name (name=...)")
        self._take_over(owner, mtime)

    def _take_over(self, owner: dict[str, Any], mtime: float, *, quiet: bool = False) -> None:
        """Move the stale lock aside (one contender wins the rename) and delete it."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another launch moved it first; try to create it again
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            moved = {}
        same = lambda key: moved.get(key) == owner.get(key)  # noqa: E731
        if not (same("token") and same("pid") and same("started")):
            # Another launch took the stale lock over between our read and our rename: its
            # fresh lock goes back (unless a third one is already there) and we look again.
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        if not quiet:
            log.warning("run directory %s: taking over the lock of a run that no longer runs (%s)",
                        self.root, describe(owner, mtime) if owner else "unreadable lock")
            print(f"note: run directory {self.root}: the run that held it ({describe(owner, mtime)}) "
                  "no longer runs; taking it over", flush=True)

    def check(self) -> None:
        """For a process other than 0, before joining the job: raise RunDirBusy when a live
        lock belongs to another launch (see the module docstring); otherwise return."""
        found = self.read()
        if found is None:
            return
        owner, mtime = found
        if not owner or not holder_alive(owner, mtime):
            return  # being written, or stale: process 0 decides
        if self.token is not None:
            if owner.get("token") == self.token:
                return
        elif owner.get("state") != "running" and owner.get("coordinator") == self.coordinator:
            return
        raise RunDirBusy(f"run directory {self.root} is in use by another run ({describe(owner, mtime)}); "
                         f"wait for it to end, or give this run another name (name=...)")

    def confirm(self, process_index: int, process_count: int) -> None:
        """Once every process has joined (a collective): process 0 records the job's token and
        ``running``; every other process must read that token back from the run directory, or
        every process raises RunDirNotShared."""
        from gradual_jax import distributed

        token = distributed.broadcast_json(self.token if process_index == 0 else None)
        if process_index == 0:
            found = self.read()
            record = {**(found[0] if found else this_host()), "token": token, "state": "running",
                      "processes": process_count}
            io.write_json(self.path, record)
        distributed.barrier("run-dir-lock")
        ok, detail = True, ""
        if process_index != 0:
            found = self.read()
            ok = found is not None and found[0].get("token") == token
            detail = f"process {process_index} on host {socket.gethostname()}"
            self.token = token
        results = distributed.all_ok(ok, detail)
        blind = [r["detail"] for r in results if not r["ok"]]
        if blind:
            raise RunDirNotShared(
                f"run directory {self.root} is not storage every process sees: {', '.join(blind)} "
                f"cannot read the {LOCK_FILE} process 0 wrote there; put run_dir on a filesystem "
                "all hosts mount at the same path")

    def release(self) -> None:
        """Stop the heartbeat and delete the lock if this launch still holds it."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if not self.held:
            return
        self.held = False
        found = self.read()
        if found is not None and found[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)
        if self._created:  # a run refused before it wrote anything leaves no directory behind
            try:
                self.root.rmdir()
            except OSError:
                pass


def lock_named_by(config: Path, overrides: Sequence[str]) -> tuple[RunLock, int | None] | None:
    """(the lock, this process's index as known before joining) of the run directory a launch
    command names: ``name`` and ``run_dir`` (and ``distributed.*``) read from the YAML file
    ``config`` and the ``key=value`` ``overrides``, without importing the package's config
    (so without JAX). None when the file cannot be read or does not name both."""
    import yaml

    try:
        data = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    dist = data.get("distributed") if isinstance(data.get("distributed"), dict) else {}
    keys = {"name": data.get("name"), "run_dir": data.get("run_dir"),
            "distributed.coordinator_address": dist.get("coordinator_address"),
            "distributed.enabled": dist.get("enabled", False), "distributed.process_id": dist.get("process_id")}
    for arg in overrides:
        key, _, value = arg.partition("=")
        if key in keys:
            try:
                keys[key] = yaml.safe_load(value) if key.startswith("distributed.") else value
            except yaml.YAMLError:
                return None
    if not keys["name"] or not keys["run_dir"]:
        return None
    coordinator = keys["distributed.coordinator_address"] or os.environ.get("JAX_COORDINATOR_ADDRESS")
    lock = RunLock(Path(str(keys["run_dir"])) / str(keys["name"]), coordinator=str(coordinator) if coordinator else None)
    pid = keys["distributed.process_id"]
    return lock, pre_init_process_id(bool(keys["distributed.enabled"]), pid if isinstance(pid, int) else None)
