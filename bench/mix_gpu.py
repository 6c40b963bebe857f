"""Issue 6 on the GPU: mix_html with rendered table images on the 8B architecture (random weights).

For max_pixels at the processor default (16,777,216) and two smaller budgets, each of 40 mix_html
queries is prefilled (one new token): image tokens, prefill time and peak memory are recorded. Then the
image size the old scripts logged as "OOM: Image too large" (1814×3920) runs at the default budget.

    python bench/mix_gpu.py --prepare      # here: render the images, copy inputs into .device/
    python bench/mix_gpu.py --out bench/results     # on the GPU machine, with .device/ sent along
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import INPUTS, build_random_8b, device_name, prepare, realhitbench_dir, shared_dir  # noqa: E402

BUDGETS = [None, 4_194_304, 1_048_576]
SEED_OOM_SIZE = (1814, 3920)


def do_prepare(n: int) -> None:
    from hitbench_utils import data as D
    from hitbench_utils.render_all import render_dataset

    shared = shared_dir()
    data = realhitbench_dir(shared)
    qs = [q for q in D.load_queries(data / "QA_final.json")
          if D.table_path(data, "html", q.file_name).is_file() and not D.is_lfs_pointer(D.table_path(data, "html", q.file_name))]
    picked = qs[::len(qs) // n][:n]
    names = sorted({q.file_name for q in picked})
    r = render_dataset(data, INPUTS / "data" / "image", names=names, progress=False)
    ok = json.loads((INPUTS / "data" / "image" / "manifest.json").read_text())
    picked = [q for q in picked if ok.get(q.file_name, {}).get("ok")]
    from PIL import Image

    big = max(picked, key=lambda q: ok[q.file_name]["pixels"])
    Image.open(INPUTS / "data" / "image" / f"{big.file_name}.png").convert("RGB").resize(SEED_OOM_SIZE).save(
        INPUTS / "data" / "image" / "seed-oom-1814x3920.png")
    items = [q.raw for q in picked]
    items.append(dict(big.raw, id=100_000, FileName="seed-oom-1814x3920"))
    import shutil
    (INPUTS / "data" / "html").mkdir(parents=True, exist_ok=True)
    shutil.copy2(D.table_path(data, "html", big.file_name), INPUTS / "data" / "html" / "seed-oom-1814x3920.html")
    prepare(shared, files={"html": [f"{n}.html" for n in names]}, qa={"QA_mix.json": items})
    print(f"{len(picked)} queries on {len(names)} tables, rendered {r}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("-n", type=int, default=40)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    if a.prepare:
        do_prepare(a.n)
        return 0
    import torch

    from hitbench_utils.backends.base import GenSettings
    from hitbench_utils.config import RunConfig
    from hitbench_utils.run import Job

    backend, build_s = build_random_8b(INPUTS / "qwen2")
    settings = GenSettings(max_new_tokens=1)
    rows = []
    for budget in BUDGETS:
        cfg = RunConfig(data_path=str(INPUTS / "data"), qa_file=str(INPUTS / "data" / "QA_mix.json"), modality="mix",
                        format="html", run_dir=f"/tmp/mix_{budget}", max_pixels=budget, max_reasks=0, score=False)
        job = Job(cfg, backend=backend, progress=False)
        header = job.header()
        prep = job.preparer()
        for q in job.queries:
            p = prep.prepare(q, 1)
            row = {"max_pixels": budget or "default (16,777,216)", "id": q.id, "file": q.file_name,
                   "image_size": p.record.image_size, "image_size_sent": p.record.image_size_sent,
                   "image_tokens": p.record.image_tokens, "input_tokens": p.record.input_tokens_sent,
                   "attn": header["fingerprint"]["attn_implementation"]}
            if p.request is None:
                row["error"] = p.record.error
            else:
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                try:
                    backend.generate([p.request], settings)
                    torch.cuda.synchronize()
                    row["prefill_s"] = round(time.perf_counter() - t0, 3)
                except Exception as e:  # noqa: BLE001
                    row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append(row)
    summary = []
    for budget in BUDGETS:
        rs = [r for r in rows if r["max_pixels"] == (budget or "default (16,777,216)") and r["id"] != 100_000 and "prefill_s" in r]
        summary.append({"max_pixels": budget or 16_777_216, "queries": len(rs),
                        "image_tokens_median": statistics.median(r["image_tokens"] for r in rs),
                        "image_tokens_max": max(r["image_tokens"] for r in rs),
                        "prefill_s_median": round(statistics.median(r["prefill_s"] for r in rs), 3),
                        "prefill_s_total": round(sum(r["prefill_s"] for r in rs), 2),
                        "peak_gib_max": max(r["peak_gib"] for r in rs),
                        "errors": sum("error" in r for r in rows if r["max_pixels"] == (budget or "default (16,777,216)"))})
    seed_case = [r for r in rows if r["id"] == 100_000]
    result = {"device": device_name(), "torch": torch.__version__, "model_build_s": round(build_s, 1),
              "attn_implementation": backend.info["attn_implementation"], "summary": summary,
              "seed_oom_image": seed_case, "rows": rows}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mix-{time.strftime('%Y-%m-%d')}-{device_name().replace(' ', '-')}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
