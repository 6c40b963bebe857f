"""Static per-request KV memory for continuous batched decoding, keyed by request.

Each running question owns a slot: a fixed stretch of KV memory in every layer. Questions on different
tables decode together, and a finished question frees its slot for the next (continuous batching), so
the number of decode steps follows the total output, not the longest answer per table.

The scheduler names requests, never slots: ``add``, ``start``, ``advance``, ``release`` take its handle
(any hashable). Slots are this module's business. A decode step reads every slot's KV up to the slot
length, so it covers the first ``span()`` slots only: a power of two (or the pool size) past the last
busy slot, one CUDA graph per span (``runner``). When questions finish, ``compact`` moves the busy slots
down into free ones (their KV copied), so a pool's last long answers step at the cost of one slot, not
of the whole pool (a 32x8192 pool: ~30 ms a step, one slot: ~10 ms on an H100).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

MIN_LENGTH = 1024
STEP_LENGTH = 16384


def bucket_length(n: int) -> int:
    """Slot lengths: powers of two up to 16K, then multiples of 16K. Few distinct graph shapes, and a
    long prompt's slot wastes at most 16K positions (a 90K prompt gets 96K, not 128K)."""
    if n > STEP_LENGTH:
        return -(-n // STEP_LENGTH) * STEP_LENGTH
    length = MIN_LENGTH
    while length < n:
        length *= 2
    return length


@dataclass(frozen=True)
class KVShape:
    """What one token's KV is: layers x (keys, values) x kv heads x head size, in ``dtype``."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: Any

    def bytes_per_token(self) -> int:
        import torch

        return self.layers * 2 * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class LayerKV:
    keys: Any          # [1, kv heads, positions, head dim]
    values: Any


class PrefixKV:
    """A text prefix's keys and values, laid out as a ``DynamicCache``'s layers, so ``load`` and
    ``prefill_group`` read it as they read the model's own cache of an image prefix."""

    def __init__(self, shape: KVShape, n: int, device: str) -> None:
        import torch

        def empty() -> Any:
            return torch.empty((1, shape.kv_heads, n, shape.head_dim), dtype=shape.dtype, device=device)

        self.layers = [LayerKV(empty(), empty()) for _ in range(shape.layers)]


class KVPool:
    """``slots`` requests of up to ``length`` KV positions each.

    Device state a decode step reads and advances (the runner's business): ``K``/``V`` [slots, kv heads,
    length, head dim] per layer, ``tok`` (the token each slot feeds next), ``pos`` (its rotary position),
    ``wr`` (the KV index it is written to), ``active``. Host state: which request holds which slot.
    """

    def __init__(self, shape: KVShape, slots: int, length: int, device: str) -> None:
        import torch

        self.shape, self.slots, self.length, self.device = shape, slots, length, device
        dims = (slots, shape.kv_heads, length, shape.head_dim)
        self.K = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.V = [torch.zeros(dims, dtype=shape.dtype, device=device) for _ in range(shape.layers)]
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)
        self.wr = torch.zeros(slots, dtype=torch.long, device=device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.rows = torch.arange(slots, device=device)
        self.keys = torch.arange(length, device=device)
        self.sizes = sorted({min(slots, 2 ** k) for k in range(slots.bit_length() + 1)})
        self._slot: dict[Hashable, int] = {}     # request -> slot
        self._free = list(range(slots))
        self._n = [0] * slots                    # host copy of ``wr``: a slot's KV length, for moving it
        self._on: set[int] = set()               # host copy of ``active``

    def close(self) -> None:
        """The KV memory goes back at once, whoever still refers to the pool. On an H200 a retired pool
        that a local still held when the device's cache was emptied went to the allocator's cache; the
        next prefix cache was carved out of its blocks, and the next pool ran out of memory with 75 GiB
        reserved but unusable (bench/README.md). A closed pool holds no requests and takes none."""
        self.K, self.V, self._free = [], [], []
        self._slot, self._on = {}, set()

    # ---- the scheduler's handle ---------------------------------------------------------------------
    @property
    def room(self) -> int:
        """Requests that can still be added."""
        return len(self._free)

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, rid: Hashable) -> bool:
        return rid in self._slot

    def add(self, rid: Hashable) -> int:
        """Give ``rid`` the lowest free slot (busy slots stay packed at the front); the slot, for the runner."""
        if rid in self._slot:
            raise ValueError(f"request {rid!r} already holds a slot")
        slot = min(self._free)
        self._free.remove(slot)
        self._slot[rid] = slot
        return slot

    def slot(self, rid: Hashable) -> int:
        return self._slot[rid]

    def length_of(self, rid: Hashable) -> int:
        """KV positions written for ``rid``."""
        return self._n[self._slot[rid]]

    def written(self, rid: Hashable, n: int, position: int) -> None:
        """``rid``'s first ``n`` KV positions hold its prompt; its next token goes at rotary ``position``."""
        slot = self._slot[rid]
        if n > self.length:
            raise ValueError(f"slot length {self.length} < {n} tokens")
        self.wr[slot], self.pos[slot], self._n[slot] = n, position, n

    def start(self, rid: Hashable, token: int) -> None:
        """``rid`` decodes from ``token`` on, one position per step."""
        slot = self._slot[rid]
        self.tok[slot] = token
        self.active[slot] = True
        self._on.add(slot)

    def release(self, rid: Hashable) -> None:
        self._clear(self._slot.pop(rid))

    def _clear(self, slot: int) -> None:
        self.active[slot] = False
        self.wr[slot] = 0
        self._n[slot] = 0
        self._on.discard(slot)
        self._free.append(slot)

    # ---- a decode step --------------------------------------------------------------------------------
    def span(self) -> int:
        """The step size (a captured graph's row count) that covers every busy slot."""
        return self.sizes_for(max(self._slot.values()) + 1 if self._slot else 1)

    def advance(self, picks: Any) -> dict[Hashable, int]:
        """After a step over ``span()`` slots: ``picks`` [span] are the tokens each slot feeds next. The
        active requests' KV grew by one; their tokens, by request."""
        self.tok[:len(picks)].copy_(picks)
        toks = picks.tolist()
        for s in self._on:
            self._n[s] += 1
        return {rid: toks[s] for rid, s in self._slot.items() if s in self._on}

    def compact(self) -> int:
        """Move busy slots above the first ``len(busy)`` into free ones below, when that lets the step run
        over fewer slots. A move copies the slot's KV (its length only). Returns the number of moves."""
        busy = sorted(self._slot.values())
        if not busy or self.sizes_for(len(busy)) >= self.span():
            return 0
        import torch

        owner = {s: rid for rid, s in self._slot.items()}
        moves = 0
        with torch.no_grad():
            for src in reversed(busy):
                if src < len(busy):
                    break
                dst = min(self._free)
                n = self._n[src]
                for K, V in zip(self.K, self.V):
                    K[dst, :, :n].copy_(K[src, :, :n])
                    V[dst, :, :n].copy_(V[src, :, :n])
                for t in (self.tok, self.pos, self.wr, self.active):
                    t[dst] = t[src]
                self._free.remove(dst)
                self._n[dst] = n
                if src in self._on:
                    self._on.add(dst)
                self._clear(src)
                self._slot[owner[src]] = dst
                moves += 1
        return moves

    def sizes_for(self, n: int) -> int:
        """The smallest step size covering ``n`` slots."""
        return next(x for x in self.sizes if x >= n)
