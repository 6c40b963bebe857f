"""Issue 5: our engine against the seed-style loop on the GPU, on the same stratified text_html subset.

    python bench/throughput.py --prepare          # here (CPU): token counts of all 3,071 prompts, the
                                                   # subset, scripted output lengths -> .device/
    python bench/throughput.py --out bench/results          # on the GPU machine, with .device/ sent along

Both loops send identical, identically truncated prompts (built by the run's own preparation code) to
the 8B architecture with random weights and the real Qwen BPE. Output lengths are scripted per id from
the real model's answers (clipped to max_new_tokens; the median, 13, where the original run had none),
so batches finish as they would with the real model.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import INPUTS, build_random_8b, device_name, prepare, realhitbench_dir, shared_dir  # noqa: E402

MAX_NEW = 1024
MEDIAN_OUT = 13


def scripted_lengths(setting: str) -> tuple[dict[int, int], int]:
    raw = json.loads((shared_dir() / "bench" / "output_tokens.json").read_text())[setting]
    return {int(k): min(int(v), MAX_NEW) for k, v in raw.items()}, 0


def do_prepare(n_tables: int, seed: int) -> None:
    """Token counts of every text_html and text_latex prompt (real tokenizer, max 100K), and a subset."""
    from hitbench_utils import data as D
    from hitbench_utils.prompts import build_prompt, load_templates
    from hitbench_utils.tokenization import qwen_bpe_from_files, shared_tokenizer_dir
    from hitbench_utils.backends.tiny import chat_template

    data = realhitbench_dir()
    tok = qwen_bpe_from_files(shared_tokenizer_dir())
    tok.chat_template = chat_template()
    t = load_templates()
    qs = D.load_queries(data / "QA_final.json")
    meta: dict[str, list] = {}
    for fmt in ("html", "latex"):
        lengths, _ = scripted_lengths(f"text_{fmt}")
        table_tokens: dict[str, int | None] = {}
        rows = []
        for q in qs:
            if q.file_name not in table_tokens:
                try:
                    table_tokens[q.file_name] = len(tok(D.read_table(data, fmt, q.file_name), add_special_tokens=False)["input_ids"])
                except Exception:  # missing / LFS stub: the run makes an error record, no GPU work
                    table_tokens[q.file_name] = None
            tt = table_tokens[q.file_name]
            if tt is None:
                continue
            p = build_prompt(t, q, "text", fmt, "")
            over = len(tok.apply_chat_template(p.messages(table=""), tokenize=True, add_generation_prompt=True))
            suffix = len(tok(p.suffix, add_special_tokens=False)["input_ids"])
            prompt = min(100_000, over + tt)
            rows.append({"id": q.id, "file": q.file_name, "group": f"{q.file_name}|{t.share_key(q)}",
                         "prompt_tokens": prompt, "prefix_tokens": prompt - suffix, "out": lengths.get(q.id, MEDIAN_OUT),
                         "out_scripted": q.id in lengths})
        meta[f"text_{fmt}"] = rows
        print(f"text_{fmt}: {len(rows)} prompts, {sum(r['prompt_tokens'] for r in rows)/1e6:.1f}M tokens, "
              f"{sum(not r['out_scripted'] for r in rows)} ids without a scripted length (median {MEDIAN_OUT} used)")
    # stratified subset: tables from 4 size buckets, every question on each chosen table
    rows = meta["text_html"]
    by_file = defaultdict(list)
    for r in rows:
        by_file[r["file"]].append(r)
    buckets = [(1_000, 4_000), (4_000, 16_000), (16_000, 48_000), (48_000, 100_001)]
    rng = random.Random(seed)
    chosen: list[str] = []
    for lo, hi in buckets:
        files = sorted(f for f, rs in by_file.items() if lo <= max(r["prompt_tokens"] for r in rs) < hi and len(rs) >= 2)
        chosen += rng.sample(files, min(n_tables // len(buckets), len(files)))
    subset = [r for f in chosen for r in by_file[f]]
    ids = sorted(r["id"] for r in subset)
    by_id = {q.id: q.raw for q in qs}
    print(f"subset: {len(ids)} queries on {len(chosen)} tables, prompts {min(r['prompt_tokens'] for r in subset):,}"
          f"–{max(r['prompt_tokens'] for r in subset):,} tokens")
    prepare(shared_dir(), files={"html": [f"{f}.html" for f in chosen]},
            qa={"QA_bench.json": [by_id[i] for i in ids]},
            extra={"bench_meta.json": {"subset_ids": ids, "lengths": {r["id"]: r["out"] for r in subset}, **meta}})


def fit(rows: list[list[float]], t: list[float]) -> list[float]:
    """Least squares coefficients of t = rows · coef (float64)."""
    import torch

    X = torch.tensor(rows, dtype=torch.float64)
    return [float(c) for c in torch.linalg.lstsq(X, torch.tensor(t, dtype=torch.float64)[:, None]).solution[:, 0]]


def fit_prefill(times: list[tuple[int, float]]) -> list[float]:
    """t(P) = a + b*P + c*P^2 over the measured prefixes (attention makes it quadratic)."""
    return fit([[1.0, float(p), float(p) ** 2] for p, _ in times], [x for _, x in times])


def fit_linear(times: list[tuple[int, float]]) -> list[float]:
    """t(P) = a + b*P."""
    return fit([[1.0, float(p)] for p, _ in times], [x for _, x in times])


def fit_step(points: list[tuple[int, int, float]]) -> list[float]:
    """step_s = a + b * slots * length: a replay reads the weights once and every slot's KV."""
    return fit([[1.0, float(sl * ln)] for sl, ln, _ in points], [x for _, _, x in points])


def simulate_decode(rows: list[dict], step: list[float], free_bytes: float, per_tok: int, max_slots: int) -> dict:
    """The engine's pools on a full run: groups longest first, one pool per slot length, slots as the
    engine sizes them from free memory; a pool needs max(decoded / slots, longest answer) steps."""
    from hitbench_utils.decode_pool import bucket_length
    from hitbench_utils.prefix_engine import PREFILL_ACTIVATIONS, RESERVE_BYTES

    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    pools: dict[int, dict] = {}
    for g in groups.values():
        need = max(x["prompt_tokens"] + x["out"] for x in g) + 1
        p = pools.setdefault(bucket_length(need), {"prefix": 0, "decoded": 0, "longest": 0})
        p["prefix"] = max(p["prefix"], max(x["prefix_tokens"] for x in g))
        p["decoded"] += sum(max(0, x["out"] - 1) for x in g)
        p["longest"] = max([p["longest"]] + [x["out"] for x in g])
    secs = steps = 0.0
    for length, p in pools.items():
        room = free_bytes - p["prefix"] * per_tok * (1 + PREFILL_ACTIVATIONS) - RESERVE_BYTES
        slots = max(1, min(max_slots, int(room // (length * per_tok))))
        n = max(p["decoded"] / slots, p["longest"])
        p.update(slots=slots, steps=round(n))
        steps += n
        secs += n * (step[0] + step[1] * slots * length)
    return {"seconds": secs, "steps": round(steps), "pools": {str(k): v for k, v in sorted(pools.items())}}


def project(rows: list[dict], coef: list[float], suffix_fit: list[float], decode: dict) -> dict:
    """A PROJECTION, not a measurement (bench/e2e_gpu.py measures the run path; this leaves out preparing
    prompts). A full run from the measured parts, grouped by the template's share key as the engine
    groups: each prefix once (the fitted prefill time), the suffix of
    every question after a group's first (fitted on its prefix length: the copy and the attention grow
    with it), and the simulated decode (fitted step cost)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    prefixes = [max(x["prefix_tokens"] for x in g) for g in groups.values()]
    prefill = sum(max(0.0, coef[0] + coef[1] * p + coef[2] * p * p) for p in prefixes)
    suffix = sum((len(g) - 1) * max(0.0, suffix_fit[0] + suffix_fit[1] * p) for g, p in zip(groups.values(), prefixes))
    secs = prefill + suffix + decode["seconds"]
    return {"minutes": round(secs / 60, 1), "groups": len(groups), "prefix_tokens": sum(prefixes),
            "prefill_min": round(prefill / 60, 1), "suffix_min": round(suffix / 60, 1),
            "decode_steps": decode["steps"], "decode_min": round(decode["seconds"] / 60, 1), "decode_pools": decode["pools"]}


def pool_step_ms(backend, slots: int, length: int, graphs: bool, n: int = 100) -> float:
    """One decode step of the slot pool, all slots busy (the compiled decode when graphs=True)."""
    import torch
    from hitbench_utils.decode_pool import SlotPool

    pool = SlotPool(backend.model, slots, length, backend.device, graphs)
    for _ in range(slots):
        s = pool.take()
        pool.prefill(s, list(range(100, 612)), 0, 0)
        pool.start(s, 7)
    for _ in range(3):
        pool.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        pool.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / n * 1000
    del pool
    return ms


def first_logits_check(backend, reqs, n: int = 4) -> dict:
    """bf16: the engine's first-token logits (prefix cache + slot prefill) against one plain forward."""
    import torch
    from hitbench_utils.backends.base import GenSettings
    from hitbench_utils.decode_pool import SlotPool
    from hitbench_utils.prefix_engine import PrefixEngine, _cache_kw

    eng = PrefixEngine(backend, batch_size=1, graphs=False)
    out = []
    for r in sorted(reqs, key=lambda r: r.input_tokens)[:n]:
        g = next(iter(eng._group([r])[0].values()))
        cache, P, delta, _ = eng._prefix(g)    # this cache also holds the question: crop it below
        pool = SlotPool(backend.model, 1, g.need(GenSettings(max_new_tokens=1)) + 8, backend.device, False)
        pool.load_prefix(0, cache, P)
        suffix = g.members[0].suffix_ids
        got = pool.prefill(0, suffix, P, P + delta).float()
        inputs = backend.processor(text=[backend.chat_text(r.messages)], return_tensors="pt").to(backend.device)
        T = len(suffix)
        with torch.no_grad():
            ref = backend.model(**inputs, logits_to_keep=1).logits[0, -1].float()
            # the same prefix cache, then the suffix through HF's own forward: how far two exact paths differ in bf16
            cache.crop(-len(suffix))     # negative: "drop this many" on every transformers 5.x
            pos = torch.arange(P + delta, P + delta + T, device=backend.device).view(1, 1, T).expand(3, 1, T)
            kw = {_cache_kw(backend.model): cache}
            hf_split = backend.model(input_ids=torch.tensor([suffix], device=backend.device), position_ids=pos,
                                     cache_position=torch.arange(P, P + T, device=backend.device), use_cache=True,
                                     logits_to_keep=1, **kw).logits[0, -1].float()
        out.append({"id": r.key, "tokens": int(inputs["input_ids"].shape[1]),
                    "engine_max_abs_diff": round(float((got - ref).abs().max()), 4),
                    "hf_prefix_cache_max_abs_diff": round(float((hf_split - ref).abs().max()), 4),
                    "ref_max_abs": round(float(ref.abs().max()), 3),
                    "engine_same_argmax": bool(got.argmax() == ref.argmax()),
                    "hf_prefix_cache_same_argmax": bool(hf_split.argmax() == ref.argmax())})
        del cache, pool
    return {"tolerance": "engine's max |diff| to one full forward <= 1.5x that of HF's own prefix-cache path + 1/16",
            "samples": out,
            "within": all(x["engine_max_abs_diff"] <= 1.5 * x["hf_prefix_cache_max_abs_diff"] + 0.0625 for x in out)}


def run_bench(out: Path, batch_size: int, limit: int | None, smoke: bool = False) -> dict:
    import torch

    cuda = torch.cuda.is_available()   # --smoke also runs on a CPU: the same code path, tiny model

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def reset_peak() -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    from hitbench_utils.backends.base import GenSettings
    from hitbench_utils.config import RunConfig
    from hitbench_utils.prefix_engine import PrefixEngine
    from hitbench_utils.run import Job

    meta = json.loads((INPUTS / "bench_meta.json").read_text())
    lengths = {int(k): v for k, v in meta["lengths"].items()}
    if smoke:
        from hitbench_utils.backends.hf import HFBackend
        from hitbench_utils.backends.tiny import tiny_model_dir

        t0 = time.time()
        backend, build_s = HFBackend(tiny_model_dir(), device="cuda" if cuda else "cpu"), 0.0
    else:
        backend, build_s = build_random_8b(INPUTS / "qwen2")
    cfg = RunConfig(data_path=str(INPUTS / "data"), qa_file=str(INPUTS / "data" / "QA_bench.json"), format="html",
                    run_dir="/tmp/bench_run", max_new_tokens=MAX_NEW, max_reasks=0, score=False, limit=limit)
    job = Job(cfg, backend=backend, progress=False)
    job.header()
    prep = job.preparer()
    t0 = time.time()
    prepared = [prep.prepare(q, 1) for q in job.queries]
    prep_s = time.time() - t0
    reqs = [p.request for p in prepared if p.request is not None]
    for r in reqs:
        r.max_new_tokens = lengths.get(r.key, MEDIAN_OUT)
    settings = GenSettings(max_new_tokens=MAX_NEW)
    in_tokens = sum(r.input_tokens for r in reqs)
    out_tokens = sum(r.max_new_tokens for r in reqs)

    # warm-up (kernels, allocator), not timed
    w = reqs[min(range(len(reqs)), key=lambda i: reqs[i].input_tokens)]
    backend.generate([w], settings)
    PrefixEngine(backend, batch_size=batch_size).run([w], settings).__next__()

    # b1 decode step, eager: 64 tokens after a short prompt, minus the 1-token run
    def timed(req, n):
        req.max_new_tokens = n
        sync()
        t = time.perf_counter()
        backend.generate([req], settings)
        sync()
        return time.perf_counter() - t
    from copy import copy
    probe = copy(w)
    decode_ms_b1 = (timed(probe, 129) - timed(probe, 1)) / 128 * 1000
    w.max_new_tokens = lengths.get(w.key, MEDIAN_OUT)

    # (a) seed-style: batch 1, sequential, plain generate
    reset_peak()
    sync()
    t0 = time.perf_counter()
    seed_out = 0
    for r in sorted(reqs, key=lambda r: r.key):
        seed_out += backend.generate([r], settings)[0].output_tokens
    sync()
    seed_s = time.perf_counter() - t0
    seed_peak = peak()

    # (b) our engine: shared prefixes, continuous batching over slots, compiled decode step
    from hitbench_utils.engine import free_memory
    free_memory()     # the seed-style loop's cached blocks go back, as the engine's own pool sizing does
    free_bytes = torch.cuda.mem_get_info()[0] if cuda else 8 * 2**30
    engine = PrefixEngine(backend, batch_size=batch_size)
    reset_peak()
    sync()
    t0 = time.perf_counter()
    eng_out, failures = 0, []
    for r, res, steps in engine.run(reqs, settings):
        if isinstance(res, BaseException):
            failures.append((r.key, repr(res)[:200]))
        else:
            eng_out += res.output_tokens
    sync()
    engine_s = time.perf_counter() - t0
    eng_peak = peak()
    st = engine.stats

    graphs = cuda
    compiled_b1 = pool_step_ms(backend, 1, 4096, graphs)
    eager_b1_pool = pool_step_ms(backend, 1, 4096, False, 20)
    step_32 = pool_step_ms(backend, 32, 4096, graphs)
    step_8_32k = pool_step_ms(backend, 8, 32768, graphs)
    logits_check = first_logits_check(backend, reqs)

    # projection from the engine's measured parts to every prompt of text_html and text_latex
    coef = fit_prefill(st["prefix_times"])
    step_s = st["decode_s"] / max(1, st["decode_steps"])
    occupancy = st["decode_rows"] / max(1, st["decode_steps"])
    per_q = [(P, dt / n) for P, n, dt in st["suffix_times"]]       # (prefix, questions in the pass, s)
    suffix_fit = fit_linear(per_q) if len(per_q) >= 3 else [st["suffix_s"] / max(1, st["suffix_rows"]), 0.0]
    points = [(p["slots"], p["length"], p["decode_s"] / p["steps"]) for p in st["pools"] if p["steps"] >= 20]
    points += [(1, 4096, compiled_b1 / 1000), (32, 4096, step_32 / 1000), (8, 32768, step_8_32k / 1000)]
    step_fit = fit_step(points)
    from hitbench_utils.decode_pool import kv_bytes_per_token
    per_tok = kv_bytes_per_token(backend.model)
    projected = {k: project(meta[k], coef, suffix_fit, simulate_decode(meta[k], step_fit, free_bytes, per_tok, engine.max_slots))
                 for k in ("text_html", "text_latex")}
    seed_per_query = seed_s / len(reqs)
    result = {
        "device": device_name() + (" (smoke: tiny model)" if smoke else ""), "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d"), "model": "Qwen3-VL-8B architecture, random bf16 weights, sdpa",
        "model_build_s": round(build_s, 1), "prepare_s": round(prep_s, 1),
        "subset_size": len(reqs), "subset_groups": st["groups"],
        "subset_input_tokens": in_tokens, "subset_output_tokens": out_tokens, "batch_size": batch_size,
        "seed_style_s": round(seed_s, 2), "engine_s": round(engine_s, 2), "ratio": round(seed_s / engine_s, 2),
        "seed_style_queries_per_hour": round(len(reqs) / seed_s * 3600), "engine_queries_per_hour": round(len(reqs) / engine_s * 3600),
        "seed_style_peak_gib": round(seed_peak, 1), "engine_peak_gib": round(eng_peak, 1),
        "engine_prefill_tok_s": round(st["prefix_tokens"] / st["prefill_s"]), "engine_prefill_s": round(st["prefill_s"], 1),
        "engine_suffix_s": round(st["suffix_s"], 1), "engine_decode_s": round(st["decode_s"], 1),
        "engine_graph_capture_s": round(st["capture_s"], 1),
        "engine_decode_ms_per_step": round(step_s * 1000, 2), "engine_decode_rows_per_step": round(occupancy, 2),
        "engine_decode_tok_s": round(st["decode_rows"] / max(st["decode_s"], 1e-9)),
        "seed_style_tok_s_overall": round((in_tokens + seed_out) / seed_s),
        "decode_ms_per_step_b1": round(compiled_b1, 2), "decode_compiled": graphs,
        "decode_ms_per_step_b1_eager_generate": round(decode_ms_b1, 1),
        "decode_ms_per_step_b1_eager_pool": round(eager_b1_pool, 1),
        "decode_ms_per_step_32x4096_compiled": round(step_32, 2),
        "decode_ms_per_step_8x32768_compiled": round(step_8_32k, 2),
        "decode_step_fit_s": {"a": step_fit[0], "b_per_slot_position": step_fit[1]}, "free_gib_at_engine_start": round(free_bytes / 2**30, 1),
        "first_token_logits_bf16": logits_check, "prefill_fit_s": {"a": coef[0], "b_per_token": coef[1], "c_per_token2": coef[2]},
        "suffix_fit_s": {"a": suffix_fit[0], "b_per_prefix_token": suffix_fit[1]},
        "engine_stats": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items() if not k.endswith("_times")},
        "prefix_times": st["prefix_times"], "suffix_times": st["suffix_times"],
        "projected_minutes": {k: v["minutes"] for k, v in projected.items()}, "projection": projected,
        "projection_note": "fits applied to every prompt, not a measured run; bench/e2e_gpu.py measures the run path",
        "seed_style_projected_hours_text_html": round(seed_per_query * len(meta["text_html"]) / 3600, 2),
        "failures": failures, "outputs_equal_scripted": seed_out == eng_out == out_tokens,
    }
    out.mkdir(parents=True, exist_ok=True)
    name = f"throughput-{result['date']}-{result['device'].replace(' ', '-')}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("_times") and k != "projection"}, indent=1))
    print(f"\n| loop | wall s | queries/h | peak GiB |\n|---|---|---|---|\n"
          f"| seed-style (b1, sequential) | {seed_s:.1f} | {result['seed_style_queries_per_hour']} | {seed_peak:.1f} |\n"
          f"| engine (shared prefix, slots, graphs) | {engine_s:.1f} | {result['engine_queries_per_hour']} | {eng_peak:.1f} |\n"
          f"ratio {result['ratio']}x; projected engine text_html {projected['text_html']['minutes']} min, "
          f"text_latex {projected['text_latex']['minutes']} min; decode b1 {compiled_b1:.1f} ms/step "
          f"({'CUDA graph' if graphs else 'eager'}; eager generate {decode_ms_b1:.1f})")
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--tables", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--smoke", action="store_true", help="the tiny model instead of the 8B (a logic check)")
    a = ap.parse_args()
    if a.prepare:
        do_prepare(a.tables, a.seed)
        return 0
    run_bench(Path(a.out), a.batch_size, a.limit, a.smoke)
    return 0


if __name__ == "__main__":
    sys.exit(main())
