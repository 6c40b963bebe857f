"""The shared-prefix engine gives exactly the tokens of a plain batch-1 generate (tiny model, float32, CPU)."""
import logging

import pytest

from hitbench_utils import data as D
from hitbench_utils.backends.base import GenRequest, GenSettings
from hitbench_utils.config import RunConfig
from hitbench_utils.errors import SampleOOM
from hitbench_utils.engine import Engine, PrefixEngine
from hitbench_utils.prompts import build_prompt, load_templates
from hitbench_utils.backends.registry import make_engine
from hitbench_utils.run import Job
from hitbench_utils.runlog import read_log, view


def requests(sample_data, modality, fmt, n):
    t = load_templates()
    out = []
    for q in D.load_queries(sample_data / "QA_final.json")[:n]:
        p = build_prompt(t, q, modality, fmt, D.read_table(sample_data, fmt, q.file_name))
        img = D.load_image(sample_data / "image", q.file_name) if modality != "text" else None
        out.append(GenRequest(q.id, p.messages(), img, None, share_from=p.suffix))
    return out


@pytest.mark.parametrize("modality,fmt,n", [pytest.param("text", "csv", 40, marks=pytest.mark.slow), ("mix", "markdown", 12),
                                            ("text", "html", 8)])
def test_prefix_engine_matches_plain_generate_token_for_token(tiny_backend, sample_data, modality, fmt, n):
    reqs = requests(sample_data, modality, fmt, n)
    settings = GenSettings(max_new_tokens=32)
    plain = {r.key: tiny_backend.generate([r], settings)[0] for r in reqs}
    engine = PrefixEngine(tiny_backend, batch_size=4)
    groups, unsplit = engine._group(reqs)
    assert not unsplit and len(groups) < len(reqs)          # questions on one table share a prefix
    got = {r.key: res for r, res, steps in engine.run(reqs, settings)}
    assert set(got) == set(plain)
    for k in plain:
        assert got[k].text == plain[k].text and got[k].output_tokens == plain[k].output_tokens, k
    st = engine.stats          # text prefixes packed several to a prefill pass; an image prefix alone
    assert (st["prefix_passes"] < st["groups"]) == (modality == "text"), st


def test_questions_of_different_tables_share_decode_steps_and_stay_exact(tiny_backend, sample_data):
    """Continuous batching: with 3 slots, 40 questions on 10 tables decode together, and a finished
    question's slot is refilled mid-stream, yet every output is still the plain generate's."""
    reqs = requests(sample_data, "text", "csv", 40)
    for i, r in enumerate(reqs):
        r.max_new_tokens = 3 + (7 * i) % 17           # ragged lengths, so slots free up at different steps
    settings = GenSettings(max_new_tokens=32)
    plain = {r.key: tiny_backend.generate([r], settings)[0] for r in reqs}
    engine = PrefixEngine(tiny_backend, batch_size=4, max_slots=3)
    got = {r.key: res for r, res, _ in engine.run(reqs, settings)}
    assert {k: (v.text, v.output_tokens) for k, v in got.items()} == {k: (v.text, v.output_tokens) for k, v in plain.items()}
    st = engine.stats
    assert all(p["slots"] == 3 for p in st["pools"])
    # 3 slots kept busy: steps are about the decoded tokens / 3 (each first token comes from the
    # question's prefill), far fewer than one answer after another
    decoded = sum(v.output_tokens for v in plain.values()) - len(reqs)
    assert decoded / 3 <= st["decode_steps"] < decoded / 2, (st["decode_steps"], decoded)
    assert st["decode_rows"] > 2.5 * st["decode_steps"]


def test_rows_moved_down_when_slots_free_stay_exact(tiny_backend, sample_data):
    """When questions finish, the busy slots above are moved into the free ones below (their KV copied),
    so a pool's last long answers step over a few slots, not all of them; outputs do not change."""

    reqs = requests(sample_data, "text", "csv", 24)
    for i, r in enumerate(reqs):
        r.max_new_tokens = 30 if i % 8 == 7 else 2 + i % 5   # the last slot of each wave answers long
    settings = GenSettings(max_new_tokens=32)
    plain = {r.key: tiny_backend.generate([r], settings)[0] for r in reqs}
    engine = PrefixEngine(tiny_backend, batch_size=4, max_slots=8)
    got = {r.key: res for r, res, _ in engine.run(reqs, settings)}
    assert {k: (v.text, v.output_tokens) for k, v in got.items()} == {k: (v.text, v.output_tokens) for k, v in plain.items()}
    assert engine.stats["moves"] > 0
    # the pool itself: request "d" alone is left in slot 3; it moves to slot 0 and steps at size 1
    from hitbench_utils.engine.runner import ModelRunner

    runner = ModelRunner(tiny_backend, graphs=False)
    pool = runner.new_pool(4, 1024)
    for k, rid in enumerate("abcd"):
        assert pool.add(rid) == k
        runner.prefill(pool, rid, [100 + k, 200, 300 + k], 0, 0)
        pool.start(rid, 7 + k)
    logits = runner.step(pool)
    ref, picks = logits[3].clone(), logits.argmax(-1)
    assert pool.advance(picks) == {rid: int(picks[k]) for k, rid in enumerate("abcd")}
    for rid in "abc":
        pool.release(rid)
    assert pool.span() == 4 and pool.compact() == 1 and pool.slot("d") == 0 and pool.span() == 1
    assert pool.room == 3 and pool.length_of("d") == 4
    alone = runner.new_pool(1, 1024)
    alone.add("d")
    runner.prefill(alone, "d", [103, 200, 303], 0, 0)
    alone.start("d", 10)
    first = runner.step(alone)
    assert torch_close(first[0], ref)
    alone.advance(first.argmax(-1))
    moved, single = runner.step(pool), runner.step(alone)
    assert moved.shape[0] == 1 and torch_close(moved[0], single[0])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU: only there is the decode step replayed as CUDA graphs")
def test_cuda_graphs_of_every_step_size_match_plain_generate(sample_data):
    """On a GPU: one graph per step size, captured mid-run, and rows moved between slots, still give
    the plain generate's tokens (the tiny model in float32)."""
    from hitbench_utils.backends.hf import HFBackend
    from hitbench_utils.backends.tiny import tiny_model_dir

    backend = HFBackend(tiny_model_dir(), dtype="float32", attn_implementation="sdpa", device="cuda")
    reqs = requests(sample_data, "text", "json", 40)       # json: slots of 1K and 2K tokens
    for i, r in enumerate(reqs):
        r.max_new_tokens = 30 if i % 8 == 7 else 2 + (7 * i) % 11
    settings = GenSettings(max_new_tokens=32)
    plain = {r.key: backend.generate([r], settings)[0] for r in reqs}
    engine = PrefixEngine(backend, batch_size=4, max_slots=8)
    assert engine.graphs
    # one table per pull, short and long tables alternating: pools of different lengths follow each
    # other, and each new pool captures its own graphs
    groups = sorted(engine._group(reqs)[0].values(), key=lambda g: g.need(settings))
    pulls = [[m.req for m in g.members] for pair in zip(groups, groups[::-1]) for g in pair][:len(groups)]
    out = list(engine.run_stream(iter(pulls), settings))
    assert not [steps for _, _, steps in out if steps], "nothing may fall back"
    got = {r.key: res for r, res, _ in out}
    assert {k: (v.text, v.output_tokens) for k, v in got.items()} == {k: (v.text, v.output_tokens) for k, v in plain.items()}
    st = engine.stats
    assert st["moves"] > 0 and st["capture_s"] > 0 and max(p["graphs"] for p in st["pools"]) >= 3, st
    assert len(st["pools"]) >= 2 and all(p["graphs"] >= 1 for p in st["pools"]), st["pools"]


def torch_close(a, b) -> bool:
    import torch

    return bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4))


@pytest.mark.parametrize("where", ["prefix", "prefix once", "prefix with a pool", "packed prefix", "suffix", "step",
                                   "step mid-group"])
def test_a_failure_falls_back_to_plain_batches_for_the_questions_it_touched(tiny_backend, sample_data, monkeypatch, where):
    reqs = requests(sample_data, "text", "csv", 6)
    settings = GenSettings(max_new_tokens=4)
    plain = {r.key: tiny_backend.generate([r], settings)[0].text for r in reqs}
    # one slot: a question waits for the previous one's decode steps, so a step fails inside a group
    engine = PrefixEngine(tiny_backend, batch_size=4, max_slots=1 if where == "step mid-group" else 32,
                          pack_tokens=None if where == "packed prefix" else 0)     # 0: one prefix a pass
    calls, failed = [], []

    def boom(*a, **k):
        calls.append(1)
        if len(calls) in {"prefix with a pool": (2,), "prefix": (1, 2)}.get(where, (1,)):   # "prefix": its retry too
            failed.append(len(a[2]) if where == "suffix" else len(a[1]) if where == "packed prefix" else 1)
            raise SampleOOM(f"injected OOM in the {where}")
        return real(*a, **k)

    from hitbench_utils.engine.runner import ModelRunner
    target = {"prefix": (PrefixEngine, "_prefix"), "prefix with a pool": (PrefixEngine, "_prefix"),
              "prefix once": (PrefixEngine, "_prefix"),
              "packed prefix": (PrefixEngine, "_prefix"),
              "suffix": (ModelRunner, "prefill_group"), "step": (ModelRunner, "step"),
              "step mid-group": (ModelRunner, "step")}[where]
    real = getattr(target[0], target[1])
    monkeypatch.setattr(target[0], target[1], lambda *a, **k: boom(*a, **k))
    out = list(engine.run(reqs, settings))
    assert sorted(r.key for r, _, _ in out) == sorted(plain)           # nothing lost, nothing twice
    assert all(not isinstance(res, BaseException) and res.text == plain[r.key] for r, res, _ in out)
    fell = [r.key for r, _, steps in out if steps and steps[0].kind == "prefix_fallback"]
    if where in ("prefix with a pool", "prefix once"):   # pools dropped (if any), memory freed, the prefix
        assert not fell and len(calls) == 1 + len(engine.stats["prefix_times"])    # retried: no fallback
        assert len(engine.stats["pools"]) == (2 if where == "prefix with a pool" else 1)
        return
    if where == "packed prefix":    # the pack's groups each computed their own prefix: nothing fell back
        st = engine.stats
        assert failed[0] > 1 and not fell and st["prefix_passes"] == st["groups"] == failed[0], (failed, st)
        return
    if where == "suffix":
        assert failed == [1] and len(fell) == 1 or failed[0] > 1 and not fell   # a failed pass of several is
        return                                                                    # retried one by one
    assert fell, "the failure must be visible in the records' degradation steps"
    assert len(fell) < len(reqs) or where.startswith("step")


def test_per_request_cap_and_max_time(tiny_backend, sample_data):
    reqs = requests(sample_data, "text", "csv", 6)
    for r in reqs:
        r.max_new_tokens = 3
    engine = PrefixEngine(tiny_backend, batch_size=4)
    assert all(res.output_tokens <= 3 for _, res, _ in engine.run(reqs, GenSettings(max_new_tokens=32)))
    for r in reqs:
        r.max_new_tokens = None
    out = list(PrefixEngine(tiny_backend, batch_size=4).run(reqs, GenSettings(max_new_tokens=4000, max_time=1e-9)))
    assert len(out) == 6 and all(res.timed_out and 1 <= res.output_tokens <= 2 for _, res, _ in out)


def test_job_uses_the_prefix_engine_for_hf_backends(tmp_path, tiny_backend, sample_data):
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), limit=6, max_reasks=1,
                    device="cpu", score=False, format="csv")
    assert isinstance(make_engine(tiny_backend, cfg), PrefixEngine)
    s = Job(cfg, backend=tiny_backend, progress=False).execute()
    assert s["verdict"] == "complete"
    recs = view(read_log(tmp_path / "run").records)
    assert all(r["reasks"] == 1 and r["output_tokens"] == 32 for r in recs.values())


@pytest.mark.parametrize("B,H,M,L", [(3, 2, 4, 4096), (1, 8, 256, 32768)])   # the second splits its queries
def test_split_key_attention_matches_sdpa(B, H, M, L):
    import torch
    import torch.nn.functional as F

    from hitbench_utils.engine.attention import attend

    g = torch.Generator().manual_seed(0)
    q, K, V = (torch.randn(B, H, n, 16, generator=g) for n in (M, L, L))
    lengths = torch.randint(1, L, (B,), generator=g)
    mask = (torch.arange(L)[None, :] < lengths[:, None])[:, None, None, :].expand(B, 1, M, L)
    ref = F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=0.25)
    got = attend(q, K, V, mask, 0.25)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prompts", ["default", "instruction-first"])
def test_both_bundled_templates_match_plain_generate_and_group_as_their_layout_says(tiny_backend, sample_data, prompts):
    """Table first: one prefix group per table. Instruction first: one per (table, instruction). Either
    way each group's further questions go through one packed pass, token for token the plain generate's."""
    t = load_templates(prompts)
    qs = D.load_queries(sample_data / "QA_final.json")[:16]
    reqs = []
    for q in qs:
        p = build_prompt(t, q, "text", "csv", D.read_table(sample_data, "csv", q.file_name))
        reqs.append(GenRequest(q.id, p.messages(), None, None, share_from=p.suffix, max_new_tokens=2 + q.id % 9))
    settings = GenSettings(max_new_tokens=12)
    plain = {r.key: tiny_backend.generate([r], settings)[0] for r in reqs}
    engine = PrefixEngine(tiny_backend, batch_size=4)
    groups, unsplit = engine._group(reqs)
    want = {(q.file_name, t.share_key(q)) for q in qs}
    assert not unsplit and len(groups) == len(want)
    if prompts == "default":
        assert len(groups) == len({q.file_name for q in qs})
    else:
        assert len(groups) > len({q.file_name for q in qs})
    got = {r.key: res for r, res, steps in engine.run(reqs, settings) if not steps}
    assert {k: (v.text, v.output_tokens) for k, v in got.items()} == {k: (v.text, v.output_tokens) for k, v in plain.items()}
    st = engine.stats
    assert st["groups"] == len(groups) and st["suffix_rows"] == len(reqs) - len(groups)
    # each group's further questions in one packed pass, not one pass each
    assert st["suffix_passes"] == sum(len(g.members) > 1 for g in groups.values())
    if prompts == "default":
        assert st["suffix_passes"] < st["suffix_rows"]


@pytest.mark.parametrize("cls", [PrefixEngine, Engine])
def test_an_empty_chunk_advances_the_work_in_flight(tiny_backend, sample_data, cls):
    """The stream protocol: ``[]`` means nothing new now. A source that sends its next request only once
    it has seen a result (a re-ask) gets it run; the stream ending means no more work."""
    reqs = requests(sample_data, "text", "csv", 6)
    for r in reqs:
        r.max_new_tokens = 5
    settings = GenSettings(max_new_tokens=8)
    seen, asked = [], []

    def source():
        yield reqs
        while not seen:
            asked.append(1)
            assert len(asked) < 100, "the engine asked again without advancing"
            yield []
        first = seen[0]
        yield [GenRequest(("again", first.key), first.messages, None, None, share_from=first.share_from)]

    out = []
    for r, res, steps in cls(tiny_backend, batch_size=4).run_stream(source(), settings):
        seen.append(r)
        out.append((r, res))
    keys = [r.key for r, _ in out]
    assert sorted(map(str, keys)) == sorted(map(str, [r.key for r in reqs] + [("again", seen[0].key)]))
    again = next(res for r, res in out if r.key == ("again", seen[0].key))
    ref = tiny_backend.generate([GenRequest(0, seen[0].messages)], settings)[0]
    assert (again.text, again.output_tokens) == (ref.text, ref.output_tokens)
    assert (len(asked) > 0) == (cls is PrefixEngine)     # the plain engine finishes each chunk before the next


@pytest.mark.parametrize("P,T", [(700, 3), (5000, 40), (0, 7)])
def test_attention_after_a_prefix_sees_the_prefix_and_its_own_earlier_tokens(P, T):
    """A suffix's queries after ``P`` keys: query t sees keys 0..P+t, and query head h reads KV head
    h // (heads per KV head), as the model's own attention over (prefix + suffix) does."""
    import torch

    from hitbench_utils.engine.attention import attend_after

    g = torch.Generator().manual_seed(1)
    heads, kv, D = 8, 2, 16
    q = torch.randn(1, heads, T, D, generator=g)
    K, V = (torch.randn(1, kv, P + T, D, generator=g) for _ in range(2))
    got = attend_after(q, K, V, 0.25)
    Kr, Vr = K.repeat_interleave(heads // kv, 1), V.repeat_interleave(heads // kv, 1)
    s = (q @ Kr.transpose(-1, -2)) * 0.25
    visible = torch.arange(P + T)[None, :] <= P + torch.arange(T)[:, None]
    ref = s.masked_fill(~visible, float("-inf")).softmax(-1) @ Vr
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5, rtol=1e-4)


def test_job_request_hook_sees_every_request_first_ask_and_reask(tmp_path, tiny_backend, sample_data):
    """The public seam benchmarks use (scripted output lengths): every GenRequest passes through it
    before the engine, the re-ask too, and what it returns is what runs."""
    seen = []

    def hook(req):
        seen.append(req.key)
        req.max_new_tokens = 3
        return req

    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), limit=4, max_reasks=1,
                    device="cpu", score=False, format="csv")
    s = Job(cfg, backend=tiny_backend, progress=False, request_hook=hook).execute()
    assert s["verdict"] == "complete"
    recs = view(read_log(tmp_path / "run").records)
    assert sorted(seen) == sorted(list(recs) * 2)                  # first ask and one re-ask per id
    assert all(r["output_tokens"] == 3 and r["reasks"] == 1 for r in recs.values())


def test_packed_prefixes_give_the_models_own_cache_and_logits(tiny_backend, sample_data):
    """``prefixes``: several groups' first prompts in one pass give each prompt the keys, values and
    last logits of the model's own forward over it alone (float32)."""
    import torch
    from transformers import DynamicCache

    from hitbench_utils.engine import runner as R

    engine = PrefixEngine(tiny_backend, batch_size=4)
    groups = list(engine._group(requests(sample_data, "text", "html", 8))[0].values())
    firsts = [g.members[0] for g in groups][:3]
    runner = R.ModelRunner(tiny_backend, graphs=False)
    got = runner.prefixes(firsts)
    assert len(got) == len(firsts) >= 2
    for f, (cache, P, delta, logits) in zip(firsts, got):
        ids = torch.tensor([f.prefix_ids + f.suffix_ids])
        ref = DynamicCache()
        with torch.no_grad():
            out = tiny_backend.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     **{R.cache_kw(tiny_backend.model): ref}, use_cache=True)
        assert (P, delta) == (len(f.prefix_ids), 0)
        assert torch.allclose(logits, out.logits[0, -1], atol=1e-4, rtol=1e-4)
        for mine, theirs in zip(cache.layers, ref.layers):
            assert torch.allclose(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
            assert torch.allclose(mine.values, theirs.values, atol=1e-4, rtol=1e-4)


def test_prefixes_too_long_to_pack_run_alone_through_the_models_forward(tiny_backend, sample_data, caplog):
    """With room for one prompt a pass, each prefix is the model's own forward; answers unchanged."""
    reqs = requests(sample_data, "text", "markdown", 8)
    settings = GenSettings(max_new_tokens=16)
    plain = {r.key: tiny_backend.generate([r], settings)[0] for r in reqs}
    engine = PrefixEngine(tiny_backend, batch_size=4, pack_tokens=64)
    with caplog.at_level(logging.INFO, logger="hitbench"):
        got = {r.key: res for r, res, steps in engine.run(reqs, settings) if not steps}
    assert "packed prefill" not in caplog.text
    assert {k: (v.text, v.output_tokens) for k, v in got.items()} == {k: (v.text, v.output_tokens) for k, v in plain.items()}
    assert engine.stats["prefix_passes"] == engine.stats["groups"] > 1
    assert min(P for lengths, _ in engine.stats["prefix_times"] for P in lengths) > 64


def test_a_dropped_pool_and_a_used_prefix_cache_are_freed_at_once(tiny_backend, sample_data, monkeypatch):
    """Pool sizing reads free memory: a retired pool or a group's prefix cache that lived on until a
    garbage collection (a reference cycle) would shrink every later pool, or make it run out of memory.
    With collection off, each is gone as soon as the engine drops it, through an OOM retry too, and before
    the device's cache is emptied: on an H200, a pool still referenced there (a local) went to the cache
    instead, the next prefix cache was carved out of its blocks, and the next pool ran out of memory with
    75 GiB reserved but unusable."""
    import gc
    import weakref

    from hitbench_utils.engine import runner as R
    from hitbench_utils.engine import scheduler as S

    made, caches, calls = [], [], []
    new_pool, prefix = R.ModelRunner.new_pool, R.ModelRunner.prefix

    def tracked_pool(self, *a):
        made.append(weakref.ref(pool := new_pool(self, *a)))
        return pool

    def tracked_prefix(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise SampleOOM("injected OOM in a prefix, with a pool live")
        out = prefix(self, *a)
        caches.append(weakref.ref(out[0]))
        return out

    def dropped_pools_dead() -> None:       # when the device's cache empties, no dropped pool holds memory
        emptied.append(1)
        live = {id(p) for p in engine.pools.pools}
        assert all(w() is None or id(w()) in live or not w().K for w in made), "a dropped pool holds its KV"

    emptied: list = []
    monkeypatch.setattr(R.ModelRunner, "new_pool", tracked_pool)
    monkeypatch.setattr(R.ModelRunner, "prefix", tracked_prefix)
    monkeypatch.setattr(S, "empty_cache", dropped_pools_dead)
    reqs = requests(sample_data, "text", "json", 24)
    for i, r in enumerate(reqs):
        r.max_new_tokens = 3 + (7 * i) % 11
    settings = GenSettings(max_new_tokens=16)
    engine = PrefixEngine(tiny_backend, batch_size=4, max_slots=3, pack_tokens=0)
    groups = sorted(engine._group(reqs)[0].values(), key=lambda g: g.need(settings))
    pulls = [[m.req for m in g.members] for g in groups]        # shortest first: each pull a longer pool
    gc.disable()
    try:
        out = []
        for r, res, steps in engine.run_stream(iter(pulls), settings):
            out.append(steps)
            live = {id(p) for p in engine.pools.pools}
            assert all(w() is None or id(w()) in live for w in made), "a dropped pool is still alive"
            assert sum(w() is not None for w in caches) <= 1, "a used prefix cache is still alive"
    finally:
        gc.enable()
    assert len(out) == len(reqs) and not any(out) and len(made) >= 2 and len(calls) > 3 and len(emptied) >= len(made)
