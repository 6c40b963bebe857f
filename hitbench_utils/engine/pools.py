"""The live decode pools: several slot lengths at once, each kept while memory allows.

One pool at a time meant a drain at every change of slot length: the pool's last long answers stepped
alone while the next table waited, and the new pool captured its graphs again. In the whole text_latex
setting on an H200 that was 323 pools for 528 tables, 2.05 rows a step, 99.6% of decode steps in drains
and 149 s of graph capture out of 829 s (bench/README.md): tables of neighbouring sizes need slot lengths
one bucket apart, and the plan alternates between them.

Here a group goes to a live pool whose slots fit it and are at most one bucket longer; only when none
does is a pool made, beside the others when memory allows it its full slot count. Idle pools go first
when memory is short, then the busy ones are drained. Every busy pool steps at each decode step, so a
pool that no longer admits finishes its answers while the others work, and a pool that comes back into
use keeps its graphs.
"""
from __future__ import annotations

from typing import Hashable, Iterator

from .kv_pool import KVPool, bucket_length


class PoolSet:
    """The live ``KVPool``s and which request is in which; sizing is the scheduler's (``room``)."""

    def __init__(self) -> None:
        self.pools: list[KVPool] = []
        self.home: dict[Hashable, KVPool] = {}     # request handle -> its pool
        self.stats: dict[KVPool, dict] = {}        # each pool's entry of the engine's stats["pools"]

    def __bool__(self) -> bool:
        return bool(self.pools)

    def __contains__(self, pool: KVPool | None) -> bool:
        return any(p is pool for p in self.pools)

    def fitting(self, need: int, max_slots: int) -> KVPool | None:
        """The shortest live pool whose slots hold ``need`` positions: of ``need``'s own length, or one
        bucket longer if it has every slot (a step reads the whole slot length, so much longer slots cost
        every step; and a long pool's few slots would cap a shorter table's questions)."""
        b = bucket_length(need)
        ok = [p for p in self.pools if p.length == b or (need <= p.length <= 2 * b and p.slots >= max_slots)]
        return min(ok, key=lambda p: (p.length, -p.room), default=None)

    def add(self, pool: KVPool, stats: dict) -> None:
        self.pools.append(pool)
        self.stats[pool] = stats

    def admit(self, pool: KVPool, rid: Hashable) -> None:
        pool.add(rid)
        self.home[rid] = pool

    def release(self, rid: Hashable) -> None:
        self.home.pop(rid).release(rid)

    def remove(self, pool: KVPool) -> None:
        """Forget a pool (its requests must be gone: finished, or handed to the plain engine)."""
        self.pools = [p for p in self.pools if p is not pool]
        self.stats.pop(pool, None)
        for rid in [r for r, p in self.home.items() if p is pool]:
            del self.home[rid]

    def busy(self) -> list[KVPool]:
        return [p for p in self.pools if len(p)]

    def idle(self) -> list[KVPool]:
        """Pools without requests, largest first (the first to free when memory is short)."""
        return sorted((p for p in self.pools if not len(p)), key=lambda p: -nbytes(p))

    def requests(self, pool: KVPool) -> Iterator[Hashable]:
        return (r for r, p in self.home.items() if p is pool)

    def held_bytes(self) -> int:
        return sum(nbytes(p) for p in self.pools)


def nbytes(pool: KVPool) -> int:
    return pool.slots * pool.length * pool.shape.bytes_per_token()


def new_pool_slots(room_alone: int, held: int, length: int, per_token: int, max_slots: int) -> tuple[int, int]:
    """(slots a new pool gets beside the live pools, slots it would get were they all freed): ``room_alone``
    is the memory free for it with every live pool freed, ``held`` what the live pools hold."""
    per_slot = length * per_token
    return (int(min(max_slots, max(0, room_alone - held) // per_slot)), int(min(max_slots, max(0, room_alone) // per_slot)))


def keep_beside(beside: int, alone: int) -> bool:
    """Make a pool beside the live ones only when that costs it no slots (fewer slots cost every step)."""
    return beside >= alone and beside >= 1


def prefix_pass_bytes(tokens: int, per_tok: int) -> int:
    """Device memory a prefill pass of ``tokens`` prompt tokens needs: their cache, their activations,
    and the reserve."""
    return int((1 + PREFILL_ACTIVATIONS) * tokens * per_tok + RESERVE_BYTES)


PREFILL_ACTIVATIONS = 1.0   # prefill activations, in units of the prompt's KV size (an 89K prefill: 2.3 GiB MLP blocks)
RESERVE_BYTES = 2 * 2**30
GRAPH_BYTES = 2**29         # a live pool's graph memory, an estimate from its step's largest tensors (float32
                            # scores: 32 rows x 32 heads x 16K keys is 64 MiB); not measured
