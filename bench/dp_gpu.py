"""Issue 8: data parallel over the GPUs of one host against one GPU, on the same subset, in one call.

    python bench/dp_gpu.py --out bench/results          # on a machine with 2+ GPUs, .device/ sent along

The subset, prompts and scripted output lengths are those of ``throughput.py --prepare`` (68 text_html
queries). Each configuration runs the real data-parallel path: N worker processes (RANK/WORLD_SIZE/
LOCAL_RANK set as the launcher sets them), each with the 8B architecture (random bf16 weights) on its own
GPU, claiming chunks from the run's work list and appending to its own log; the time is the wall time
from spawning the workers to the last one's exit. Model build is timed apart, per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import INPUTS, build_random_8b, device_name  # noqa: E402


def child(run_dir: str) -> None:
    """One rank: build the model on this rank's GPU, then the ordinary worker path (Job.execute)."""
    import torch

    from hitbench_utils.config import RunConfig
    from hitbench_utils.run import Job

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    t0 = time.time()
    backend, _ = build_random_8b(INPUTS / "qwen2", device=f"cuda:{local}")
    build_s = time.time() - t0
    meta = json.loads((INPUTS / "bench_meta.json").read_text())
    lengths = {int(k): v for k, v in meta["lengths"].items()}

    class ScriptedJob(Job):
        """Output lengths scripted per id (as in throughput.py), through the per-request cap."""

        def _prepare(self, q, attempt):
            p = super()._prepare(q, attempt)
            if p.request is not None:
                p.request.max_new_tokens = lengths.get(q.id, 13)
            return p

    cfg = RunConfig(data_path=str(INPUTS / "data"), qa_file=str(INPUTS / "data" / "QA_bench.json"), format="html",
                    run_dir=run_dir, max_new_tokens=1024, max_reasks=0, score=False, device=f"cuda:{local}")
    t1 = time.time()
    s = ScriptedJob(cfg, backend=backend, progress=False).execute()
    own = Path(run_dir, f"samples.rank{local}.jsonl")
    own = own if own.is_file() else Path(run_dir, "samples.jsonl")
    Path(run_dir, f"bench.rank{local}.json").write_text(json.dumps(
        {"build_s": round(build_s, 1), "run_s": round(time.time() - t1, 1), "verdict": s["verdict"],
         "records": sum(1 for x in own.read_text().splitlines()[1:] if x.strip())}))


def run_config(n: int, root: Path) -> dict:
    from hitbench_utils.status import summarize

    run_dir = root / f"dp{n}"
    procs = []
    t0 = time.time()
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r))   # n=1: the plain one-GPU path
        procs.append(subprocess.Popen([sys.executable, "-u", __file__, "--child", str(run_dir)], env=env))
    codes = [p.wait() for p in procs]
    wall = time.time() - t0
    ranks = [json.loads((run_dir / f"bench.rank{r}.json").read_text()) for r in range(n)
             if (run_dir / f"bench.rank{r}.json").is_file()]
    s = summarize(run_dir)
    return {"gpus": n, "wall_s": round(wall, 1), "returncodes": codes, "ranks": ranks, "verdict": s["verdict"],
            "ok": s["ok"], "total": s["total"], "max_build_s": max(r["build_s"] for r in ranks) if ranks else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--root", default="/tmp/dp_bench")
    a = ap.parse_args()
    if a.child:
        child(a.child)
        return 0
    import torch

    root = Path(a.root)
    if root.exists():
        import shutil

        shutil.rmtree(root)
    one = run_config(1, root)
    two = run_config(torch.cuda.device_count(), root)
    result = {"device": f"{torch.cuda.device_count()}x {device_name()}", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "date": time.strftime("%Y-%m-%d"),
              "subset_size": one["total"], "one_gpu": one, "all_gpus": two,
              "speedup": round(one["wall_s"] / two["wall_s"], 2),
              "speedup_excluding_build": round((one["wall_s"] - one["max_build_s"]) / (two["wall_s"] - two["max_build_s"]), 2)}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"dp-{result['date']}-{result['device'].replace(' ', '-')}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
