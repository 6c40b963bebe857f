"""CPU micro-benchmark: truncate the largest real table (markdown society-table45, ~1.07M tokens) to 100K.

Reports, per repeat, the one full-table tokenization (with offsets), the cut (split + search + build),
the verification tokenization of the result (+ the marker's count), the total, and the tokens
before/after. The phases are timed by wrapping the module's own helpers, so the total is one ordinary
``truncate_table`` call. For scale, each repeat also times one plain single-threaded encode of the
table (``tokenizer(table)``'s Rust call, no offsets): the machine is often shared, so compare
total with that baseline from the same repeat.

    python bench/truncate_bench.py [--shared ../shared] [--budget 100000] [--repeat 3] [--out]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.common import realhitbench_dir, shared_dir  # noqa: E402

from hitbench_utils import truncation as T  # noqa: E402
from hitbench_utils.tokenization import qwen_bpe_from_files  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=shared_dir())
    ap.add_argument("--table", default="markdown/society-table45.md", help="table file under the data folder")
    ap.add_argument("--budget", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", action="store_true", help="write bench/results/truncate-<date>-cpu.json")
    args = ap.parse_args()

    tok_dir = args.shared / "tokenizers" / "qwen2"
    if not (tok_dir / "vocab.json").is_file() or not (args.shared / "bin" / "realhitbench").is_file():
        print(f"shared files absent under {args.shared} (need tokenizers/qwen2 and bin/realhitbench)")
        return 2
    data = realhitbench_dir(args.shared)
    table = (data / args.table).read_text(encoding="utf-8")
    fmt = {"md": "markdown", "txt": "latex"}.get(args.table.rsplit(".", 1)[-1], args.table.rsplit(".", 1)[-1])
    tok = qwen_bpe_from_files(tok_dir)

    timed = {"tokenize": 0.0, "verify": 0.0}
    offsets_cls, count = T._Offsets, T.count_tokens

    class TimedOffsets(offsets_cls):
        def __init__(self, *a, **kw):
            t0 = time.perf_counter()
            super().__init__(*a, **kw)
            timed["tokenize"] += time.perf_counter() - t0

    def timed_count(tokenizer, text):
        t0 = time.perf_counter()
        n = count(tokenizer, text)
        timed["verify"] += time.perf_counter() - t0
        return n

    T._Offsets, T.count_tokens = TimedOffsets, timed_count
    runs = []
    try:
        for i in range(args.repeat):
            t0 = time.perf_counter()
            tok.backend_tokenizer.encode(table, add_special_tokens=False)
            plain = time.perf_counter() - t0
            timed.update(tokenize=0.0, verify=0.0)
            T._RECENT.clear()    # a cold cut: the table's tokenization is kept for its next questions
            t0 = time.perf_counter()
            cut = T.truncate_table(table, fmt, budget=args.budget, tokenizer=tok)
            total = time.perf_counter() - t0
            cold = dict(timed)
            t0 = time.perf_counter()    # the next question on the same table, a few tokens less room
            T.truncate_table(table, fmt, budget=args.budget - 37, tokenizer=tok)
            warm = time.perf_counter() - t0
            runs.append({"run": i + 1, "plain_encode_s": plain, "tokenize_s": cold["tokenize"], "verify_s": cold["verify"],
                         "cut_s": total - cold["tokenize"] - cold["verify"], "total_s": total, "same_table_again_s": warm,
                         "tokens_before": cut.tokens_original, "tokens_after": cut.tokens_kept,
                         "rows_total": cut.rows_total, "rows_dropped": cut.rows_dropped})
    finally:
        T._Offsets, T.count_tokens = offsets_cls, count

    print(f"{args.table}: {len(table):,} chars, {fmt}, budget {args.budget:,}, "
          f"{len(os.sched_getaffinity(0))} CPUs, load avg {os.getloadavg()[0]:.2f}")
    print(f"{'run':>3} {'plain encode s':>14} {'tokenize s':>10} {'cut s':>7} {'verify s':>8} {'total s':>8} {'tokens before':>14} "
          f"{'tokens after':>13} {'rows dropped':>13}")
    for r in runs:
        print(f"{r['run']:>3} {r['plain_encode_s']:>14.3f} {r['tokenize_s']:>10.3f} {r['cut_s']:>7.3f} {r['verify_s']:>8.3f} {r['total_s']:>8.3f} "
              f"{r['tokens_before']:>14,} {r['tokens_after']:>13,} {r['rows_dropped']:>6,} of {r['rows_total']:,}")
    best = min(r["total_s"] for r in runs)
    print(f"best total {best:.3f} s, median {sorted(r['total_s'] for r in runs)[len(runs) // 2]:.3f} s; "
          f"the same table's next question: {min(r['same_table_again_s'] for r in runs):.3f} s")
    if args.out:
        out = REPO / "bench" / "results" / f"truncate-{dt.date.today().isoformat()}-cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "table": args.table, "chars": len(table), "format": fmt, "budget": args.budget, "runs": runs,
            "cpus": len(os.sched_getaffinity(0)), "load_avg_1m": os.getloadavg()[0],
            "python": platform.python_version(), "machine": platform.machine(),
        }, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
