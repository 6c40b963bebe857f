"""The shared-prefix scheduler against a stand-in model runner, on the CPU, in milliseconds.

The stand-in "model" reads each request's whole history back out of the KV pool (token ids stored as
keys) to pick the next token, so a KV copy that went wrong (a prefix load, a packed suffix, a slot moved
down by compaction) changes the answer. Every answer must equal the plain sequential loop's, while the
scheduler switches pools, packs suffixes, compacts, drains and falls back on failures.
"""
from __future__ import annotations

import random

import pytest

from hitbench_utils.backends.base import Capabilities, GenRequest, GenResult, GenSettings
from hitbench_utils.engine.kv_pool import KVPool, KVShape
from hitbench_utils.engine.scheduler import PrefixEngine
from hitbench_utils.errors import SampleOOM

EOS = 1


def next_token(history: list[int]) -> int:
    """The stand-in model: a deterministic function of the whole history (EOS about 1 time in 40)."""
    h = sum((i + 1) * t for i, t in enumerate(history[-8:])) + 7 * len(history)
    return h % 40 + 1


class CharTokenizer:
    """One token per character (its code point), so every cut tokenizes the same on its own."""

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        out = {"input_ids": [ord(c) for c in text]}
        if return_offsets_mapping:
            out["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


class FakeBackend:
    name, info, identity, device = "fake", {}, {}, "cpu"
    capabilities = Capabilities(shared_prefix=True)
    default_max_new_tokens = 64
    eos_ids = {EOS}

    def __init__(self) -> None:
        self.tokenizer = CharTokenizer()
        self.model = None
        self.generated: list = []

    @staticmethod
    def chat_text(messages: list[dict]) -> str:
        return "".join(m["content"] for m in messages)

    def admit(self, requests: list[GenRequest]) -> None:
        pass

    def count_tokens(self, messages: list[dict], image=None) -> int:
        return len(self.chat_text(messages))

    def generate(self, requests: list[GenRequest], settings: GenSettings) -> list[GenResult]:
        """The plain sequential loop: the reference, and what fallbacks run."""
        out = []
        for r in requests:
            self.generated.append(r.key)
            h, toks = [ord(c) for c in self.chat_text(r.messages)], []
            cap = min(settings.max_new_tokens, r.max_new_tokens or settings.max_new_tokens)
            while len(toks) < cap:
                t = next_token(h)
                if t == EOS:
                    break
                toks.append(t)
                h.append(t)
            out.append(GenResult(self.tokenizer.decode(toks), len(toks), len(h) - len(toks)))
        return out


def onehot(rows: list[int]):
    import torch

    x = torch.full((len(rows), 64), -1.0)
    for i, t in enumerate(rows):
        x[i, t] = 1.0
    return x


class FakeRunner:
    """The runner's interface over a real ``KVPool`` (1 layer, 1 head, 1 dim: a token id per position)."""

    def __init__(self, fail_step_at: int | None = None) -> None:
        import torch

        self.shape = KVShape(1, 1, 1, torch.float64)
        self.capture_s = 0.0
        self.steps, self.fail_step_at = 0, fail_step_at
        self.rows_per_step: list[int] = []
        self.pools: list[KVPool] = []
        self.live: list[KVPool] = []           # pools made and not yet dropped
        self.most_live_positions = 0           # KV positions the live pools held at once, at most
        self.passes: list[int] = []            # questions per suffix pass
        self.packs: list[int] = []             # prefixes per prefill pass
        self.left_in_dropped: list[int] = []

    def new_pool(self, slots: int, length: int) -> KVPool:
        self.pools.append(KVPool(self.shape, slots, length, "cpu"))
        self.live.append(self.pools[-1])
        self.most_live_positions = max(self.most_live_positions, sum(p.slots * p.length for p in self.live))
        return self.pools[-1]

    def drop_graphs(self, pool: KVPool | None = None) -> None:
        if pool is not None:
            self.left_in_dropped.append(len(pool))      # requests a retired pool still held (none may)
        self.live = [] if pool is None else [p for p in self.live if p is not pool]

    def graphs_of(self, pool: KVPool) -> int:
        return 0

    @staticmethod
    def _history(pool: KVPool, slot: int, n: int) -> list[int]:
        return [int(x) for x in pool.K[0][slot, 0, :n, 0].tolist()]

    @staticmethod
    def _write(pool: KVPool, slot: int, start: int, ids: list[int]) -> None:
        import torch

        pool.K[0][slot, 0, start:start + len(ids), 0] = torch.tensor(ids, dtype=torch.float64)

    @staticmethod
    def _prefix(first):
        ids = first.prefix_ids + first.suffix_ids
        return ids, len(first.prefix_ids), 0, onehot([next_token(ids)])[0]

    def prefix(self, first, image):
        self.packs.append(1)
        return self._prefix(first)

    def prefixes(self, firsts):
        self.packs.append(len(firsts))
        return [self._prefix(f) for f in firsts]

    def load(self, pool: KVPool, rid, cache: list[int], n: int, position: int) -> None:
        self._write(pool, pool.slot(rid), 0, cache[:n])
        pool.written(rid, n, position)

    def prefill_group(self, pool: KVPool, rids, cache: list[int], P: int, suffixes, position: int):
        self.passes.append(len(rids))
        rows = []
        for rid, suffix in zip(rids, suffixes):
            slot = pool.slot(rid)
            self._write(pool, slot, 0, cache[:P] + suffix)
            pool.written(rid, P + len(suffix), position + len(suffix))
            rows.append(next_token(self._history(pool, slot, P + len(suffix))))
        return onehot(rows)

    def step(self, pool: KVPool):
        self.steps += 1
        if self.fail_step_at is not None and self.steps == self.fail_step_at:
            raise SampleOOM("injected OOM in a decode step")
        S, rows = pool.span(), []
        self.rows_per_step.append(int(pool.active[:S].sum()))
        for s in range(S):
            if not pool.active[s]:
                rows.append(2)            # an idle slot's row is junk, as on the real runner
                continue
            n = int(pool.wr[s])
            self._write(pool, s, n, [int(pool.tok[s])])
            rows.append(next_token(self._history(pool, s, n + 1)))
            pool.wr[s] += 1
            pool.pos[s] += 1
        return onehot(rows)


def make_requests(n_tables: int, seed: int) -> list[GenRequest]:
    """Questions on tables of very different sizes (slot lengths 1K to 8K), ragged answer caps."""
    rng = random.Random(seed)
    reqs = []
    for t in range(n_tables):
        table = f"<table {t}>" + "".join(chr(65 + rng.randrange(26)) for _ in range(rng.choice([200, 900, 2500, 6000])))
        for k in range(rng.randint(1, 7)):
            q = f"Q{k}: " + "".join(chr(97 + rng.randrange(26)) for _ in range(rng.randint(5, 60)))
            reqs.append(GenRequest((t, k), [{"role": "user", "content": table + q}], share_from=q,
                                   max_new_tokens=rng.choice([1, 3, 12, 40, 200])))
    return reqs


def answers(outcomes) -> dict:
    return {r.key: (res.text, res.output_tokens) for r, res, _ in outcomes}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", ["longest first", "as they come"])
def test_every_answer_is_the_plain_loops_through_pool_switches_packing_and_compaction(seed, order):
    backend, runner = FakeBackend(), FakeRunner()
    reqs = make_requests(24, seed)
    settings = GenSettings(max_new_tokens=150)
    ref = answers(zip(reqs, backend.generate(reqs, settings), [[]] * len(reqs)))
    backend.generated.clear()
    engine = PrefixEngine(backend, batch_size=4, token_budget=4096, max_slots=6, runner=runner)
    if order == "longest first":
        out = list(engine.run(reqs, settings))
    else:            # one table per pull, in table order: short and long tables alternate
        by_table: dict = {}
        for r in reqs:
            by_table.setdefault(r.key[0], []).append(r)
        out = list(engine.run_stream(iter(by_table.values()), settings))
    assert sorted(r.key for r, _, _ in out) == sorted(r.key for r in reqs)     # each once, none lost
    assert answers(out) == ref and not any(steps for _, _, steps in out)
    assert not backend.generated, "nothing fell back to the plain loop"
    st = engine.stats
    lengths = [p["length"] for p in st["pools"]]
    assert len(set(lengths)) >= 3                      # slot lengths follow the tables: pools switch
    assert all(x <= 6 for x in runner.rows_per_step) and max(runner.rows_per_step) == 6   # full, never over
    assert st["moves"] > 0 and st["drain_steps"] > 0
    assert max(runner.passes) > 1 and sum(runner.passes) == st["suffix_rows"]          # suffixes packed
    # prefixes packed into shared passes within a pull (one pull here, or a table a pull: none to pack)
    assert sum(runner.packs) == st["groups"] and len(runner.packs) == st["prefix_passes"]
    assert (max(runner.packs) > 1) == (order == "longest first")
    # rows in flight never exceed the pool's slots, and each pool is left empty
    assert not any(runner.left_in_dropped) and len(runner.left_in_dropped) == len(runner.pools)


def test_a_failed_decode_step_sends_only_the_rows_in_flight_to_the_plain_loop():
    backend, runner = FakeBackend(), FakeRunner(fail_step_at=15)
    reqs = make_requests(10, 3)
    settings = GenSettings(max_new_tokens=150)
    ref = answers(zip(reqs, backend.generate(reqs, settings), [[]] * len(reqs)))
    backend.generated.clear()
    out = list(PrefixEngine(backend, batch_size=4, token_budget=4096, max_slots=4, runner=runner).run(reqs, settings))
    assert answers(out) == ref
    fell = {r.key for r, _, steps in out if steps and steps[0].kind == "prefix_fallback"}
    assert fell and fell == set(backend.generated) and len(fell) <= 4 < len(reqs)


def test_the_pool_is_keyed_by_request_and_compaction_keeps_each_requests_kv():
    import torch

    pool = KVPool(KVShape(1, 1, 1, torch.float64), 4, 16, "cpu")
    for k, rid in enumerate("abcd"):
        assert pool.add(rid) == k
        pool.K[0][k, 0, :3, 0] = torch.tensor([10.0 * k, 10.0 * k + 1, 10.0 * k + 2])
        pool.written(rid, 3, 3)
        pool.start(rid, 100 + k)
    with pytest.raises(ValueError, match="already holds a slot"):
        pool.add("a")
    pool.release("a")
    pool.release("b")
    assert pool.room == 2 and pool.span() == 4 and "a" not in pool and len(pool) == 2
    assert pool.compact() == 2 and pool.span() == 2       # "d" from slot 3 into 0, "c" from 2 into 1
    assert (pool.slot("d"), pool.slot("c")) == (0, 1) and pool.compact() == 0
    assert pool.K[0][pool.slot("d"), 0, :3, 0].tolist() == [30.0, 31.0, 32.0]
    assert int(pool.tok[pool.slot("d")]) == 103 and bool(pool.active[pool.slot("d")])
    picks = torch.zeros(pool.span(), dtype=torch.long)
    picks[pool.slot("c")], picks[pool.slot("d")] = 7, 8
    assert pool.advance(picks) == {"c": 7, "d": 8} and pool.length_of("d") == 4
    with pytest.raises(ValueError, match="slot length 16 < 17"):
        pool.written("c", 17, 17)


def alternating_requests(n_tables: int) -> list[GenRequest]:
    """Tables of two sizes in turn (slot lengths 1K and 4K), as a plan by file size alternates between
    neighbouring buckets; a few questions each."""
    rng, reqs = random.Random(5), []
    for t in range(n_tables):
        table = f"<table {t}>" + "".join(chr(65 + rng.randrange(26)) for _ in range(300 if t % 2 else 2500))
        for k in range(3):
            q = f"Q{k}: " + "".join(chr(97 + rng.randrange(26)) for _ in range(rng.randint(5, 30)))
            reqs.append(GenRequest((t, k), [{"role": "user", "content": table + q}], share_from=q,
                                   max_new_tokens=rng.choice([3, 40, 200])))
    return reqs


def run_alternating(n_tables: int, token_budget: int) -> tuple[PrefixEngine, FakeRunner]:
    """One table per pull, with memory for ``token_budget`` x 8 KV positions (the CPU's pool sizing);
    every answer must be the plain loop's, and none may fall back."""
    backend, runner = FakeBackend(), FakeRunner()
    reqs = alternating_requests(n_tables)
    settings = GenSettings(max_new_tokens=200)
    ref = answers(zip(reqs, backend.generate(reqs, settings), [[]] * len(reqs)))
    backend.generated.clear()
    engine = PrefixEngine(backend, batch_size=4, token_budget=token_budget, max_slots=4, runner=runner)
    by_table: dict = {}
    for r in reqs:
        by_table.setdefault(r.key[0], []).append(r)
    out = list(engine.run_stream(iter(by_table.values()), settings))
    assert answers(out) == ref and not backend.generated
    return engine, runner


def test_alternating_slot_lengths_reuse_live_pools_that_step_together():
    """The whole text_latex setting made 323 pools for 528 tables when one pool lived at a time. With
    memory for both, two lengths in turn make two pools, each keeps decoding while the other admits."""
    engine, runner = run_alternating(16, token_budget=8192)
    st = engine.stats
    assert sorted(p["length"] for p in st["pools"]) == [1024, 4096]          # made once each
    assert st["pools"][1]["beside"] == 1
    assert st["decode_ticks"] < st["decode_steps"]            # ticks in which both pools stepped
    assert runner.most_live_positions <= 8192 * 8             # the engine's memory (CPU: 8 x token_budget)


def test_short_memory_frees_or_drains_a_pool_before_making_the_next():
    """Room for one pool at a time: each switch frees the last pool first (drained if busy), so the
    live pools never hold more than the memory, and every answer is still the plain loop's."""
    engine, runner = run_alternating(8, token_budget=2048)
    st = engine.stats
    assert len(st["pools"]) == 8 and all(p["beside"] == 0 for p in st["pools"])    # one at a time
    assert runner.most_live_positions <= 2048 * 8
    assert st["drain_steps"] > 0 and not any(runner.left_in_dropped) and len(runner.left_in_dropped) == len(runner.pools)



def test_pool_sizing_on_a_gpu_gives_whole_slot_counts(monkeypatch):
    """On CUDA the room comes from free memory less float-sized estimates; a float slot count made every
    new pool fail (``torch.zeros`` takes ints) and sent a whole H200 run to the plain loop."""
    import torch

    from hitbench_utils.engine.pools import new_pool_slots

    backend = FakeBackend()
    engine = PrefixEngine(backend, batch_size=4, runner=FakeRunner())
    backend.device = "cuda:0"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (100 * 2**30, 140 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: 0)
    room = engine._room(12345, 147456)
    assert type(room) is int and 90 * 2**30 < room < 100 * 2**30
    beside, alone = new_pool_slots(float(room), 0, 4096, 147456, 32)
    assert type(beside) is int and type(alone) is int and alone == 32


class DeviceMemory:
    """A GPU's memory for the CUDA sizing path on the CPU: ``capacity`` bytes less the live pools'. The
    runner's prefix pass needs its cache and as much again for activations, and raises an out-of-memory
    error (counted) when they do not fit, as the model's forward does."""

    def __init__(self, monkeypatch, runner: FakeRunner, capacity: int) -> None:
        import torch

        from hitbench_utils.engine import admission, pools, scheduler
        from hitbench_utils.engine.pools import nbytes

        self.capacity, self.runner, self.ooms = capacity, runner, 0
        self.free = lambda: capacity - sum(nbytes(p) for p in runner.live)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (self.free(), capacity))
        for name in ("memory_reserved", "memory_allocated"):       # the allocator holds nothing unused
            monkeypatch.setattr(torch.cuda, name, lambda *a: capacity - self.free())
        monkeypatch.setattr(pools, "RESERVE_BYTES", 0)           # bytes here are 16 a token: no GiB reserves
        monkeypatch.setattr(scheduler, "GRAPH_BYTES", 0)
        monkeypatch.setattr(admission, "sync", lambda device: None)
        monkeypatch.setattr(scheduler, "empty_cache", self._empty_cache)
        self.emptied = 0
        for name in ("prefix", "prefixes"):
            monkeypatch.setattr(runner, name, self._needing_memory(getattr(runner, name)))

    def _empty_cache(self) -> None:
        """A dropped pool still holding its KV here would go to the allocator's cache, not the device."""
        self.emptied += 1
        assert all(not p.K for p in self.runner.pools if not any(p is q for q in self.runner.live))

    def _needing_memory(self, pass_):
        def run(arg, *rest):
            firsts = arg if isinstance(arg, list) else [arg]
            need = 2 * sum(len(f.prefix_ids) + len(f.suffix_ids) for f in firsts) * self.runner.shape.bytes_per_token()
            if need > self.free():
                self.ooms += 1
                raise SampleOOM(f"prefix pass needs {need} bytes, {self.free()} free")
            return pass_(arg, *rest)
        return run


def test_a_long_prefix_after_pools_filled_the_memory_gets_room_first_and_never_runs_out(monkeypatch):
    """Pools sized beside a short prefix leave too little for a longer table's prefix pass. On an H200
    that pass ran out of memory (every pool drained for a retry, or a fallback). The engine reads free
    memory before each prefix pass and frees pools first: no pass may fail, nothing falls back."""
    backend, runner = FakeBackend(), FakeRunner()
    backend.device = "cuda:0"
    per_tok = runner.shape.bytes_per_token()
    memory = DeviceMemory(monkeypatch, runner, capacity=48 * 1024 * per_tok)
    rng, reqs = random.Random(7), []
    for t, size in enumerate([300, 2500, 6000, 300, 6000, 2500]):
        table = f"<table {t}>" + "".join(chr(65 + rng.randrange(26)) for _ in range(size))
        for k in range(3):
            q = f"Q{k}: " + "".join(chr(97 + rng.randrange(26)) for _ in range(rng.randint(5, 30)))
            reqs.append(GenRequest((t, k), [{"role": "user", "content": table + q}], share_from=q,
                                   max_new_tokens=rng.choice([3, 40, 200])))
    settings = GenSettings(max_new_tokens=200)
    ref = answers(zip(reqs, backend.generate(reqs, settings), [[]] * len(reqs)))
    backend.generated.clear()
    engine = PrefixEngine(backend, batch_size=4, runner=runner, graphs=False)
    by_table: dict = {}
    for r in reqs:
        by_table.setdefault(r.key[0], []).append(r)
    out = list(engine.run_stream(iter(by_table.values()), settings))        # a table a pull: no lookahead
    assert answers(out) == ref and not backend.generated and not any(steps for _, _, steps in out)
    assert memory.ooms == 0 and engine.stats["prefix_retries"] == 0
    assert engine.stats["prefix_room_frees"] > 0                  # the memory was short: pools made room
    assert max(p["slots"] for p in engine.stats["pools"]) == 32   # and pools still fill what is free
    assert memory.emptied > 0
