"""The smoke run (one seed, two arms, fsdp over all 8 devices) as two processes on 127.0.0.1
(gloo, 4 CPU devices each) in one shared run directory, against the same run as one process
with 8 devices.

One two-process run serves most checks: it is killed (SIGKILL, both processes) once a stage
checkpoint and probe lines exist, and restarted with the same commands; a second launch into
the same directory starts 2 s after the restart and must refuse. The restarted run must not
redo what was done and must end with the one-process run's report. Copies of the killed run's
directory serve the failure checks: an error injected mid-stage (while an asynchronous
checkpoint save is in flight) ends both processes within 10 s of the error line, and SIGKILL of
one process ends the other within 60 s.

The tests spawn this file as the worker (`python tests/test_multiprocess_run.py MODE WRITES
ARGS...`): MODE ``run`` is ``python -m gradual_jax.launch ARGS``; ``fail`` also makes the
first checkpoint save of the run raise right after it started. Every worker records the files
it writes (Python's audit events: opens for writing, renames, removals) to WRITES.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from older_scoring import mark_as_gold_scoring_1  # noqa: E402
from report_equality import assert_same  # noqa: E402

SMOKE = str(REPO / "configs" / "smoke.yaml")
SMALL = ["seeds=[0]", "arms=[two_stage,one_stage]", "noise_control=false", "mesh.data=1", "mesh.fsdp=8"]
TIMING = {"wall_seconds", "config", "invocation_seconds", "runtime"}
RUN = "smoke"
STEP_DIR = re.compile(r"^\d+$")


# ----------------------------------------------------------------------------- the worker


def _record_writes(path: str) -> None:
    """Append every file this process opens for writing, renames onto, or removes to ``path``
    (one JSON line per event, written with os.write so the hook does not see itself)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event: str, args: tuple) -> None:
        target = None
        if event == "open" and len(args) >= 3:
            file, mode, flags = args[0], args[1], args[2]
            if isinstance(file, (str, bytes, os.PathLike)) and (
                    (isinstance(mode, str) and any(c in mode for c in "wax+"))
                    or (isinstance(flags, int) and flags & writing)):
                target = file
        elif event in ("os.rename", "os.replace"):
            target = args[1]
        elif event in ("os.remove", "os.unlink"):
            target = args[0]
        if target is not None:
            exclusive = event == "open" and isinstance(args[2], int) and bool(args[2] & os.O_EXCL)
            os.write(fd, (json.dumps({"event": event, "path": os.fsdecode(target),
                                      "exclusive": exclusive}) + "\n").encode())

    sys.addaudithook(hook)


def _worker(mode: str, writes: str, args: list[str]) -> None:
    _record_writes(writes)
    from gradual_jax import launch

    if mode == "fail":
        from gradual_jax.checkpoint import CheckpointManager

        save = CheckpointManager.save

        def save_then_fail(self, step, state, meta):
            save(self, step, state, meta)  # an asynchronous save is now in flight
            raise RuntimeError(f"injected failure after starting the save of step {step}")

        CheckpointManager.save = save_then_fail
    launch.exit_process(launch.main(args))


# ----------------------------------------------------------------------------- launching


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONUNBUFFERED="1")
    for var in ("SLURM_NTASKS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES", "JAX_COORDINATOR_ADDRESS",
                "GRADUAL_JAX_LAUNCH_ID"):
        env.pop(var, None)
    return env


class Launch:
    """Two worker processes of one launch (``-vv``: each logs which questions it probed);
    ``run_dirs`` gives each its own run_dir (default: ``run_dir`` for both)."""

    def __init__(self, run_dir: Path, logs: Path, tag: str, *, mode: str = "run", port: int | None = None,
                 extra: tuple[str, ...] = (), run_dirs: tuple[Path, Path] | None = None):
        from process_group import free_port

        port = port or free_port()
        self.logs = [logs / f"{tag}.p{i}.log" for i in range(2)]
        self.writes = [logs / f"{tag}.p{i}.writes" for i in range(2)]
        self.procs = []
        for i in range(2):
            args = [SMOKE, f"run_dir={(run_dirs or (run_dir, run_dir))[i]}", *SMALL, "distributed.enabled=true",
                    f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                    f"distributed.process_id={i}", *extra, "-vv"]
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, __file__, mode, str(self.writes[i]), *args], env=_env(4),
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        self.port = port

    def text(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
        for p in self.procs:
            p.wait()


def _wait_for(condition, timeout: float, launch: Launch | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if launch is not None and any(p.poll() is not None for p in launch.procs):
            raise AssertionError(f"a worker exited while waiting for {what}:\n" + launch.text(0)[-3000:]
                                 + "\n---\n" + launch.text(1)[-3000:])
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _stage_checkpoints(root: Path) -> list[Path]:
    return [p for p in root.glob(f"{RUN}/seed_0/*/stage*/ckpt/steps/*") if STEP_DIR.match(p.name)]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_world):
    """The one-process reference run (8 devices) and the two-process run killed at its first
    stage checkpoint, both started together; the killed run's directory is copied for the
    failure tests before it is restarted."""
    base = tmp_path_factory.mktemp("multiprocess")
    logs = base / "logs"
    logs.mkdir()
    ref_dir, mp_dir = base / "reference", base / "two_processes"
    with open(logs / "reference.log", "w") as log:
        reference = subprocess.Popen([sys.executable, "-m", "gradual_jax.launch", SMOKE, f"run_dir={ref_dir}",
                                      *SMALL], env=_env(8), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    # A step checkpoint at every epoch end to be killed at; the restarts keep the default
    # (time-based: process 0's clock decides for both processes at every step).
    first = Launch(mp_dir, logs, "first", extra=("checkpoint.minutes=0",))
    _wait_for(lambda: _stage_checkpoints(mp_dir), 600, first, "a stage checkpoint")
    first.kill()
    killed = {"probe_files": {str(p.relative_to(mp_dir)): p.read_text()
                              for p in mp_dir.glob(f"{RUN}/seed_0/stage0/*.jsonl")},
              "checkpoints": [str(p.relative_to(mp_dir)) for p in _stage_checkpoints(mp_dir)]}
    for name in ("failing", "one_killed"):
        shutil.copytree(mp_dir, base / name, symlinks=True)
    assert reference.wait(timeout=900) == 0, (logs / "reference.log").read_text()[-3000:]
    return {"base": base, "logs": logs, "reference": ref_dir / RUN, "dir": mp_dir, "first": first,
            "killed": killed}


@pytest.fixture(scope="module")
def restarted(runs):
    """The killed run restarted with the same commands, and a second launch into the same
    directory 2 s later: (restart, second launch, second's seconds to exit)."""
    again = Launch(runs["dir"], runs["logs"], "restart")
    time.sleep(2)
    t0 = time.monotonic()
    second = Launch(runs["dir"], runs["logs"], "second")
    codes = second.wait(timeout=60)
    second_seconds = time.monotonic() - t0
    assert again.wait(timeout=900) == [0, 0], again.text(0)[-3000:] + "\n---\n" + again.text(1)[-3000:]
    return again, second, codes, second_seconds


# ----------------------------------------------------------------------------- tests


def _report(root: Path) -> dict:
    return {k: v for k, v in json.loads((root / "report.json").read_text()).items() if k not in TIMING}


def _probed_ids(text: str) -> dict[str, list[str]]:
    """Questions this process probed per probe file, from its -vv log lines."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"probe (\S+): process \d probed ids (\[.*\])", text):
        out.setdefault(m.group(1), []).extend(json.loads(m.group(2)))
    return out


def test_two_processes_equal_one_and_split_the_questions(runs, restarted):
    again, *_ = restarted
    root, ref = runs["dir"] / RUN, runs["reference"]
    assert_same(_report(root), _report(ref))
    runtime = json.loads((root / "report.json").read_text())["runtime"]
    assert runtime["processes"] == 2 and runtime["devices"] == 8 and runtime["mesh"]["fsdp"] == 8

    # Every probe file: one line per question id, the reference's questions and categories.
    files = sorted(p.relative_to(ref) for p in ref.glob("seed_0/**/*.jsonl") if p.name != "metrics.jsonl")
    assert files and files == sorted(p.relative_to(root) for p in root.glob("seed_0/**/*.jsonl")
                                     if p.name != "metrics.jsonl")
    for rel in files:
        ids = [json.loads(line)["id"] for line in (root / rel).read_text().splitlines()]
        want = {json.loads(line)["id"]: json.loads(line)["category"] for line in (ref / rel).read_text().splitlines()}
        assert sorted(ids) == sorted(want) and len(ids) == len(set(ids)), rel
        got = {json.loads(line)["id"]: json.loads(line)["category"] for line in (root / rel).read_text().splitlines()}
        assert got == want, rel

    # Each process probed a disjoint half of every probe's questions (both launches' logs).
    probed = [{}, {}]
    for launch in (runs["first"], again):
        for i in range(2):
            for path, ids in _probed_ids(launch.text(i)).items():
                probed[i].setdefault(path, []).extend(ids)
    assert probed[0].keys() == probed[1].keys()
    worked = [path for path in probed[0] if probed[0][path] or probed[1][path]]  # not reused records
    assert any("stage0/train" in path for path in worked) and any("stage1/test" in path for path in worked)
    for path in worked:
        mine, theirs = probed[0][path], probed[1][path]
        assert mine and theirs and not set(mine) & set(theirs), path
        assert abs(len(mine) - len(theirs)) <= 2, path  # halves of each chunk
        rel = Path(path).relative_to(root)
        assert sorted(mine + theirs) == sorted(json.loads(line)["id"] for line in (root / rel).read_text().splitlines())


def test_restart_redoes_nothing(runs, restarted):
    again, *_ = restarted
    root = runs["dir"]
    killed = runs["killed"]
    for rel, text in killed["probe_files"].items():
        assert (root / rel).read_text().startswith(text), rel  # records kept, none rewritten
    done = [rel for rel, text in killed["probe_files"].items() if text.endswith("\n") and text.count("\n") >= 33]
    log = again.text(0)
    for rel in done:  # a complete probe file: nothing left to probe
        assert re.search(rf"probe \S*{re.escape(rel)}: process 0 of 2 probed 0 of 0 questions", log), rel
    assert "resumed from step" in log  # the stage went on from its checkpoint


def test_process_one_writes_only_orbax_files(runs, restarted):
    again, *_ = restarted
    roots = [str(runs["dir"].resolve()), str(runs["dir"])]
    for launch in (runs["first"], again):
        writes = [json.loads(line) for line in launch.writes[1].read_text().splitlines()]
        in_run = [w["path"] for w in writes if any(w["path"].startswith(r) for r in roots)]
        stray = [p for p in in_run if "/ckpt/" not in p and "/params/" not in p]
        assert not stray, stray[:10]
        # Outside it: the compile cache, bytecode, devices and the system's temporary files.
        tmp = tempfile.gettempdir()
        elsewhere = [w["path"] for w in writes if w["path"] not in in_run and not (
            w["path"].startswith("/dev/") or "__pycache__" in w["path"] or "/gradual_jax/xla" in w["path"]
            or os.path.dirname(w["path"]) == tmp)]
        assert not elsewhere, elsewhere[:10]
        # Process 0 wrote the run's files (a check that the hook sees writes at all).
        zero = [json.loads(line)["path"] for line in launch.writes[0].read_text().splitlines()]
        assert any(p.endswith(".jsonl") for p in zero)


def test_two_processes_bring_an_older_gold_scoring_up_to_date(runs, restarted, smoke_world):
    """The finished two-process run, copied and marked as made before gold scoring 2 (probe
    sidecars and summaries), relaunched as two processes: every probe file is rewritten under
    the current fingerprint by process 0 alone, and the report equals the one-process run's."""
    copy = runs["base"] / "older_scoring"
    shutil.copytree(runs["dir"], copy, symlinks=True)
    assert mark_as_gold_scoring_1(copy / RUN, str(smoke_world.model_dir), SMOKE) > 0
    launch = Launch(copy, runs["logs"], "older_scoring")
    assert launch.wait(timeout=900) == [0, 0], launch.text(0)[-3000:] + "\n---\n" + launch.text(1)[-3000:]
    assert "records updated to gold scoring 2" in launch.text(0)
    assert_same(_report(copy / RUN), _report(runs["reference"]))
    for meta in (runs["dir"] / RUN).rglob("*.jsonl.meta.json"):
        assert (copy / meta.relative_to(runs["dir"])).read_text() == meta.read_text()
    writes = [json.loads(line)["path"] for line in launch.writes[1].read_text().splitlines()]
    stray = [p for p in writes if p.startswith(str(copy)) and "/ckpt/" not in p and "/params/" not in p]
    assert not stray, stray[:10]


def test_second_launch_into_a_held_directory_refuses(runs, restarted):
    again, second, codes, seconds = restarted
    assert codes == [2, 2] and seconds < 10, (codes, seconds)
    for i in range(2):
        lines = [line for line in second.text(i).splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "is in use by another run" in lines[0], second.text(i)[-2000:]
        assert f"pid {again.procs[0].pid}" in lines[0]  # names the holder: the restart's process 0
    # The refused launch wrote nothing in the run directory (its process 0's exclusive create
    # of the lock failed: the lock was the restart's).
    for i in range(2):
        writes = [json.loads(line) for line in second.writes[i].read_text().splitlines()]
        assert not [w for w in writes if w["path"].startswith(str(runs["dir"]))
                    and not (w["exclusive"] and w["path"].endswith("run.lock"))], writes


def test_run_dir_not_seen_by_every_process_is_refused(tmp_path):
    """Process 1 given another directory stands for a host whose run_dir is not the shared one:
    it cannot read the lock process 0 wrote, and both processes refuse with exit 2."""
    launch = Launch(tmp_path / "shared", tmp_path, "blind", run_dirs=(tmp_path / "shared", tmp_path / "local"))
    codes = launch.wait(timeout=120)
    launch.kill()
    assert codes == [2, 2], (codes, launch.text(0)[-2000:], launch.text(1)[-2000:])
    for i in range(2):
        assert "is not storage every process sees: process 1 on host" in launch.text(i)
    assert not (tmp_path / "shared" / RUN / "run.json").exists()  # refused before anything was written


def test_bad_input_seen_by_process_0_ends_both_with_exit_2(tmp_path):
    """A run directory of another configuration: process 0 finds it (the run directory's files
    are its) and both processes exit 2 with the same one line (`distributed.on_main`)."""
    (tmp_path / RUN).mkdir()
    (tmp_path / RUN / "run.json").write_text(json.dumps({"config_hash": "another"}))
    launch = Launch(tmp_path, tmp_path, "other_config")
    codes = launch.wait(timeout=120)
    launch.kill()
    assert codes == [2, 2], (codes, launch.text(0)[-2000:], launch.text(1)[-2000:])
    for i in range(2):
        errors = [line for line in launch.text(i).splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "holds a run of a different configuration" in errors[0]


def test_error_mid_stage_ends_both_processes(runs):
    failing = Launch(runs["base"] / "failing", runs["logs"], "failing", mode="fail",
                     extra=("checkpoint.minutes=0",))  # the failure is injected into a save
    seen: dict[int, float] = {}
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 600
    while len(ended) < 2 and time.monotonic() < deadline:
        for i, p in enumerate(failing.procs):
            if i not in seen and "error:" in failing.text(i):
                seen[i] = time.monotonic()
            if i not in ended and p.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.1)
    failing.kill()
    assert len(ended) == 2, "workers still running"
    assert [p.returncode for p in failing.procs] == [1, 1], failing.text(0)[-2000:]
    first_error = min(seen.values())
    assert max(ended.values()) - first_error < 10, (seen, ended)
    text = failing.text(0)
    assert "injected failure" in text and "traceback in" in text
    run_log = (runs["base"] / "failing" / RUN / "run.log").read_text()
    assert "Traceback" in run_log and "injected failure" in run_log


def test_killing_one_process_ends_the_other(runs):
    launch = Launch(runs["base"] / "one_killed", runs["logs"], "one_killed")
    _wait_for(lambda: "resumed from step" in launch.text(0), 600, launch, "the stage to resume")
    launch.procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    codes = launch.wait(timeout=90)
    took = time.monotonic() - t0
    launch.kill()
    assert codes[0] is not None and codes[0] != 0 and took < 60, (codes, took, launch.text(0)[-2000:])


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
