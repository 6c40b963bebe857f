"""Issue 15: end-to-end speed through the notebook's own run path, against the seed-style loop.

    python bench/e2e_gpu.py --prepare                 # here (CPU): seeded samples of whole tables -> .device/e2e
    python bench/e2e_gpu.py --out bench/results       # on one GPU, .device/ sent along
    python bench/e2e_gpu.py --whole text_latex ...    # that setting whole (--prepare --whole first), the rest sampled
    python bench/e2e_gpu.py --smoke                   # a CPU check of the same path (tiny model, 2 tables)
    python bench/e2e_gpu.py --merge OUT.json A.json B.json   # one result file from several GPU calls

Each setting (text_html with the default templates, text_html with ``prompts="instruction-first"``,
text_latex) runs ``Job(...).execute()`` on a run folder, as the notebook does, with the 8B architecture
(random bf16 weights, real Qwen BPE). Output lengths are scripted per id from the real model's answers
(``output_tokens.json``, clipped to max_new_tokens=1024; the median, 13, for ids it lacks) through
``Job.request_hook``. The sample is a seeded uniform random sample of whole tables (every question on
each), at least 60 tables and 300 questions per format. The seed-style loop (batch 1, sequential,
eager ``generate``, the same prompts: ``share_prefix=False, batch_size=1`` through the same ``Job``)
runs in the same call, after every setting's engine run, on a seeded uniform sub-sample of the questions
(the result file is rewritten after each run, so a call cut short keeps what it measured). Wall time
excludes model build (stated apart) and includes everything ``execute`` does: preparing prompts,
generation, the run log. A run longer than one GPU command may last runs in the background
(``setsid nohup``) and is polled by the commands that follow.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import INPUTS, build_random_8b, device_name, prepare, realhitbench_dir, shared_dir  # noqa: E402

ROOT = INPUTS / "e2e"
WHOLE = INPUTS / "e2e_whole"       # every table of html and latex, packed (``--prepare --whole``)
MAX_NEW, MEDIAN_OUT = 1024, 13
SETTINGS = {"text_latex": ("latex", "default"), "text_html": ("html", "default"),
            "text_html_instruction_first": ("html", "instruction-first")}
EXT = {"html": "html", "latex": "txt"}


def do_prepare(min_tables: int, min_questions: int, seed_questions: int, seed: int, whole: bool = False) -> None:
    """Whole tables drawn uniformly (seeded) from those each format can run, until both minimums hold;
    with ``whole``, every table (the whole setting), packed as ``data.tar.xz`` to fit what a GPU job
    can carry (html alone is 93 MB as files)."""
    from hitbench_utils import data as D
    from hitbench_utils.pairing import SWAP_SUFFIX  # SC questions read the swapped table

    data = realhitbench_dir()
    qs = D.load_queries(data / "QA_final.json")
    raw = json.loads((shared_dir() / "bench" / "output_tokens.json").read_text())
    root = WHOLE if whole else ROOT
    if root.exists():
        shutil.rmtree(root)
    meta: dict = {"seed": seed, "max_new_tokens": MAX_NEW, "median_out": MEDIAN_OUT, "formats": {}}
    for fmt in ("html", "latex"):
        by_file = runnable_tables(data, qs, fmt)
        order = sorted(by_file)
        random.Random(seed).shuffle(order)
        chosen, n = [], 0
        for f in order:
            if not whole and len(chosen) >= min_tables and n >= min_questions:
                break
            chosen.append(f)
            n += len(by_file[f])
        ids = sorted(q.id for f in chosen for q in by_file[f])
        scripted = {int(k): min(int(v), MAX_NEW) for k, v in raw[f"text_{fmt}"].items()}
        lengths = {i: scripted.get(i, MEDIAN_OUT) for i in ids}
        seed_ids = sorted(random.Random(seed + 1).sample(ids, min(seed_questions, len(ids))))
        by_id = {q.id: q.raw for q in qs}
        prepare(files={fmt: [f"{f}{s}.{EXT[fmt]}" for f in chosen for s in ("", SWAP_SUFFIX)]}, qa={f"QA_{fmt}.json": [by_id[i] for i in ids]},
                root=root)
        meta["formats"][fmt] = {"tables": len(chosen), "questions": len(ids), "ids": ids, "seed_style_ids": seed_ids,
                                "lengths": lengths, "missing_lengths": sum(i not in scripted for i in ids),
                                "full_questions": sum(len(v) for v in by_file.values()),
                                "full_tables": len(by_file), "output_tokens": sum(lengths.values())}
        print(f"{fmt}: {len(ids)} questions on {len(chosen)} tables (of {len(by_file)} tables, "
              f"{meta['formats'][fmt]['full_questions']} questions), {meta['formats'][fmt]['missing_lengths']} ids "
              f"without a scripted length (median {MEDIAN_OUT}), {sum(lengths.values())} output tokens; "
              f"seed-style sub-sample {len(seed_ids)}")
    meta["whole"] = whole
    (root / "meta.json").write_text(json.dumps(meta))
    if whole:
        import tarfile

        with tarfile.open(root / "data.tar.xz", "w:xz") as tar:
            tar.add(root / "data", arcname="data")
        shutil.rmtree(root / "data")
        print(f"packed: {(root / 'data.tar.xz').stat().st_size / 2**20:.1f} MiB")


def data_root(root: Path, work: Path) -> Path:
    """The folder holding ``data/``: the prepared one, or ``work`` once a packed whole setting is unpacked there."""
    packed = root / "data.tar.xz"
    if not packed.exists():
        return root
    if not (work / "data").is_dir():
        import tarfile

        work.mkdir(parents=True, exist_ok=True)
        with tarfile.open(packed) as tar:
            tar.extractall(work, filter="data")
    return work


def runnable_tables(data: Path, qs: list, fmt: str) -> dict[str, list]:
    """The questions of each table that ``fmt`` can read (a missing file or an LFS stub makes error
    records in a full run, never timings)."""
    from hitbench_utils import data as D

    ok: dict[str, bool] = {}
    for q in qs:
        if q.file_name not in ok:
            try:
                D.read_table(data, fmt, q.file_name)
                ok[q.file_name] = True
            except Exception:  # noqa: BLE001
                ok[q.file_name] = False
    by_file: dict[str, list] = defaultdict(list)
    for q in qs:
        if ok[q.file_name]:
            by_file[q.file_name].append(q)
    return by_file


def run_job(backend, fmt: str, prompts: str, ids: list[int], lengths: dict, run_dir: Path, seed_style: bool,
            smoke: bool, root: Path = ROOT) -> dict:
    """One ``Job.execute`` on a fresh run folder; its wall time, engine stats and per-record times."""
    from hitbench_utils.config import RunConfig
    from hitbench_utils.run import Job
    from hitbench_utils.runlog import read_log, view

    def script(req):
        req.max_new_tokens = min(lengths.get(str(req.key), MEDIAN_OUT), 8 if smoke else MAX_NEW)
        return req

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = RunConfig(data_path=str(root / "data"), qa_file=str(root / "data" / f"QA_{fmt}.json"), format=fmt,
                    prompts=prompts, run_dir=str(run_dir), max_new_tokens=MAX_NEW, max_reasks=0, score=False,
                    device="cpu" if smoke else "cuda", ids=ids, share_prefix=not seed_style,
                    batch_size=1 if seed_style else 4, max_input_tokens=8_000 if smoke else 100_000)
    job = Job(cfg, backend=backend, progress=False, request_hook=script)
    sync()
    t0 = time.perf_counter()
    summary = job.execute()
    sync()
    wall = time.perf_counter() - t0
    recs = list(view(read_log(run_dir).records).values())
    out = {"wall_s": round(wall, 2), "verdict": summary["verdict"], "records": len(recs),
           "ok": sum(r["status"] == "ok" for r in recs), "output_tokens": sum(r.get("output_tokens") or 0 for r in recs),
           "prepare_s": round(sum(r.get("prepare_s") or 0 for r in recs), 2),
           "input_tokens": sum(r.get("input_tokens_sent") or 0 for r in recs),
           "truncated": sum(bool(r.get("truncated")) for r in recs),
           "prepare_wait_s": round(job.prepare_wait_s, 2),
           "prepare_wait_first_pull_s": round(job.prepare_wait_first_s, 2),
           "prefix_fallbacks": sum(any(isinstance(d, dict) and d.get("kind") == "prefix_fallback"
                                       for d in r.get("degraded") or []) for r in recs)}
    st = getattr(job.engine, "stats", None)
    if st:
        out["engine"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items()
                         if not isinstance(v, list)}
        out["engine"]["pools"] = st["pools"]
        out["engine"]["largest_suffix_passes"] = sorted(st["suffix_times"], key=lambda x: -x[2])[:5]
        out["engine"]["prefix_times"] = st["prefix_times"]
    return out


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prefill_ideal_s(prefix_times: list, ceiling: dict | None) -> float | None:
    """The prefill's time at the measured ceilings: each prefix's projections and MLP at the matmul rate,
    its causal attention at the flash-attention rate (an estimate that explains the measured figure)."""
    if not ceiling or "linear_flop_per_token" not in ceiling:
        return None
    mm, fa = ceiling["matmul_8192_tflops"] * 1e12, ceiling["flash_causal_tflops"] * 1e12
    lengths = [P for ps, _ in prefix_times for P in ps]        # each pass's prefix lengths (one, or a pack)
    return round(sum(P * ceiling["linear_flop_per_token"] / mm + ceiling["attention_flop_per_token_sq"] * P * P / fa
                     for P in lengths), 2)


def setting_result(name: str, fmt_meta: dict, eng: dict, seed: dict | None, ceiling: dict | None = None) -> dict:
    e = eng.get("engine", {})
    parts = {"prefill": e.get("prefill_s", 0), "suffixes": e.get("suffix_s", 0), "decode": e.get("decode_s", 0),
             "capture": e.get("capture_s", 0), "preparation_wait": eng["prepare_wait_s"]}
    parts["other"] = round(eng["wall_s"] - sum(parts.values()), 2)
    q = eng["records"]
    res = {"questions": q, "tables": fmt_meta["tables"], "wall_s": eng["wall_s"],
           "full_questions": fmt_meta["full_questions"],
           "full_run_min": round(eng["wall_s"] * fmt_meta["full_questions"] / q / 60, 2),
           "breakdown": {k: round(v, 2) for k, v in parts.items()},
           "prefill_tok_s": round(e["prefix_tokens"] / e["prefill_s"]) if e.get("prefill_s") else None,
           "prefill_ideal_s": prefill_ideal_s(e.get("prefix_times", []), ceiling),
           "prefix_groups": e.get("groups"), "prefix_tokens": e.get("prefix_tokens"),
           "rows_per_step": e.get("rows_per_step"), "drain_step_share": e.get("drain_step_share"),
           "drain_s": e.get("drain_s"), "decode_steps": e.get("decode_steps"),
           "prefix_fallbacks": eng.get("prefix_fallbacks"), "prefix_room_frees": e.get("prefix_room_frees"),
           "prefix_retries": e.get("prefix_retries"),
           "verdict": eng["verdict"], "ok": eng["ok"], "output_tokens": eng["output_tokens"],
           "input_tokens": eng["input_tokens"], "engine_run": eng}
    if seed:
        res.update(seed_style_s=seed["wall_s"], seed_style_questions=seed["records"],
                   ratio_vs_seed_style=round((seed["wall_s"] / seed["records"]) / (eng["wall_s"] / q), 2),
                   seed_style_run=seed)
    return derived(res)


def derived(res: dict) -> dict:
    """Figures over the questions that were generated (``ok``): a record that failed before generation
    (a missing input) costs no GPU time, so counting it would flatter the per-question figures. Also
    the fixed-tails estimate: drain steps and graph capture counted once, the rest scaled."""
    run, n = res["engine_run"], res["ok"]
    if not n:
        return res
    scale = res["full_questions"] / n
    fixed = (res.get("drain_s") or 0) + res["breakdown"]["capture"]
    res["generated"] = {"questions": n, "not_generated": run["records"] - n,
                        "full_run_min": round(res["wall_s"] * scale / 60, 2),
                        "full_run_min_fixed_tails_estimate": round(((res["wall_s"] - fixed) * scale + fixed) / 60, 2)}
    seed = res.get("seed_style_run")
    if seed and seed.get("ok"):
        res["generated"]["seed_style_s_per_question"] = round(seed["wall_s"] / seed["ok"], 3)
        res["generated"]["ratio_vs_seed_style"] = round((seed["wall_s"] / seed["ok"]) / (res["wall_s"] / n), 2)
    return res


def _median_s(fn, n: int = 20) -> float:
    """Median of ``n`` timed calls (CUDA events), after warm-up."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def ceilings(model) -> dict:
    """What this GPU does at best: a bf16 8192^3 matmul, and causal flash attention (32 query heads on
    8 KV heads, head size 128, 32K tokens) as the model's prefill calls it; with the 8B's FLOP per
    prefill token (2 x its decoder layers' projection and MLP weights) and per token squared (causal
    attention: 2 x 36 layers x 4096)."""
    import torch
    import torch.nn.functional as F

    from hitbench_utils.engine.attention import text_model

    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = 2 * n ** 3 / _median_s(lambda: a @ b)
    del a, b
    L = 32768
    q = torch.randn(1, 32, L, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    fa = 2 * L * L * 32 * 128 / _median_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 5)
    del q, k, v
    tm = text_model(model)
    linear = 2 * sum(m.weight.numel() for m in tm.layers.modules() if isinstance(m, torch.nn.Linear))
    attn = 2 * len(tm.layers) * tm.config.num_attention_heads * 128
    return {"matmul_8192_tflops": round(mm / 1e12, 1), "flash_causal_tflops": round(fa / 1e12, 1),
            "linear_flop_per_token": linear, "attention_flop_per_token_sq": attn,
            "prefill_tok_s_ceiling_linear_only": round(mm / linear)}


def merge(out: Path, calls: list[Path]) -> None:
    """One result file from several GPU calls (GPU time comes in calls of at most 10 minutes): each
    setting and each check from the last call that measured it, named by its ``call`` (file), so every
    ratio still pairs an engine run with the seed-style loop of the same call."""
    result: dict = {"calls": {}}
    for path in calls:
        r = json.loads(path.read_text())
        result["calls"][path.name] = {k: r[k] for k in ("date", "model_build_s", "settings") if k in r}
        for k, v in r.items():
            if k not in ("missing_lengths", "ceiling", "exactness_bf16", *SETTINGS):
                continue         # prose an earlier file carried, and each call's own metadata (above)
            if isinstance(v, dict) and "engine_run" in v:
                v = derived(v)
            result[k] = dict(v, call=path.name) if isinstance(v, dict) and k != "missing_lengths" else v
    result["device"] = json.loads(calls[-1].read_text())["device"]
    result["targets"] = {}
    for name, key, op, bound in TARGETS:         # the targets, against the per-generated figures
        got = (result.get(name, {}).get("generated") or {}).get(key)
        met = got is not None and (got <= bound if op == "<=" else got >= bound)
        result["targets"][f"{name}: {key} {op} {bound}"] = {"measured": got, "met": met,
                                                           "call": result.get(name, {}).get("call")}
    out.write_text(json.dumps(result, indent=1))


TARGETS = [("text_html", "full_run_min", "<=", 12), ("text_html", "ratio_vs_seed_style", ">=", 15),
           ("text_html_instruction_first", "full_run_min", "<=", 25), ("text_latex", "full_run_min", "<=", 4)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--tables", type=int, default=60)
    ap.add_argument("--questions", type=int, default=300)
    ap.add_argument("--seed-questions", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seed-style", default=",".join(SETTINGS),
                    help="settings that also run the seed-style loop, in this order; a setting named again runs "
                         "it again (the ratio takes its first run; the others go to seed_style_repeats)")
    ap.add_argument("--no-checks", action="store_true", help="skip the matmul ceiling and the logits check")
    ap.add_argument("--tag", default="")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default="/tmp/e2e_bench")
    ap.add_argument("--whole", nargs="?", const=",".join(SETTINGS), default="",
                    help="settings run whole, not sampled (all if none named; --prepare --whole first)")
    ap.add_argument("--oom-snapshot", action="store_true",
                    help="record live allocations; at an OOM, write what holds the memory (OUT/<stem>-oom.json)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="OUT.json CALL.json ...: one file from several calls")
    a = ap.parse_args()
    if a.merge:
        merge(Path(a.merge[0]), [Path(x) for x in a.merge[1:]])
        return 0
    if a.prepare:
        do_prepare(a.tables, a.questions, a.seed_questions, a.seed, a.whole)
        return 0
    import torch
    import transformers

    names = a.settings.split(",")
    whole = {n for n in names if n in a.whole.split(",")}
    checks = not a.smoke and not a.no_checks
    source = {n: WHOLE if n in whole else ROOT for n in names}          # each setting's prepared inputs
    metas = {p: json.loads((p / "meta.json").read_text()) for p in {*source.values(), *([ROOT] if checks else [])}}
    roots = {p: data_root(p, Path(a.work) / "inputs") for p in metas}
    t0 = time.time()
    if a.smoke:
        from hitbench_utils.backends.hf import HFBackend
        from hitbench_utils.backends.tiny import tiny_model_dir

        backend = HFBackend(tiny_model_dir(), device="cpu")
    else:
        backend, _ = build_random_8b(INPUTS / "qwen2")
    build_s = time.time() - t0
    device = device_name() + (" (smoke: tiny model, CPU)" if a.smoke else "")
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "model_build_s": round(build_s, 1),
              "settings": {"model": "Qwen3-VL-8B architecture, random bf16 weights, real Qwen BPE",
                           "torch": torch.__version__, "transformers": transformers.__version__,
                           "attn_implementation": "sdpa", "max_new_tokens": MAX_NEW, "max_input_tokens": 100_000,
                           "max_reasks": 0, "score": False, "greedy": True,
                           "sample": "per setting (its 'sample'): the whole setting (every table its format can read, "
                                     "every question on each), or a seeded uniform random sample of whole tables, every "
                                     f"question on each, >= {a.tables} tables and >= {a.questions} questions",
                           "output_lengths": f"scripted per id from output_tokens.json, clipped to {MAX_NEW}; the "
                                             f"median ({MEDIAN_OUT}) for ids it lacks (count per setting below)",
                           "seed_style": "the same Job with share_prefix=False, batch_size=1: batch 1, sequential, "
                                         "eager generate, the same prompts, on a seeded uniform sub-sample; run in "
                                         "the same call, after every setting's engine run",
                           "full_run_min": "wall_s x full questions / sample questions / 60 (conservative: each "
                                           "slot pool's last long answers are a fixed cost)"},
              "missing_lengths": {n: metas[p]["formats"][SETTINGS[n][0]]["missing_lengths"] for n, p in source.items()}}
    if a.oom_snapshot:
        from bench.memory_watch import watch

        watch(Path(a.out) / f"e2e-{time.strftime('%Y-%m-%d')}{a.tag}-oom.json")
        result["settings"]["memory_history"] = "on: allocations record their Python stacks (a small cost each)"
    if checks:
        result["ceiling"] = ceilings(backend.model)
        from bench.e2e_exact import logits_check

        result["exactness_bf16"] = logits_check(backend, roots[ROOT], metas[ROOT])
    stem = f"e2e-{result['date']}-{device.split(' (')[0].replace(' ', '-')}" + ("-smoke" if a.smoke else "") + a.tag
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)

    def inputs(name: str) -> tuple[str, str, dict, dict, Path]:
        """A setting's format, templates, prepared questions, scripted lengths and data folder."""
        fmt, prompts = SETTINGS[name]
        m = metas[source[name]]["formats"][fmt]
        return fmt, prompts, m, {str(k): v for k, v in m["lengths"].items()}, roots[source[name]]

    seeds: dict[str, list[dict]] = {}      # each setting's seed-style runs, in order

    def record(name: str, m: dict, eng: dict) -> None:
        runs = seeds.get(name, [])
        result[name] = dict(setting_result(name, m, eng, runs[0] if runs else None, result.get("ceiling")),
                            sample="whole setting" if name in whole else "seeded sample of whole tables")
        if len(runs) > 1:
            result[name]["seed_style_repeats"] = [{k: r[k] for k in ("wall_s", "records", "order")} for r in runs[1:]]
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))      # kept if a later step dies

    engine_runs: dict[str, dict] = {}
    for name in names:             # every engine run first: a call cut short keeps them all
        fmt, prompts, m, lengths, root = inputs(name)
        ids = m["ids"][:12] if a.smoke else m["ids"]
        eng = engine_runs[name] = run_job(backend, fmt, prompts, ids, lengths, work / name, False, a.smoke, root)
        print(name, "engine", json.dumps({k: v for k, v in eng.items() if k != "engine"}), flush=True)
        record(name, m, eng)
    order = [n for n in a.seed_style.split(",") if n in names]
    for i, name in enumerate(order):    # the loops' order is stated: call 858c1a4's loops disagreed
        fmt, prompts, m, lengths, root = inputs(name)
        sids = m["seed_style_ids"][:3] if a.smoke else m["seed_style_ids"]
        seed = run_job(backend, fmt, prompts, sids, lengths, work / f"{name}_seed", True, a.smoke, root)
        seed["order"] = i + 1            # its place among the call's seed-style loops
        seeds.setdefault(name, []).append(seed)
        print(name, "seed-style", json.dumps({k: v for k, v in seed.items() if k != "engine"}), flush=True)
        record(name, m, engine_runs[name])
    for name in names:
        r = result[name]
        print(f"== {name} ({r['sample']}): {r['questions']} q on {r['tables']} tables, {r['wall_s']} s -> full run "
              f"{r['full_run_min']} min; ratio {r.get('ratio_vs_seed_style')}; breakdown {r['breakdown']}; "
              f"prefill {r['prefill_tok_s']} tok/s; fallbacks {r['prefix_fallbacks']}, prefix room frees "
              f"{r['prefix_room_frees']}, prefix retries {r['prefix_retries']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
