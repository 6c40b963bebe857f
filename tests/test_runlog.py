import json
import os
import subprocess
import sys

import pytest

from hitbench_utils.errors import FingerprintMismatch, RunExistsError, RunLockedError
from hitbench_utils.runlog import RunLock, RunLog, read_log, runnable, view
from hitbench_utils.status import export_checkpoint, summarize, write_plan

HEADER = {"type": "header", "fingerprint": {"model": "m", "format": "html"}}


def rec(i, status="ok", **kw):
    return {"id": i, "status": status, "prediction": f"p{i}", **kw}


def test_append_view_and_header_shape(tmp_path):
    log = RunLog.open(tmp_path, HEADER)
    for r in [rec(1), rec(2, "oom"), rec(2)]:
        log.append(r)
    log.close()
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["type"] == "header" and "id" not in first and "status" not in first
    assert len(lines) == 4
    v = view(read_log(tmp_path).records)
    assert sorted(v) == [1, 2] and v[2]["status"] == "ok"


def test_runnable_skips_ok_retries_errors_until_max_attempts():
    records = [rec(1), rec(2, "oom"), rec(3, "exception"), rec(3, "exception"), rec(3, "exception")]
    assert runnable([1, 2, 3, 4], records, max_attempts=3) == [2, 4]
    assert runnable([1, 2, 3, 4], records, max_attempts=4) == [2, 3, 4]


def test_torn_tail_is_ignored_and_cut_before_append(tmp_path):
    log = RunLog.open(tmp_path, HEADER)
    log.append(rec(1))
    log.close()
    with open(tmp_path / "samples.jsonl", "ab") as f:
        f.write(b'{"id": 2, "status": "o')
    c = read_log(tmp_path)
    assert c.torn_tail and [r["id"] for r in c.records] == [1] and not c.bad_lines
    log = RunLog.open(tmp_path, HEADER)
    log.append(rec(2))
    log.close()
    for line in (tmp_path / "samples.jsonl").read_text().splitlines():
        json.loads(line)  # every line parses again
    assert sorted(view(read_log(tmp_path).records)) == [1, 2]


def test_garbage_middle_line_is_reported_with_its_number_and_later_records_kept(tmp_path):
    log = RunLog.open(tmp_path, HEADER)
    log.append(rec(1))
    log.close()
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write("#### garbage ####\n" + json.dumps(rec(2)) + "\n")
    c = read_log(tmp_path)
    assert c.bad_lines and c.bad_lines[0][0] == 3
    assert [r["id"] for r in c.records] == [1, 2]


def test_fingerprint_mismatch_is_refused_with_a_readable_diff(tmp_path):
    RunLog.open(tmp_path, HEADER).close()
    other = {"type": "header", "fingerprint": {"model": "m", "format": "latex"}}
    with pytest.raises(FingerprintMismatch) as e:
        RunLog.open(tmp_path, other)
    assert "format" in str(e.value) and "'html'" in str(e.value) and "'latex'" in str(e.value)


def test_resume_false_refused_then_overwrite_moves_aside(tmp_path):
    log = RunLog.open(tmp_path, HEADER)
    log.append(rec(1))
    log.close()
    with pytest.raises(RunExistsError, match="overwrite=True"):
        RunLog.open(tmp_path, HEADER, resume=False)
    RunLog.open(tmp_path, HEADER, resume=False, overwrite=True).close()
    assert read_log(tmp_path).records == []
    backups = list(tmp_path.glob("previous-*/samples.jsonl"))
    assert len(backups) == 1 and "p1" in backups[0].read_text()


def test_lock_refuses_second_writer_and_takes_over_stale(tmp_path):
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys,time; from hitbench_utils.runlog import RunLock; "
                              f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path).acquire()
        assert f"pid {child.pid}" in str(e.value)
    finally:
        child.kill()
        child.wait()
    with RunLock(tmp_path) as lock:   # the owner is dead: its lock is stale and taken over
        assert lock.owner()["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_status_verdicts_and_checkpoint(tmp_path):
    log = RunLog.open(tmp_path, HEADER)
    for r in [rec(1), rec(2, "oom"), rec(3, answer_format_ok=False)]:
        log.append(r)
    log.close()
    write_plan(tmp_path, [1, 2, 3], max_attempts=1)
    assert summarize(tmp_path)["verdict"] == "complete with 1 permanent errors"
    write_plan(tmp_path, [4], max_attempts=1)      # plans accumulate: re-running a few ids never shrinks them
    s = summarize(tmp_path)
    assert s["verdict"].startswith("incomplete: 1 of 4 remaining")
    assert s["errors"] == {"oom": 1} and s["answer_format_failures"] == 1
    ck = json.loads(export_checkpoint(tmp_path).read_text())
    assert ck["processed_ids"] == [1, 3]
    assert ck["results"][1]["Prediction"].startswith("[ERROR] oom")
