"""CPU micro-benchmark: the cost of appending one sample record to samples.jsonl, fsync included.

    python bench/runlog_bench.py [--n 2000] [--dir /tmp] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hitbench_utils.records import SampleRecord  # noqa: E402
from hitbench_utils.runlog import RunLog  # noqa: E402


def _fstype(path: str) -> str:
    """The filesystem type under ``path`` (from /proc/mounts), not the path: results name no machine's paths."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            mnt, fs = line.split()[1], line.split()[2]
            if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, fs
    except OSError:
        pass
    return kind


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--dir", default=None, help="where the log is written (its filesystem decides fsync's cost)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        log = RunLog.open(d, {"type": "header", "fingerprint": {"bench": True}})
        rec = SampleRecord(id=0, question_type="Fact Checking", sub_qtype="Value-Matching", file_name="t",
                           question="q" * 200, reference="r" * 40, response="x" * 300, prediction="p" * 40,
                           answer_format_ok=True, input_tokens_original=12384, input_tokens_sent=12384,
                           output_tokens=13, scores={"F1": 50.0, "EM": 0.0, "ROUGE-L": 50.0, "SacreBLEU": 10.0}).to_dict()
        times = []
        for i in range(a.n):
            rec["id"] = i
            t0 = time.perf_counter()
            log.append(dict(rec))
            times.append(time.perf_counter() - t0)
        log.close()
        size = (Path(d) / "samples.jsonl").stat().st_size
    times.sort()
    res = {"records": a.n, "record_bytes": round(size / (a.n + 1)), "median_ms": round(statistics.median(times) * 1e3, 3),
           "p99_ms": round(times[int(0.99 * len(times))] * 1e3, 3), "max_ms": round(times[-1] * 1e3, 3),
           "device": "cpu", "filesystem": _fstype(a.dir or tempfile.gettempdir()), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(res, indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"runlog-append-{res['date']}-cpu.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
