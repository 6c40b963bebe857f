"""Static per-slot KV memory and a decode step that is replayed as one CUDA graph.

Each running question owns a slot: a fixed stretch of KV memory in every layer. Questions on different
tables decode together, and a finished question frees its slot for the next (continuous batching). The
number of decode steps then follows the total output, not the longest answer per table, and one step
costs a graph replay instead of ~1,000 eager kernel launches (70 ms at batch 1 on an H100, eager).

The step is written against the model's own modules (projections, norms, rotary embedding, MLP, head),
so the weights and the arithmetic are the model's. Only the text decoder runs here: images enter through
the prefix, which the model's own forward computes. Keys are read through a boolean mask per slot, and
the query heads that share a KV head are folded into the query length, so no KV is ever repeated.

A step reads every slot's KV up to the slot length, so it runs over the first ``S`` slots only, ``S`` the
power of two (or the pool size) past the last busy slot, one graph per ``S``, captured when first needed.
When questions finish, the busy slots are moved down (``compact``), so the last long answers of a run
step at the cost of one slot, not of the whole pool (a 32x8192 pool: ~30 ms a step, one slot: ~10 ms).
"""
from __future__ import annotations

import time
from typing import Any

from . import runner
from .attention import fuse_projections, kv_bytes_per_token, text_model  # noqa: F401 - re-exported

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


class SlotPool:
    """``slots`` rows of ``length`` KV positions each; ``step`` advances every active row by one token."""

    def __init__(self, model: Any, slots: int, length: int, device: str, graphs: bool) -> None:
        import torch

        tm = text_model(model)
        cfg = tm.config
        self.model, self.tm, self.layers = model, tm, list(tm.layers)
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.groups = self.nh // self.kvh
        self.slots, self.length, self.device = slots, length, device
        dtype = tm.embed_tokens.weight.dtype
        shape = (slots, self.kvh, length, self.hd)
        self.fused = [fuse_projections(layer) for layer in self.layers]
        self.K = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.V = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)   # rotary position of ``tok``
        self.wr = torch.zeros(slots, dtype=torch.long, device=device)    # KV index ``tok`` is written to
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self.rows = torch.arange(slots, device=device)
        self.keys = torch.arange(length, device=device)
        self.free = list(range(slots))
        self.n = [0] * slots             # host copy of ``wr``: a slot's KV length, for moving it
        self.on: set[int] = set()        # host copy of ``active``
        self.sizes = sorted({min(slots, 2 ** k) for k in range(slots.bit_length() + 1)})
        self.use_graphs = graphs
        self.graphs: dict[int, tuple[Any, Any]] = {}      # step size -> (graph, its logits)
        self._mempool: Any = None
        self.capture_s = 0.0

    # ---- filling a slot -----------------------------------------------------------------------------
    def take(self) -> int:
        """The lowest free slot, so that busy slots stay packed at the front (the eager step skips the rest)."""
        slot = min(self.free)
        self.free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        self.active[slot] = False
        self.wr[slot] = 0
        self.n[slot] = 0
        self.on.discard(slot)
        self.free.append(slot)

    def size_for(self, hi: int) -> int:
        """The step size (a captured graph's row count) that covers slots 0..hi-1."""
        return next(x for x in self.sizes if x >= hi)

    def compact(self) -> dict[int, int]:
        """Move busy slots above the first ``len(busy)`` into the free ones below, when that lets the step
        run over fewer slots; return {old slot: new slot}. A move copies the slot's KV (its length only)."""
        busy = sorted(set(range(self.slots)) - set(self.free))
        if not busy or self.size_for(len(busy)) >= self.size_for(busy[-1] + 1):
            return {}
        import torch

        moves: dict[int, int] = {}
        with torch.no_grad():
            for src in reversed(busy):
                if src < len(busy):
                    break
                dst = min(self.free)
                n = self.n[src]
                for K, V in zip(self.K, self.V):
                    K[dst, :, :n].copy_(K[src, :, :n])
                    V[dst, :, :n].copy_(V[src, :, :n])
                for t in (self.tok, self.pos, self.wr, self.active):
                    t[dst] = t[src]
                self.free.remove(dst)
                self.n[dst] = n
                if src in self.on:
                    self.on.add(dst)
                self.release(src)
                moves[src] = dst
        return moves

    def load_prefix(self, slot: int, cache: Any, n: int) -> None:
        """Copy a batch-1 prefix cache (the model's own prefill) into a slot."""
        import torch

        with torch.no_grad():
            self._load(slot, cache, n)

    def _load(self, slot: int, cache: Any, n: int) -> None:
        for li, layer in enumerate(cache.layers):
            self.K[li][slot, :, :n].copy_(layer.keys[0, :, :n])
            self.V[li][slot, :, :n].copy_(layer.values[0, :, :n])

    def prefill(self, slot: int, ids: list[int], start: int, position: int) -> Any:
        """Run ``ids`` after the ``start`` tokens already in ``slot`` (eager); return the last logits."""
        import torch

        with torch.no_grad():
            logits = runner.prefill(self, slot, ids, start, position)
        self.wr[slot], self.pos[slot] = start + len(ids), position + len(ids)
        self.n[slot] = start + len(ids)
        return logits

    def prefill_group(self, slots: list[int], cache: Any, P: int, suffixes: list[list[int]], position: int) -> Any:
        """Several questions on one prefix in one pass (``runner.prefill_group``); their last logits."""
        import torch

        with torch.no_grad():
            logits = runner.prefill_group(self, slots, cache, P, suffixes, position)
        for slot, ids in zip(slots, suffixes):
            self.wr[slot], self.pos[slot] = P + len(ids), position + len(ids)
            self.n[slot] = P + len(ids)
        return logits

    def place(self, slot: int, n: int, position: int) -> None:
        """A slot whose ``n`` tokens were all loaded from a cache: the next token goes at ``position``."""
        self.wr[slot], self.pos[slot] = n, position
        self.n[slot] = n

    def start(self, slot: int, token: int) -> None:
        self.tok[slot] = token
        self.active[slot] = True
        self.on.add(slot)

    # ---- one decode step over every slot ------------------------------------------------------------
    def _step(self, hi: int | None = None) -> Any:
        return runner.step(self, hi or self.slots)

    def _capture(self, size: int) -> tuple[Any, Any]:
        """The step over the first ``size`` slots as a CUDA graph. Warm-up steps run with every slot
        inactive, so no position advances; they write each slot's current key and value, which the real
        step writes again. All of a pool's graphs share one memory pool: they never run at once."""
        import torch

        t0 = time.perf_counter()
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        saved = self.active.clone()
        self.active.zero_()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):       # allocator and kernel selection happen outside the graph
                    self._step(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                out = self._step(size)
        self.active.copy_(saved)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
        self.graphs[size] = (graph, out)
        return graph, out

    def step(self) -> Any:
        """Logits [S, vocab] for the next token of slots 0..S-1, S covering the last busy slot (rows of
        idle slots are junk): a graph replay on CUDA, else eager up to the last busy slot."""
        busy = set(range(self.slots)) - set(self.free)
        hi = max(busy) + 1 if busy else 1
        for s in self.on:
            self.n[s] += 1
        if self.use_graphs:
            size = self.size_for(hi)
            graph, out = self.graphs.get(size) or self._capture(size)
            graph.replay()
            return out
        import torch

        with torch.no_grad():
            return self._step(hi)
