"""SIGKILL a run mid-way, resume, and check nothing completed is lost or redone."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hitbench_utils.run import run
from hitbench_utils.runlog import read_log, view

# The plain engine at batch 1, so records land one by one and a kill falls between them: the shared-prefix
# engine decodes all 14 at once and writes them within milliseconds (its kills: test_reliability.py).
SCRIPT = """
import sys
from hitbench_utils.run import run
run(data_path=sys.argv[1], run_dir=sys.argv[2], limit=int(sys.argv[3]), batch_size=1, max_reasks=0,
    share_prefix=False, dtype="float32", device="cpu", score=False, progress=False)
"""


def count_records(path):
    try:
        return sum(1 for line in path.read_bytes().split(b"\n")[1:] if line.strip())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_redoes_only_the_in_flight_sample(tmp_path, sample_data, tiny_backend):
    n, k = 14, 5
    run_dir = tmp_path / "run"
    log = run_dir / "samples.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(sample_data), str(run_dir), str(n)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while count_records(log) < k and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = [r["id"] for r in read_log(run_dir).records]
    assert k <= len(done_before) < n, (len(done_before), proc.stderr.read().decode()[-2000:])
    assert not (run_dir / ".lock").exists() or json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid
    s = run(data_path=str(sample_data), run_dir=str(run_dir), limit=n, batch_size=1, max_reasks=0,
            backend=tiny_backend, score=False, progress=False)
    assert s["verdict"] == "complete"
    ids = [r["id"] for r in read_log(run_dir).records]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == n      # each id exactly once: nothing redone
    assert ids[:len(done_before)] == done_before                  # nothing completed was lost
    for line in log.read_text().splitlines():
        json.loads(line)
    assert len(view(read_log(run_dir).records)) == n
