"""Issue 4 on the GPU: the 8B architecture (random weights) meets prompts that really run out of memory.

Three samples, batch 1, max_input_tokens=400,000: the 334K-token economy-table14_swap html table, the
1.12M-token agriculture-table06_swap table (truncated to 400K), then an ordinary 7K-token table. The
OOM ladder must recover or end in an ``oom`` record, the next sample must run, and allocated memory
must fall back to the weights' baseline after each sample.

    python bench/oom_gpu.py --prepare                       # here: copies the inputs into .device/
    python bench/oom_gpu.py --out bench/results                      # on the GPU machine (with .device/ sent along)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import INPUTS, build_random_8b, device_name, prepare, realhitbench_dir, shared_dir  # noqa: E402

SAMPLES = [  # (id, table file, question id in QA_final whose question we ask)
    (1, "economy-table14_swap", 438), (2, "agriculture-table06_swap", 2016), (3, "employment-table01", 1)]


def do_prepare() -> None:
    shared = shared_dir()
    data = realhitbench_dir(shared)
    by_id = {q["id"]: q for q in json.loads((data / "QA_final.json").read_text())["queries"]}
    items = [dict(by_id[qid], id=i, FileName=name) for i, name, qid in SAMPLES]
    prepare(shared, files={"html": [f"{n}.html" for _, n, _ in SAMPLES]}, qa={"QA_oom.json": items})
    print(f"prepared {INPUTS}")


class MemoryProbe:
    """Wraps a backend: records allocated/peak GPU memory around every generate call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, requests, settings):
        import torch

        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        entry = {"ids": [r.key for r in requests], "input_tokens": [r.input_tokens for r in requests],
                 "before_gib": round(before / 2**30, 2)}
        t0 = time.time()
        try:
            return self.inner.generate(requests, settings)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            raise
        finally:
            entry["seconds"] = round(time.time() - t0, 2)
            entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            self.calls.append(entry)
            print("generate", json.dumps(entry), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    if a.prepare:
        do_prepare()
        return 0
    import torch

    from hitbench_utils.config import RunConfig
    from hitbench_utils.run import Job
    from hitbench_utils.runlog import read_log, view

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backend, build_s = build_random_8b(INPUTS / "qwen2")
    baseline = torch.cuda.memory_allocated()
    probe = MemoryProbe(backend)
    run_dir = Path("/tmp/oom_run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = RunConfig(data_path=str(INPUTS / "data"), qa_file=str(INPUTS / "data" / "QA_oom.json"), format="html",
                    run_dir=str(run_dir), max_input_tokens=400_000, max_new_tokens=8, batch_size=1, max_reasks=0,
                    score=False, max_attempts=1)
    t0 = time.time()
    summary = Job(cfg, backend=probe, progress=False).execute()
    recs = list(view(read_log(run_dir).records).values())
    result = {
        "device": device_name(), "torch": torch.__version__, "model_build_s": round(build_s, 1),
        "weights_gib": round(baseline / 2**30, 2), "run_s": round(time.time() - t0, 1), "verdict": summary["verdict"],
        "records": [{k: r.get(k) for k in ("id", "file_name", "status", "error", "input_tokens_original",
                                           "input_tokens_sent", "truncated", "rows_dropped", "degraded", "tried",
                                           "output_tokens", "generate_s")} for r in recs],
        "generate_calls": probe.calls,
        # each call starts from the weights alone, OOMs before it included; so does the end of the run
        "memory_back_to_baseline": all(abs(c["before_gib"] - baseline / 2**30) < 0.5 for c in probe.calls)
        and abs(torch.cuda.memory_allocated() - baseline) < 2**29,
        "allocated_at_end_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
    }
    (out / "oom_gpu.json").write_text(json.dumps(result, indent=1))
    shutil.copy(run_dir / "run.log", out / "oom_run.log")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
