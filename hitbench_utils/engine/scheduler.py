"""The scheduler: which question gets a slot when, and which pool a group decodes in.

Groups (questions sharing a prefix, ``prefixes``) run longest first, several per pull; their prefixes
and further questions are prefilled by ``admission``, and decode steps run whenever a question finds no
free slot. A group decodes in a live pool of its slot length, or in a new one (``pools``); every busy
pool steps at each decode step. A failure falls back to the plain batched engine for the questions it
touched, so the guarantees of ``Engine`` (failure isolation, the OOM split) still hold.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterable, Iterator

from ..backends.base import GenRequest, GenResult, GenSettings
from ..errors import status_of
from ..records import Degradation
from .admission import PACK_TOKENS, Admission, Outcomes
from .batching import Engine, empty_cache, failed_at, free_memory, release_frames
from .kv_pool import KVPool, bucket_length
from .pools import GRAPH_BYTES, PoolSet, keep_beside, nbytes, new_pool_slots, prefix_pass_bytes
from .prefixes import _Row, _Split
from .runner import ModelRunner
from .sampling import generator, pick

log = logging.getLogger("hitbench")


class PrefixEngine(Admission, Engine):
    """An ``Engine`` for local HF models: shared prefixes, and continuous batched decoding in ``KVPool``s.
    A group goes to a live pool of its slot length, or gets a new one, beside the others when memory
    gives it its full slot count; else idle pools are freed, then busy ones drained (their steps, and
    those of any pool that is not admitting, count as drain steps). The slot count follows free memory.

    It talks to the KV memory only through the pools' request handle (``add``, ``start``, ``advance``,
    ``release``), and to the model only through ``runner`` (a ``ModelRunner``, or a stand-in in tests)."""

    groups_per_pull = 8      # whole prefix groups per pull: short prefixes among them share a prefill pass

    def __init__(self, *args: Any, max_slots: int = 32, graphs: bool | None = None, runner: Any = None,
                 pack_tokens: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_slots = max_slots
        self.pack_tokens = PACK_TOKENS if pack_tokens is None else pack_tokens    # 0: each prefix alone
        self.graphs = str(self.backend.device).startswith("cuda") if graphs is None else graphs
        self._runner = runner
        self.pools = PoolSet()
        self._admitting: KVPool | None = None    # the pool the current group enters
        self._pull_tokens = 0                    # the longest first prompt of the pull being admitted
        self.rows: dict[int, _Row] = {}          # request handle -> its decoding state
        self._next_rid = 0
        self._tokenized: dict[bytes, list[int]] = {}      # recent prefix texts' tokenizations (LRU)
        self.stats = {"groups": 0, "prefix_tokens": 0, "prefill_s": 0.0, "suffix_rows": 0, "suffix_tokens": 0, "suffix_s": 0.0,
                      "prefix_passes": 0, "decode_steps": 0, "decode_ticks": 0, "decode_rows": 0, "decode_s": 0.0, "pools": [],
                      "capture_s": 0.0, "moves": 0,
                      "suffix_passes": 0, "drain_steps": 0, "drain_s": 0.0,
                      "prefix_times": [], "suffix_times": [],
                      "prefix_room_frees": 0, "prefix_retries": 0}

    @property
    def runner(self) -> Any:
        if self._runner is None:      # built on first use: it fuses the model's projections
            self._runner = ModelRunner(self.backend, self.graphs)
        return self._runner

    @property
    def chunk(self) -> None:
        """Whole prefix groups per pull (``groups_per_pull``): the slots keep decoding across pulls, and
        re-asks get in at the next pull."""
        return None

    def run(self, requests: list[GenRequest], settings: GenSettings) -> Outcomes:
        yield from self.run_stream([requests], settings)

    def run_stream(self, chunks: Iterable[list[GenRequest]], settings: GenSettings) -> Outcomes:
        """The next chunk is taken once the last one's questions all have slots, while they decode: a
        pool drains only when memory needs it for another, not at every chunk's end. With a drain per claim,
        two H100 ranks spent 174 s decoding what one GPU decoded in 103 s (bench/README.md)."""
        self._gen, self._settings = generator(settings, self.backend.device), settings
        try:
            for requests in chunks:
                if not requests:     # nothing new now, more may come: advance the work in flight
                    if self.rows:
                        yield from self._step(settings)
                    continue
                groups, plain = self._group(requests)
                if plain:
                    yield from self._drop_all(settings)
                    yield from Engine.run(self, plain, settings)
                yield from self._run_groups(sorted(groups.values(), key=lambda g: -g.need(settings)), settings)
            yield from self._drain(settings)
        finally:
            self.rows = {}
            while self.pools:
                self._retire(self.pools.pools[-1])
            self._admitting = None
            if self._runner is not None:
                self._runner.drop_graphs()
            st = self.stats
            st["rows_per_step"] = round(st["decode_rows"] / st["decode_steps"], 2) if st["decode_steps"] else None
            st["drain_step_share"] = round(st["drain_steps"] / st["decode_steps"], 3) if st["decode_steps"] else None
            free_memory()

    def _drop_all(self, settings: GenSettings) -> Outcomes:
        """Every pool drained and freed (before plain batches, or for a prefix that ran out of memory)."""
        yield from self._drain(settings)
        while self.pools:
            self._retire(self.pools.pools[-1])
        empty_cache()

    def _memory_note(self) -> str:
        """What the device holds, for a failure's log line (an OOM's cause is otherwise a guess)."""
        dev = str(self.backend.device)
        if not dev.startswith("cuda"):
            return ""
        import torch

        return (f" [allocated {torch.cuda.memory_allocated(dev) / 2**30:.1f} GiB; {len(self.pools.pools)} live "
                f"pool(s) hold {self.pools.held_bytes() / 2**30:.1f} GiB; {len(self.rows)} rows decoding]")

    def _retire(self, pool: KVPool) -> None:
        """A pool forgotten, its graphs dropped and its memory released at once (``KVPool.close``)."""
        self.pools.remove(pool)
        self.runner.drop_graphs(pool)
        pool.close()
        if self._admitting is pool:
            self._admitting = None

    def _fallback(self, members: list[_Split], e: BaseException, settings: GenSettings) -> Outcomes:
        held = self._memory_note()          # what the device held when it failed, and after the drop
        release_frames(e)
        if status_of(e) == "oom" and self.pools:   # give the plain engine the pools' memory
            yield from self._drop_all(settings)
        free_memory()
        log.warning("shared-prefix work on %d question(s) failed at %s (%s: %s): falling back to plain "
                    "batches; at the failure%s, after it%s", len(members), failed_at(e), type(e).__name__,
                    str(e)[:300], held, self._memory_note())
        for r, res, steps in super().run([m.req for m in members], settings):
            yield r, res, [Degradation("prefix_fallback", f"{type(e).__name__}: {e}"[:300])] + steps

    def _pool_with_room(self, need: int, P: int, pool: KVPool | None, settings: GenSettings) -> Iterator[Any]:
        """``pool`` once it has a free slot (decode steps until then); if a failure dropped it, a live
        pool that fits ``need`` or a new one, so only the questions in flight ever fall back."""
        while True:
            if pool not in self.pools:
                self._admitting = None       # steps that make room for a new pool are drain steps
                pool = self.pools.fitting(need, self.max_slots)     # (a pool with no requests is falsy)
                if pool is None:
                    pool = yield from self._new_pool(need, P, settings)
            self._admitting = pool
            while pool in self.pools and not pool.room:
                yield from self._step(settings)
            if pool in self.pools:
                return pool

    def _plain(self, members: list[_Split], settings: GenSettings) -> Outcomes:
        for r, res, steps in Engine.run(self, [x.req for x in members], settings):
            yield r, res, [Degradation("prefix_fallback", "a decode failure dropped the pool")] + steps

    def _new_pool(self, need: int, prefix_len: int, settings: GenSettings) -> Iterator[Any]:
        """A pool for ``need`` positions: beside the live pools if that gives it its full slot count,
        else after freeing idle pools, else after draining the busy ones. Returns it."""
        empty_cache()        # the prefix's activations go back before free memory is read
        length, per_tok = bucket_length(need), self.runner.shape.bytes_per_token()
        room = self._room(prefix_len, per_tok)
        beside, alone = new_pool_slots(room, self.pools.held_bytes(), length, per_tok, self.max_slots)
        while not keep_beside(beside, alone) and self.pools:
            yield from self._free_a_pool(settings)
            beside, alone = new_pool_slots(room, self.pools.held_bytes(), length, per_tok, self.max_slots)
        slots = alone
        if slots < 1:
            from ..errors import SampleOOM

            raise SampleOOM(f"no room for one {length}-token decode slot ({room / 2**30:.1f} GiB left)")
        pool = self.runner.new_pool(slots, length)
        entry = {"slots": slots, "length": length, "capture_s": 0.0, "graphs": 0, "steps": 0, "rows": 0,
                 "decode_s": 0.0, "beside": len(self.pools.pools)}
        self.stats["pools"].append(entry)
        self.pools.add(pool, entry)
        log.info("decode pool: %d slots of %d tokens (%.1f GiB), beside %d live", slots, length,
                 slots * length * per_tok / 2**30, entry["beside"])
        return pool

    def _free_a_pool(self, settings: GenSettings) -> Outcomes:
        """Memory for something new: the largest idle pool freed, else the largest busy pool drained (the
        others step too) and freed."""
        idle = self.pools.idle()
        pool = idle[0] if idle else max(self.pools.busy(), key=nbytes)
        while pool in self.pools and len(pool):
            yield from self._step(settings, drain=True)
        if pool in self.pools:
            self._retire(pool)
        empty_cache()

    def _room(self, prefix_len: int, per_tok: int) -> int:
        """Memory a new pool could have were every live pool freed."""
        free = self._free_bytes()
        if free is None:
            return self.token_budget * 8 * per_tok
        # made while this group's prefix cache (``prefix_len``) is held, which goes before the next
        # prefix: the pull's longest prompt (``_pull_tokens``) needs its cache and activations beside
        # the pools; each live pool's graphs keep their own memory
        later = prefix_pass_bytes(max(prefix_len, self._pull_tokens), per_tok) - prefix_len * per_tok
        return int(free + self.pools.held_bytes() - later - GRAPH_BYTES * len(self.pools.pools))   # whole bytes

    def _free_bytes(self) -> int | None:
        """Device memory free for new tensors (the driver's, and what the allocator holds unused); None
        off CUDA, where pools are sized from ``token_budget``."""
        dev = str(self.backend.device)
        if not dev.startswith("cuda"):
            return None
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))

    # ---- decoding -----------------------------------------------------------------------------------
    def _step(self, settings: GenSettings, drain: bool = False) -> Outcomes:
        """One decode step of every busy pool (one tick): a pool that no longer admits finishes its
        answers while the admitting one works."""
        self.stats["decode_ticks"] += 1
        for pool in self.pools.busy():
            if pool in self.pools and len(pool):        # a failure in this tick may have dropped it
                yield from self._step_pool(pool, settings, drain or pool is not self._admitting)

    def _step_pool(self, pool: KVPool, settings: GenSettings, drain: bool) -> Outcomes:
        runner = self.runner
        t0 = time.perf_counter()
        captured = runner.capture_s
        try:
            moves = pool.compact()
            logits = runner.step(pool)
            toks = pool.advance(pick(logits.float(), settings, self._gen))
        except Exception as e:  # noqa: BLE001 - the pool's running questions fall back to the plain engine
            rows = [self.rows.pop(r).split for r in list(self.pools.requests(pool))]
            self._retire(pool)       # its memory goes back before the plain batches run
            yield from self._fallback(rows, e, settings)
            return
        capture = runner.capture_s - captured         # a step size's first use captures its graph
        dt = time.perf_counter() - t0 - capture
        entry = self.pools.stats[pool]
        for d in (self.stats, entry):
            d["decode_s"] += dt
            d["capture_s"] += capture
        entry["rows"] += len(pool)
        entry["steps"] += 1
        entry["graphs"] = runner.graphs_of(pool)
        self.stats["decode_rows"] += len(pool)
        self.stats["moves"] += moves
        self.stats["decode_steps"] += 1
        if drain:            # no question can enter: the pool's last (long) answers step on their own
            self.stats["drain_steps"] += 1
            self.stats["drain_s"] += dt
        now = time.perf_counter()
        for rid, tok in toks.items():
            if self.rows[rid].add(tok, self.backend.eos_ids, now):
                yield self._finish(rid)

    def _drain(self, settings: GenSettings) -> Outcomes:
        while self.rows and self.pools.busy():
            yield from self._step(settings, drain=True)

    def _finish(self, rid: int) -> tuple[GenRequest, GenResult, list[Degradation]]:
        row = self.rows.pop(rid)
        self.pools.release(rid)
        text = self.backend.tokenizer.decode(row.tokens, skip_special_tokens=True)
        res = GenResult(text=text, output_tokens=len(row.tokens), input_tokens=row.n_input,
                        seconds=time.perf_counter() - row.t0, timed_out=row.timed_out)
        return row.split.req, res, []
