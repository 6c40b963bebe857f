"""What the GPU holds when it runs out of memory, by the code that allocated it (a diagnostic).

``watch(path)`` turns on PyTorch's record of live allocations (current state only, Python stacks at
allocation) and attaches an out-of-memory observer: at each of the first few OOMs it writes, to
``path``, the allocation that failed and the live memory grouped by the innermost frame of this
project that allocated it (a pool's ``kv_pool.py`` line, a prefix's ``runner.py`` line), the memory
the allocator holds unused, and the CUDA graphs' private pools. Recording stacks costs a little time at
each allocation; a run with it on says so in its result.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

GIB = 2**30


def site(frames: list[dict]) -> str:
    """The innermost frame of this project's code (hitbench_utils, bench), else the innermost one."""
    mine = [f for f in frames if "hitbench_utils" in f.get("filename", "") or "/bench/" in f.get("filename", "")]
    f = (mine or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
    return f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']} {f['name']}"


def summarize(snapshot: dict, top: int = 12) -> dict:
    """Live bytes by allocation site, unused bytes the allocator holds, and bytes per private pool."""
    live: dict[str, int] = defaultdict(int)
    unused = 0
    pools: dict[str, int] = defaultdict(int)
    for seg in snapshot.get("segments", []):
        pools[str(tuple(seg.get("segment_pool_id", (0, 0))))] += seg.get("total_size", 0)
        for b in seg.get("blocks", []):
            if b.get("state") == "active_allocated":
                live[site(b.get("frames", []))] += b["size"]
            else:
                unused += b["size"]
    ranked = sorted(live.items(), key=lambda kv: -kv[1])
    return {"live_gib": round(sum(live.values()) / GIB, 2), "unused_gib": round(unused / GIB, 2),
            "by_site_gib": {k: round(v / GIB, 3) for k, v in ranked[:top]},
            "other_sites_gib": round(sum(v for _, v in ranked[top:]) / GIB, 3),
            "segments_by_pool_gib": {k: round(v / GIB, 2) for k, v in sorted(pools.items(), key=lambda kv: -kv[1])}}


def watch(path: Path, limit: int = 3) -> None:
    import torch

    torch.cuda.memory._record_memory_history(enabled="state", context="alloc", stacks="python")
    seen: list[dict] = []

    def observer(device: int, alloc: int, device_alloc: int, device_free: int) -> None:
        if len(seen) >= limit:
            return
        seen.append({"failed_alloc_gib": round(alloc / GIB, 3), "device_allocated_gib": round(device_alloc / GIB, 2),
                     "device_free_gib": round(device_free / GIB, 2), **summarize(torch.cuda.memory._snapshot())})
        path.write_text(json.dumps(seen, indent=1))

    torch._C._cuda_attach_out_of_memory_observer(observer)
