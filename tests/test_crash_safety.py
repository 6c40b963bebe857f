"""Crash safety to the letter: a kill -9 loses only the samples in flight, and a full disk loses nothing.

The kill tests count the answers the engine has served (a counter file the child appends to as each
answer leaves the engine), SIGKILL the run after N of them, and check that the log holds at least
N / (1 + max_reasks) - in-flight records: every sample whose answers were all served is logged, also
when its re-asks came late in the run. The tiny model never writes a final-answer line, so every sample
is asked 1 + max_reasks times: the case in which re-asks used to hold the whole first pass hostage.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hitbench_utils.run import run
from hitbench_utils.runlog import read_log, view

CHILD = r"""
import json, os, sys
from hitbench_utils import engine as E
from hitbench_utils.engine import scheduler as P
counter = sys.argv[3]

def counting(run_stream):
    def wrapped(self, chunks, settings):
        fd = os.open(counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        for out in run_stream(self, chunks, settings):
            os.write(fd, b"a\n")          # one line per answer served, before the run sees it
            yield out
    return wrapped

E.Engine.run_stream = counting(E.Engine.run_stream)
P.PrefixEngine.run_stream = counting(P.PrefixEngine.run_stream)
from hitbench_utils.run import run
run(data_path=sys.argv[1], run_dir=sys.argv[2], progress=False, score=False, max_new_tokens=4,
    **json.loads(sys.argv[4]))
"""


def bigger_sample(sample_data: Path, dest: Path, copies: int) -> Path:
    """The sample dataset with every question repeated ``copies`` times under new ids (same tables)."""
    shutil.copytree(sample_data, dest)
    qa = json.loads((dest / "QA_final.json").read_text())
    items = qa["queries"]
    top = max(q["id"] for q in items)
    qa["queries"] = [dict(q, id=q["id"] + k * top) for k in range(copies) for q in items]
    (dest / "QA_final.json").write_text(json.dumps(qa))
    return dest


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_after(tmp_path: Path, data: Path, answers: int, params: dict) -> tuple[int, Path]:
    run_dir, counter = tmp_path / "run", tmp_path / "served"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(data), str(run_dir), str(counter), json.dumps(params)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while lines(counter) < answers and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    ended = proc.poll()
    if ended is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    served = lines(counter)
    assert served >= answers, f"the run ended or stalled after {served} answers: {proc.stderr.read().decode()[-3000:]}"
    return served, run_dir


@pytest.mark.slow
@pytest.mark.parametrize("engine,params,in_flight", [
    ("shared-prefix", {}, 32),                                    # the defaults: up to 32 decode slots
    ("plain batches", {"share_prefix": False, "batch_size": 4}, 4),
])
def test_kill_after_n_answers_loses_only_the_samples_in_flight(tmp_path, sample_data, tiny_backend, engine, params,
                                                               in_flight):
    data = bigger_sample(sample_data, tmp_path / "data", copies=2)      # 80 questions, 240 answers in all
    max_reasks = 2
    served, run_dir = kill_after(tmp_path, data, 150, params)
    records = read_log(run_dir).records
    bound = served / (1 + max_reasks) - in_flight
    print(f"kill -9 ({engine}): {served} answers served, {len(records)} records kept, bound {bound:.1f}")
    assert len(records) >= bound, (engine, served, len(records), bound)
    assert all(r["status"] == "ok" and r["reasks"] == max_reasks for r in records)   # final samples only
    # the resume completes the rest; every id once, nothing logged before is lost or redone
    s = run(data_path=str(data), run_dir=str(run_dir), backend=tiny_backend, score=False, progress=False,
            max_new_tokens=4, **params)
    assert s["verdict"] == "complete", s
    after = read_log(run_dir).records
    assert after[:len(records)] == records
    ids = [r["id"] for r in after]
    assert len(ids) == len(set(ids)) == len(view(after)) == 80


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True,
                   capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KiB tmpfs (CI runs as root); skipped, with the reason, where mounting is not allowed."""
    mnt = tmp_path / "disk"
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a small tmpfs")
    try:
        _mount_tmpfs(mnt, "40k")
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot mount a tmpfs here: {e.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_stops_the_run_loudly_and_a_resume_completes(small_disk, sample_data, tiny_backend):
    from hitbench_utils.errors import LogWriteError

    run_dir = small_disk / "run"
    kw = dict(data_path=str(sample_data), run_dir=str(run_dir), backend=tiny_backend, score=False, progress=False,
              max_reasks=0, max_new_tokens=4)
    with pytest.raises(LogWriteError) as e:
        run(**kw)
    msg = str(e.value)
    assert str(run_dir) in msg and "bytes free" in msg and "free space and run again to resume" in msg
    raw = (run_dir / "samples.jsonl").read_bytes()
    assert raw.endswith(b"\n")                       # no torn line: the partial write was cut off
    for line in raw.splitlines():
        json.loads(line)                             # every line whole
    kept = read_log(run_dir).records
    assert 0 < len(kept) < 40
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)   # free space
    s = run(**kw)
    assert s["verdict"] == "complete", s
    after = read_log(run_dir).records
    assert after[:len(kept)] == kept                 # nothing finished was lost
    ids = [r["id"] for r in after]
    assert sorted(ids) == sorted(set(ids)) and len(view(after)) == 40    # every id exactly once


def test_a_short_write_is_resumed_not_glued(tmp_path, monkeypatch):
    """os.write may write less than asked (a signal, a nearly full pipe or disk): the rest follows."""
    from hitbench_utils import runlog as RL

    log = RL.RunLog.open(tmp_path / "r", {"type": "header", "fingerprint": {}})
    real = os.write
    monkeypatch.setattr(RL.os, "write", lambda fd, data: real(fd, data[: max(1, len(data) // 3)]))
    for i in range(3):
        log.append({"id": i, "status": "ok", "text": "x" * 500})
    log.close()
    recs = read_log(tmp_path / "r").records
    assert [r["id"] for r in recs] == [0, 1, 2] and all(r["text"] == "x" * 500 for r in recs)


def test_an_io_error_cuts_the_partial_line_and_says_what_to_do(tmp_path, monkeypatch):
    import errno

    from hitbench_utils import runlog as RL
    from hitbench_utils.errors import LogWriteError

    log = RL.RunLog.open(tmp_path / "r", {"type": "header", "fingerprint": {}})
    log.append({"id": 1, "status": "ok"})
    real, calls = os.write, []

    def failing(fd, data):
        calls.append(1)
        if len(calls) == 1:
            return real(fd, data[:7])               # half a line reaches the disk, then the disk fails
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(RL.os, "write", failing)
    with pytest.raises(LogWriteError, match="I/O error.*free space and run again to resume"):
        log.append({"id": 2, "status": "ok"})
    raw = (tmp_path / "r" / "samples.jsonl").read_bytes()
    assert raw.endswith(b"\n") and [r["id"] for r in read_log(tmp_path / "r").records] == [1]
