"""Reliability under faults (issue 4, CPU part): kill -9 torture, concurrent writers, stale locks.

The runs happen in real processes that are SIGKILLed. To keep 20+ kills affordable on a 2-core CI box,
each run is forked from a "zygote" process that has already imported torch and transformers (the
import is most of a fresh interpreter's start-up); the forked child then does everything a fresh
``python -c "from hitbench_utils.run import run; run(...)"`` does (header, lock, log, model load,
generation) in its own process with its own pid, and it is that child which is killed.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hitbench_utils.errors import RunLockedError
from hitbench_utils.run import run
from hitbench_utils.runlog import LOCK_NAME, LOG_NAME, RunLock, read_log, view
from hitbench_utils.status import summarize

REPO = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("HITBENCH_TORTURE_SEED", "20240604"))

ZYGOTE = r"""
import json, os, sys, traceback
import torch, transformers                                   # the expensive imports, done once
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor
import hitbench_utils.run
from hitbench_utils.backends.tiny import tiny_model_dir
tiny_model_dir()                                             # built once, before any child needs it
out = sys.stdout
out.write("ready\n"); out.flush()
while True:
    line = sys.stdin.readline()
    if not line:
        break
    msg = json.loads(line)
    if msg["cmd"] == "fork":
        pid = os.fork()
        if pid == 0:                                         # the child: one run() call, then exit
            code = 1
            try:
                fd = os.open(msg["out"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                from hitbench_utils.run import run
                run(**msg["params"])
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n"); out.flush()
    elif msg["cmd"] == "wait":
        _, status = os.waitpid(msg["pid"], 0)
        out.write(json.dumps({"status": status}) + "\n"); out.flush()
"""


class Zygote:
    """A warm interpreter that forks one child per ``run()`` and reaps it on request."""

    def __init__(self, folder: Path) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        self.err = folder / "zygote.err"
        self.children: set[int] = set()
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.err, "wb"), text=True, cwd=REPO, env=env)
        line = self.proc.stdout.readline().strip()
        assert line == "ready", f"zygote did not start: {line!r}\n{self.err.read_text()[-3000:]}"

    def _ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"zygote died:\n{self.err.read_text()[-3000:]}"
        return json.loads(line)

    def fork(self, out: Path, **params) -> int:
        pid = self._ask({"cmd": "fork", "out": str(out), "params": params})["pid"]
        self.children.add(pid)
        return pid

    def wait(self, pid: int) -> int:
        status = self._ask({"cmd": "wait", "pid": pid})["status"]
        self.children.discard(pid)
        return status

    def close(self) -> None:
        for pid in list(self.children):      # only the children this zygote forked
            try:
                os.kill(pid, signal.SIGKILL)
                self.wait(pid)
            except Exception:  # noqa: BLE001
                pass
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def alive(pid: int) -> bool:
    """Running (a zombie that its parent has not reaped yet counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X", "x")


def killed_by_sigkill(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def exited_ok(status: int) -> bool:
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def lock_owner(run_dir: Path) -> dict | None:
    return RunLock(run_dir).owner()


def dataset_60(src: Path, dest: Path) -> Path:
    """The sample dataset plus 20 duplicated questions with new ids 41..60."""
    shutil.copytree(src, dest)
    qa = dest / "QA_final.json"
    blob = json.loads(qa.read_text())
    qs = blob["queries"]
    assert [q["id"] for q in qs] == list(range(1, 41))
    qs += [dict(q, id=40 + q["id"]) for q in qs[:20]]
    qa.write_text(json.dumps(blob, ensure_ascii=False, indent=1))
    return dest


def complete_part(data: bytes) -> bytes:
    """The bytes up to and including the last newline: the lines a reader counts."""
    return data[: data.rfind(b"\n") + 1]


# ---------------------------------------------------------------------------------------------
# kill -9 torture
# ---------------------------------------------------------------------------------------------
N_KILLS = 20
N_IDS = 60


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill9_torture_60_samples_20_kills(tmp_path, sample_data, zygote):
    """SIGKILL a 60-sample job at 20 random moments across resumes, some right on a write, with torn
    writes injected between resumes; then resume to the end. Nothing completed is lost, every id is in
    the view once, every line parses, each id has exactly one ok record, stale locks are taken over."""
    rng = random.Random(SEED)
    data = dataset_60(sample_data, tmp_path / "data")
    run_dir = tmp_path / "run"
    log = run_dir / LOG_NAME
    base = dict(data_path=str(data), run_dir=str(run_dir), format="csv", max_new_tokens=8, max_reasks=0,
                dtype="float32", device="cpu", score=False, progress=False)
    inject_at = set(rng.sample(range(1, N_KILLS), 4))     # torn writes simulated before these sessions
    kills: list[dict] = []
    prev = b""                                             # the complete lines seen so far
    killed_pids: set[int] = set()
    stale_takeovers = real_torn_tails = injected = sessions = 0

    def ok_ids() -> set[int]:
        return {int(r["id"]) for r in read_log(run_dir).records if r["status"] == "ok"}

    def check_log(context: str) -> bytes:
        nonlocal prev
        raw = log.read_bytes() if log.exists() else b""
        assert raw.startswith(prev), f"{context}: completed lines were changed or lost (seed {SEED})"
        body = complete_part(raw)
        for n, line in enumerate(body.split(b"\n")[:-1], 1):
            obj = json.loads(line)                          # every complete line parses
            assert (n == 1) == (obj.get("type") == "header"), f"{context}: line {n} {line[:80]!r}"
        prev = body
        return raw

    while len(kills) < N_KILLS:
        sessions += 1
        assert sessions <= 160, f"too many sessions without reaching {N_KILLS} kills: {kills}"
        if len(kills) in inject_at and log.exists() and complete_part(log.read_bytes()).count(b"\n") >= 1:
            inject_at.discard(len(kills))                  # a kill -9 inside os.write leaves half a line
            lines = [x for x in complete_part(log.read_bytes()).split(b"\n")[1:] if x]
            src = rng.choice(lines) if lines else b'{"id": 1, "status": "ok", "prediction": "x"}'
            with open(log, "ab") as f:
                f.write(src[: rng.randint(1, len(src) - 1)])
            injected += 1
        remaining = N_IDS - len(ok_ids())
        left = N_KILLS - len(kills)
        if remaining == 0:
            mode, delay = "finishing", rng.uniform(0, 0.3)   # kill a resume that has nothing left to run
        elif remaining <= left + 2:
            mode, delay = "early", rng.uniform(0, 1.5)       # keep work for the kills still to come
        else:
            mode = rng.choices(["on_growth", "early", "delayed"], [0.5, 0.3, 0.2])[0]
            if mode == "delayed" and remaining - 60 < left:  # a delayed kill may finish a whole chunk (512 text ids)
                mode = "on_growth"
            delay = rng.uniform(0, 1.5)
        batch_size = rng.choice([1, 4])
        owner_before = lock_owner(run_dir)
        before = len(read_log(run_dir).records)
        pid = zygote.fork(tmp_path / f"session{sessions:02d}.out", batch_size=batch_size, **base)
        t0 = time.monotonic()
        s0, grew_at, fired = size(log), None, False
        while True:
            now, s = time.monotonic(), size(log)
            if grew_at is None and s != s0:
                grew_at = now
            fired = (mode == "on_growth" and grew_at is not None
                     or mode == "early" and (grew_at is not None or now - t0 >= delay)
                     or mode == "delayed" and grew_at is not None and now - grew_at >= delay
                     or mode == "finishing" and now - t0 >= delay)
            if fired or not alive(pid):
                break
            assert now - t0 < 180, f"session {sessions} hung:\n{(tmp_path / f'session{sessions:02d}.out').read_text()[-3000:]}"
            time.sleep(0.0002)
        if fired:
            owner_at_kill = lock_owner(run_dir)
            os.kill(pid, signal.SIGKILL)
        status = zygote.wait(pid)
        out = (tmp_path / f"session{sessions:02d}.out").read_text(errors="replace")
        if fired and killed_by_sigkill(status):
            killed_pids.add(pid)
            raw = check_log(f"after kill {len(kills) + 1} ({mode})")
            if raw and not raw.endswith(b"\n"):
                real_torn_tails += 1
            lk = lock_owner(run_dir)                           # a lock left behind is a dead process's
            assert lk is None or lk.get("pid") in killed_pids, (lk, killed_pids)
            if (owner_before and owner_before.get("pid") in killed_pids and owner_at_kill
                    and owner_at_kill.get("pid") == pid):
                stale_takeovers += 1                           # it took over the killed run's lock
            kills.append({"mode": mode, "batch_size": batch_size, "records": len(read_log(run_dir).records) - before,
                          "at_s": round(time.monotonic() - t0, 3)})
        else:
            assert exited_ok(status), f"session {sessions} failed (status {status}):\n{out[-3000:]}"
            check_log(f"session {sessions} that ended by itself")

    # the last resume runs to the end
    pid = zygote.fork(tmp_path / "final.out", batch_size=4, **base)
    status = zygote.wait(pid)
    assert exited_ok(status), (tmp_path / "final.out").read_text()[-3000:]
    raw = check_log("after the final resume")
    assert raw.endswith(b"\n"), "the final log still ends in a torn line"
    s = summarize(run_dir)
    assert s["verdict"] == "complete" and s["ok"] == N_IDS, s
    assert not s["bad_lines"] and not s["torn_tail"], s
    contents = read_log(run_dir)
    recs = contents.records
    assert sorted(view(recs)) == list(range(1, N_IDS + 1))            # every id in the view, once
    ok_per_id: dict[int, int] = {}
    for r in recs:
        assert r["status"] == "ok", f"no error was injected, yet id {r['id']} has {r['status']}: {r.get('error')}"
        ok_per_id[r["id"]] = ok_per_id.get(r["id"], 0) + 1
    assert all(n == 1 for n in ok_per_id.values()), {i: n for i, n in ok_per_id.items() if n > 1}
    assert len(recs) == N_IDS and all(r["attempt"] == 1 for r in recs)   # a kill never counts as an attempt
    assert not (run_dir / LOCK_NAME).exists()                          # released at the end
    assert stale_takeovers >= 1, kills
    assert injected >= 1
    # a finished run appends nothing when resumed once more
    pid = zygote.fork(tmp_path / "noop.out", batch_size=1, **base)
    assert exited_ok(zygote.wait(pid))
    assert log.read_bytes() == raw
    modes = {m: sum(k["mode"] == m for k in kills) for m in ("on_growth", "early", "delayed", "finishing")}
    print(f"\nkill -9 torture (seed {SEED}): {len(kills)} kills in {sessions} sessions, modes {modes}, "
          f"records written per killed session {[k['records'] for k in kills]}, {injected} torn writes injected, "
          f"{real_torn_tails} torn by a kill, {stale_takeovers} stale locks taken over")


# ---------------------------------------------------------------------------------------------
# the lock: two Job processes, a stale lock, a lock from another host
# ---------------------------------------------------------------------------------------------
def _params(sample_data, run_dir, **kw):
    p = dict(data_path=str(sample_data), run_dir=str(run_dir), format="csv", max_new_tokens=8, max_reasks=0,
             dtype="float32", device="cpu", score=False, progress=False, limit=8, batch_size=1)
    p.update(kw)
    return p


def test_second_run_on_the_same_run_dir_is_refused_naming_owner_pid_and_host(tmp_path, sample_data, zygote):
    run_dir = tmp_path / "run"
    pid = zygote.fork(tmp_path / "first.out", **_params(sample_data, run_dir))
    deadline = time.monotonic() + 120
    while (lock_owner(run_dir) or {}).get("pid") != pid:
        assert alive(pid) and time.monotonic() < deadline, (tmp_path / "first.out").read_text()[-3000:]
        time.sleep(0.001)
    with pytest.raises(RunLockedError) as e:       # the very call a user would make, in another process
        run(**_params(sample_data, run_dir))
    msg = str(e.value)
    assert f"pid {pid}" in msg and f"host {socket.gethostname()}" in msg and "Fix:" in msg, msg
    assert exited_ok(zygote.wait(pid)), (tmp_path / "first.out").read_text()[-3000:]
    recs = read_log(run_dir).records                # the refused run wrote nothing; the first one finished
    assert sorted(r["id"] for r in recs) == list(range(1, 9)) and all(r["status"] == "ok" for r in recs)
    assert not (run_dir / LOCK_NAME).exists()


def test_two_job_processes_on_one_run_dir_only_one_writes(tmp_path, sample_data, zygote):
    """Both are real run() processes; the second starts as soon as the first has written its lock (a start
    inside the first one's create-then-write window is test_lock_being_created_by_a_live_process_is_not_stolen)."""
    run_dir = tmp_path / "run"
    a = zygote.fork(tmp_path / "a.out", **_params(sample_data, run_dir))
    while (lock_owner(run_dir) or {}).get("pid") != a:
        assert alive(a), (tmp_path / "a.out").read_text()[-3000:]
        time.sleep(0.001)
    b = zygote.fork(tmp_path / "b.out", **_params(sample_data, run_dir))
    sa, sb = zygote.wait(a), zygote.wait(b)
    outs = {a: (tmp_path / "a.out").read_text(), b: (tmp_path / "b.out").read_text()}
    ok = [p for p, st in ((a, sa), (b, sb)) if exited_ok(st)]
    assert ok == [a], outs
    assert "RunLockedError" in outs[b] and f"pid {a}" in outs[b] and socket.gethostname() in outs[b], outs[b][-2000:]
    recs = read_log(run_dir).records
    assert sorted(r["id"] for r in recs) == list(range(1, 9))       # each id exactly once


def test_killed_owner_lock_is_taken_over_by_the_next_run(tmp_path, sample_data, zygote, tiny_backend):
    run_dir = tmp_path / "run"
    pid = zygote.fork(tmp_path / "first.out", **_params(sample_data, run_dir, limit=4))
    while (lock_owner(run_dir) or {}).get("pid") != pid:
        assert alive(pid), (tmp_path / "first.out").read_text()[-3000:]
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    assert killed_by_sigkill(zygote.wait(pid))
    assert lock_owner(run_dir)["pid"] == pid                          # left behind by the dead process
    s = run(**_params(sample_data, run_dir, limit=4), backend=tiny_backend)
    assert s["verdict"] == "complete" and s["ok"] == 4
    assert not (run_dir / LOCK_NAME).exists()


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 2 ** 22 + 7, "host": "other-host.example", "since": 0}))
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path).acquire()
    assert "other-host.example" in str(e.value) and "Fix:" in str(e.value)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "other-host.example"


def test_empty_lock_left_by_a_kill_between_create_and_write_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text("")        # kill -9 after O_CREAT|O_EXCL, before the owner was written
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_NAME, (old, old))
    with RunLock(tmp_path) as lock:
        assert lock.owner()["pid"] == os.getpid()


SLOW_LOCKER = r"""
import json, os, sys, time
from pathlib import Path
marker = Path(sys.argv[2])
real_dump, real_dumps = json.dump, json.dumps
def slow(fn):
    def inner(*a, **k):
        if not marker.exists():
            marker.write_text("writing")       # the owner is between creating the lock and filling it
            time.sleep(float(sys.argv[3]))
        return fn(*a, **k)
    return inner
json.dump, json.dumps = slow(real_dump), slow(real_dumps)
from hitbench_utils.errors import RunLockedError
from hitbench_utils.runlog import RunLock
try:
    RunLock(sys.argv[1]).acquire()
    print("held", flush=True)            # acquire() returned: this process believes it owns the folder
except RunLockedError:
    print("refused", flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_lock_being_created_by_a_live_process_is_not_stolen(tmp_path):
    """Two writers racing: whatever the interleaving, exactly one may hold the folder."""
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", SLOW_LOCKER, str(tmp_path), str(marker), "1.5"],
                             stdout=subprocess.PIPE, text=True, cwd=REPO)
    lock = RunLock(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        try:
            lock.acquire()
            me = "held"
        except RunLockedError:
            me = "refused"
        other = child.stdout.readline().strip()
        holders = [who for who, res in (("test", me), ("child", other)) if res == "held"]
        assert len(holders) == 1, f"test: {me}, child: {other}"
    finally:
        lock.release()
        child.kill()
        child.wait()


# ---------------------------------------------------------------------------------------------
# durability: what a kill can lose
# ---------------------------------------------------------------------------------------------
class DiskSpy:
    """Wraps a backend; at each generate call, notes how many records the log already holds."""

    def __init__(self, inner, log: Path) -> None:
        self.inner, self.log, self.on_disk = inner, log, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests, settings):
        self.on_disk.append(len(read_log(self.log.parent).records))
        return self.inner.generate(requests, settings)


def test_each_finished_batch_is_on_disk_before_the_next_batch_starts(tmp_path, sample_data, tiny_backend):
    from hitbench_utils.config import RunConfig
    from hitbench_utils.run import Job

    spy = DiskSpy(tiny_backend, tmp_path / "run" / LOG_NAME)
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), format="csv", max_new_tokens=4,
                    max_reasks=0, batch_size=1, limit=4, dtype="float32", device="cpu", score=False, share_prefix=False)
    Job(cfg, backend=spy, progress=False).execute()
    assert spy.on_disk == [0, 1, 2, 3], spy.on_disk
