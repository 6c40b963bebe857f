"""Issue 8: data parallel over the GPUs of one host against one GPU, on the same subset, in one call.

    python bench/dp_gpu.py --prepare --tables 50 --seed 0   # here (CPU): a random sample of whole tables
    python bench/dp_gpu.py --out bench/results             # on a machine with 2+ GPUs, .device/ sent along
    python bench/dp_gpu.py --smoke --gpus 1,2               # a CPU check of the same path, tiny model

The subset is a uniform random sample of the text_html tables, each
with all its questions, so prefix sharing and the mix of table sizes are those of a full run; output
lengths are scripted from the real model's answers. Each configuration runs the real data-parallel path:
N worker processes (RANK/WORLD_SIZE/LOCAL_RANK set as the launcher sets them; N=1 is the plain one-GPU
run), each with the 8B architecture (random bf16 weights) on its own GPU, claiming work from the run's
work list and appending to its own log. Wall time runs from spawning the workers to the last one's exit;
model build is timed apart, per rank, and a speedup without it is given too.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import INPUTS, build_random_8b, device_name, prepare, realhitbench_dir, shared_dir  # noqa: E402

SUBSET = INPUTS / "dp"
QA = "QA_dp.json"


def do_prepare(n_tables: int, seed: int) -> None:
    """Whole text_html tables drawn uniformly (seeded) from those it can run, every question on each;
    output lengths scripted per id from the real model's answers (``output_tokens.json``)."""
    from bench.e2e_gpu import runnable_tables
    from hitbench_utils import data as D
    from hitbench_utils.pairing import SWAP_SUFFIX  # SC questions read the swapped table

    data = realhitbench_dir()
    qs = D.load_queries(data / "QA_final.json")
    by_file = runnable_tables(data, qs, "html")
    chosen = random.Random(seed).sample(sorted(by_file), n_tables)
    ids = sorted(q.id for f in chosen for q in by_file[f])
    raw = json.loads((shared_dir() / "bench" / "output_tokens.json").read_text())["text_html"]
    by_id = {q.id: q.raw for q in qs}
    if SUBSET.exists():
        import shutil

        shutil.rmtree(SUBSET)
    prepare(files={"html": [f"{f}{s}.html" for f in chosen for s in ("", SWAP_SUFFIX)]}, qa={QA: [by_id[i] for i in ids]},
            extra={"meta.json": {"seed": seed, "tables": sorted(chosen), "subset_ids": ids,
                                 "lengths": {i: min(int(raw.get(str(i), 13)), 1024) for i in ids}}},
            root=SUBSET)
    print(f"subset: {len(ids)} queries on {n_tables} tables (seed {seed})")


def child(run_dir: str, smoke: bool) -> None:
    """One rank: build the model on this rank's GPU, then the ordinary worker path (Job.execute)."""
    import torch

    from hitbench_utils.config import RunConfig
    from hitbench_utils.run import Job

    local = int(os.environ["LOCAL_RANK"])
    device = "cpu" if smoke else f"cuda:{local}"
    if not smoke:
        torch.cuda.set_device(local)
    t0 = time.time()
    if smoke:
        from hitbench_utils.backends.hf import HFBackend
        from hitbench_utils.backends.tiny import tiny_model_dir

        backend = HFBackend(tiny_model_dir(), device="cpu")
    else:
        backend, _ = build_random_8b(INPUTS / "qwen2", device=device)
    build_s = time.time() - t0
    meta = json.loads((SUBSET / "meta.json").read_text())
    lengths = {int(k): v for k, v in meta["lengths"].items()}

    def scripted(req):
        """Output lengths scripted per id, through the per-request cap (the run's public seam)."""
        req.max_new_tokens = min(lengths.get(req.key, 13), 16) if smoke else lengths.get(req.key, 13)
        return req

    cfg = RunConfig(data_path=str(SUBSET / "data"), qa_file=str(SUBSET / "data" / QA), format="html",
                    run_dir=run_dir, max_new_tokens=1024, max_reasks=0, score=False, device=device,
                    limit=24 if smoke else None, max_input_tokens=20_000 if smoke else 100_000)
    t1 = time.time()
    job = Job(cfg, backend=backend, progress=False, request_hook=scripted)
    s = job.execute()
    stats = getattr(getattr(job, "engine", None), "stats", {})
    own = Path(run_dir, f"samples.rank{local}.jsonl")
    own = own if own.is_file() else Path(run_dir, "samples.jsonl")
    Path(run_dir, f"bench.rank{local}.json").write_text(json.dumps(
        {"build_s": round(build_s, 1), "run_s": round(time.time() - t1, 1), "verdict": s["verdict"],
         "records": sum(1 for x in own.read_text().splitlines()[1:] if x.strip()),
         "engine": {k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()
                    if not isinstance(v, list)} | {"pools": len(stats.get("pools", []))}}))


def run_config(n: int, root: Path, smoke: bool) -> dict:
    from hitbench_utils.status import summarize

    run_dir = root / f"dp{n}"
    procs = []
    t0 = time.time()
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r))   # n=1: the plain one-GPU path
        argv = [sys.executable, "-u", __file__, "--child", str(run_dir)] + (["--smoke"] if smoke else [])
        procs.append(subprocess.Popen(argv, env=env))
    codes = [p.wait() for p in procs]
    wall = time.time() - t0
    ranks = [json.loads((run_dir / f"bench.rank{r}.json").read_text()) for r in range(n)
             if (run_dir / f"bench.rank{r}.json").is_file()]
    claims = defaultdict(int)
    if (run_dir / "claims.jsonl").is_file():
        for line in (run_dir / "claims.jsonl").read_text().splitlines():
            claims[json.loads(line)["rank"]] += 1
    s = summarize(run_dir)
    build = max(r["build_s"] for r in ranks) if ranks else None
    return {"gpus": n, "wall_s": round(wall, 1), "returncodes": codes, "ranks": ranks, "claims_per_rank": dict(claims),
            "verdict": s["verdict"], "ok": s["ok"], "total": s["total"], "max_build_s": build,
            "build_share": round(build / wall, 3) if build is not None else None}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--tables", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None)
    ap.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, 24 queries (a logic check)")
    ap.add_argument("--gpus", default=None, help="process counts to run, e.g. 1,2 (default: 1 and all GPUs)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--root", default="/tmp/dp_bench")
    a = ap.parse_args()
    if a.prepare:
        do_prepare(a.tables, a.seed)
        return 0
    if a.child:
        child(a.child, a.smoke)
        return 0
    import shutil

    import torch

    root, out = Path(a.root), Path(a.out)
    shutil.rmtree(root, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in a.gpus.split(",")] if a.gpus else [1, torch.cuda.device_count()]
    meta = json.loads((SUBSET / "meta.json").read_text())
    device = f"{max(counts)}x {device_name()}" + (" (smoke: tiny model, CPU)" if a.smoke else "")
    result = {"device": device, "torch": torch.__version__, "transformers": __import__("transformers").__version__,
              "date": time.strftime("%Y-%m-%d"), "subset": {"seed": meta["seed"], "tables": len(meta["tables"]),
                                                            "queries": len(meta["subset_ids"])}, "configs": []}
    stem = f"dp-{result['date']}-{device.split(' (')[0].replace(' ', '-')}" + ("-smoke" if a.smoke else "")
    for n in counts:
        result["configs"].append(run_config(n, root, a.smoke))
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))    # kept even if a later config dies
        print(json.dumps(result["configs"][-1], indent=1), flush=True)
    if len(result["configs"]) >= 2:
        one, many = result["configs"][0], result["configs"][-1]
        result["speedup"] = round(one["wall_s"] / many["wall_s"], 2)
        result["speedup_excluding_build"] = round((one["wall_s"] - one["max_build_s"]) / (many["wall_s"] - many["max_build_s"]), 2)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        print(f"speedup {result['speedup']}x ({result['speedup_excluding_build']}x without model build)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
