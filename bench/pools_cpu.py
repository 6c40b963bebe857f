"""The decode pools' schedule on a whole setting, counted on the CPU: the real plan, preparation and
scheduler, with a runner that only counts (no model). What it measures is the schedule the scheduler
makes (pools made, decode steps, rows per step, graphs captured), not time.

    python bench/e2e_gpu.py --prepare --whole        # once: the whole settings' inputs
    python bench/pools_cpu.py --setting text_latex --gpu-call bench/results/e2e-...-call-7042919.json
    git checkout 7042919 -- hitbench_utils/engine && python bench/pools_cpu.py ... --tag=-scheduler-7042919
        # the one-pool scheduler that GPU call ran (then git checkout HEAD -- hitbench_utils/engine)

Answers run to their scripted lengths (``output_tokens.json``), as in ``e2e_gpu.py``. Memory follows an
H200 as its GPU run logged it: ``--kv-gib`` free for decode pools beside the 8B's weights, less the
prefix's activations and a reserve, as ``PrefixEngine`` sizes pools. With ``--gpu-call``, step costs
fitted to that GPU call's pools turn the counted steps into a decode time: a projection, labelled as one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import INPUTS, build_random_8b  # noqa: E402
from bench.e2e_gpu import SETTINGS, WHOLE, data_root  # noqa: E402


class CountingRunner:
    """The runner's interface with no model: KV lengths advance, every token is the same non-EOS one
    (so each answer runs to its scripted length), and each (pool, step size) counts one graph."""

    def __init__(self) -> None:
        import torch

        from hitbench_utils.engine.kv_pool import KVShape

        self.shape = KVShape(36, 8, 128, torch.bfloat16)      # the 8B's KV: 144 KiB a token
        self.capture_s, self.captures = 0.0, 0
        self._graphs: dict = {}

    def new_pool(self, slots: int, length: int):
        import torch

        from hitbench_utils.engine.kv_pool import KVPool, KVShape

        pool = KVPool(KVShape(1, 1, 1, torch.int8), slots, length, "cpu")    # tiny tensors ...
        pool.shape = self.shape                                               # ... the 8B's sizes
        return pool

    def drop_graphs(self, pool=None) -> None:
        if pool is None:
            self._graphs = {}
        else:
            self._graphs.pop(pool, None)

    @property
    def graph_count(self) -> int:      # the one-pool scheduler's spelling (commit 7042919 and before)
        return sum(len(v) for v in self._graphs.values())

    def graphs_of(self, pool) -> int:
        return len(self._graphs.get(pool, ()))

    @staticmethod
    def _logits(n: int):
        import torch

        return torch.zeros(n, 8)

    def prefix(self, first, image):
        return None, len(first.prefix_ids), 0, self._logits(1)[0]

    def prefixes(self, firsts):
        return [self.prefix(f, None) for f in firsts]

    def load(self, pool, rid, cache, n: int, position: int) -> None:
        pool.written(rid, n, position)

    def prefill_group(self, pool, rids, cache, P: int, suffixes, position: int):
        for rid, s in zip(rids, suffixes):
            pool.written(rid, P + len(s), position + len(s))
        return self._logits(len(rids))

    def step(self, pool):
        S = pool.span()
        sizes = self._graphs.setdefault(pool, set())
        if S not in sizes:
            sizes.add(S)
            self.captures += 1
        live = pool.active[:S].long()
        pool.wr[:S] += live
        pool.pos[:S] += live
        return self._logits(S)


def sim_engine(kv_gib: float):
    from hitbench_utils.engine import scheduler as S

    class SimEngine(S.PrefixEngine):
        def _free_bytes(self) -> int:      # the CUDA sizing and prefix room, with kv_gib for the pools
            return int(kv_gib * 2**30 - self.pools.held_bytes())

    return SimEngine


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="text_latex", choices=sorted(SETTINGS))
    ap.add_argument("--kv-gib", type=float, default=120.0)
    ap.add_argument("--gpu-call", help="an e2e_gpu.py result with this setting: its pools' step costs, for the projection")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--work", default="/tmp/pools_cpu")
    ap.add_argument("--tag", default="", help="appended to the file name (pass it as --tag=-x)")
    a = ap.parse_args()

    import hitbench_utils.run as run_mod
    from hitbench_utils.config import RunConfig
    from hitbench_utils.run import Job

    fmt, prompts = SETTINGS[a.setting]
    meta = json.loads((WHOLE / "meta.json").read_text())
    m = meta["formats"][fmt]
    root = data_root(WHOLE, Path(a.work) / "inputs")
    backend, _ = build_random_8b(INPUTS / "qwen2", device="meta")     # the tokenizer and processor only
    runner, Sim = CountingRunner(), sim_engine(a.kv_gib)
    # the one-pool scheduler sized CPU pools by token_budget: the same memory, prefix activations aside
    budget = int(a.kv_gib * 2**30 / 8 / runner.shape.bytes_per_token())
    run_mod.make_engine = lambda be, cfg: Sim(be, cfg.batch_size, budget, runner=runner)
    lengths = {str(k): v for k, v in m["lengths"].items()}

    def script(req):
        req.max_new_tokens = min(lengths.get(str(req.key), meta["median_out"]), meta["max_new_tokens"])
        return req

    run_dir = Path(a.work) / a.setting
    cfg = RunConfig(data_path=str(root / "data"), qa_file=str(root / "data" / f"QA_{fmt}.json"), format=fmt,
                    prompts=prompts, run_dir=str(run_dir), max_new_tokens=meta["max_new_tokens"], max_reasks=0,
                    score=False, device="cpu", ids=m["ids"], share_prefix=True, batch_size=4,
                    max_input_tokens=100_000, overwrite=True, resume=False)
    job = Job(cfg, backend=backend, progress=False, request_hook=script)
    t0 = time.perf_counter()
    summary = job.execute()
    st = job.engine.stats
    kinds: dict = {}
    for p in st["pools"]:
        k = kinds.setdefault(f"{p['slots']}x{p['length']}", {"pools": 0, "steps": 0, "rows": 0})
        k["pools"] += 1
        k["steps"] += p["steps"]
        k["rows"] += p["rows"]
    out = {"what": "the scheduler's decode schedule on the whole setting, counted on the CPU with a runner "
                   "that only counts (no model, no time): real plan, preparation and scheduler",
           "setting": a.setting, "questions": len(m["ids"]), "verdict": summary["verdict"],
           "kv_gib": a.kv_gib, "cpu_s": round(time.perf_counter() - t0, 1),
           "schedule": {k: st.get(k) for k in ("groups", "decode_steps", "decode_ticks", "decode_rows", "drain_steps",
                                            "rows_per_step", "drain_step_share", "moves", "prefix_room_frees", "prefix_retries")},
           "pools_made": len(st["pools"]), "pools_made_beside_others": sum(p.get("beside", 0) > 0 for p in st["pools"]),
           "graphs_captured": runner.captures, "pool_kinds": kinds}
    if a.gpu_call:
        out["projection"] = projection(json.loads(Path(a.gpu_call).read_text())[a.setting], kinds, runner.captures,
                                       Path(a.gpu_call).name)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"pools-{time.strftime('%Y-%m-%d')}-cpu-{a.setting}{a.tag}.json"
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


def projection(gpu: dict, kinds: dict, captured: int, call: str) -> dict:
    """Decode time of the counted schedule at the GPU call's step costs: a step costs ``a`` (the weights,
    launches) plus ``b`` per row and slot position (its KV), fitted by least squares to the call's pools
    (each pool's steps, rows, slot length and decode seconds). The fit's own error on the call is given.
    A projection: steps of pools that run in the same tick each count whole, as they do on the GPU."""
    pools = gpu["engine_run"]["engine"]["pools"]
    xs = [(p["steps"], p["rows"] * p["length"], p["decode_s"]) for p in pools if p["steps"]]
    s11, s12, s22 = (sum(x * x for x, _, _ in xs), sum(x * y for x, y, _ in xs), sum(y * y for _, y, _ in xs))
    t1, t2 = sum(x * t for x, _, t in xs), sum(y * t for _, y, t in xs)
    det = s11 * s22 - s12 * s12
    a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det

    def cost(steps: int, rows_x_len: float) -> float:
        return a * steps + b * rows_x_len

    graphs = sum(p["graphs"] for p in pools)
    decode = sum(cost(k["steps"], k["rows"] * int(n.split("x")[1])) for n, k in kinds.items())
    return {"label": "projection, not a measurement", "from_call": call,
            "step_cost_fit": {"s_per_step": round(a, 5), "s_per_row_position": b,
                              "fit_on_call_decode_s": round(sum(cost(x, y) for x, y, _ in xs), 1)},
            "measured_on_call": {"decode_s": gpu["breakdown"]["decode"], "capture_s": gpu["breakdown"]["capture"],
                                 "decode_steps": gpu["decode_steps"], "pools": len(pools), "graphs": graphs},
            "decode_s": round(decode, 1),
            "capture_s_at_measured_s_per_graph": round(gpu["breakdown"]["capture"] / max(1, graphs) * captured, 1)}


if __name__ == "__main__":
    sys.exit(main())
