"""The retry policy and the generate step on a fake engine: no model, no tokenizer, no data files."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

from hitbench_utils.backends.base import GenRequest, GenResult
from hitbench_utils.data import Query
from hitbench_utils.errors import MissingInputError, SampleTimeout
from hitbench_utils.faults import InjectedOOM
from hitbench_utils.pipeline import generate
from hitbench_utils.policy import Final, Resubmit, SamplePolicy
from hitbench_utils.prepare import Prepared
from hitbench_utils.prompts import Prompt
from hitbench_utils.records import Degradation, SampleRecord

REASK = "\n\nREMIND"
OK = "thinking\n[Final Answer]: 42"
NO_LINE = "no final line here"


class FakeRefit:
    """Preparation as the policy sees it: refitting lowers the token count it reports."""

    def __init__(self, max_reasks: int = 2) -> None:
        self.cfg = SimpleNamespace(max_reasks=max_reasks, max_input_tokens=100_000, oom_floor_tokens=8192,
                                   oom_floor_pixels=65536, max_time_per_sample=None)
        self.reask, self.fits = REASK, []

    def fit(self, p: Prepared, limit: int | None = None) -> list[dict]:
        self.fits.append(limit)
        p.record.input_tokens_sent = limit
        return msgs(f"table cut to {limit}")

    def halve_image(self, p: Prepared, why: str) -> None:
        raise AssertionError("no image here")

    def request(self, p: Prepared, messages: list[dict]) -> GenRequest:
        return GenRequest(p.record.id, messages, None, p.record.input_tokens_sent, share_from="Q")


def msgs(text: str) -> list[dict]:
    return [{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": text}]}]


def prepared(i: int, tokens: int = 40_000, qtype: str = "Fact Checking") -> Prepared:
    q = Query(i, f"t{i % 3}", f"question {i}", qtype, "", "42")
    rec = SampleRecord.start(q, 1)
    rec.input_tokens_sent = tokens
    p = Prepared(rec, Prompt("s", "", "table", "Q", False), table="table")
    p.request = GenRequest(i, msgs("full prompt"), None, tokens, share_from="Q")
    return p


def answer(text: str, **kw: Any) -> GenResult:
    return GenResult(text=text, output_tokens=3, **kw)


def test_an_answer_with_its_final_line_is_final_at_once():
    pol = SamplePolicy(prepared(1), FakeRefit())
    out = pol.on_outcome(pol.first(), answer(OK), [])
    assert isinstance(out, Final) and out.record.status == "ok" and out.record.prediction == "42"
    assert out.record.answer_format_ok and out.record.reasks == 0


def test_a_missing_final_line_is_reasked_with_the_same_prompt_and_then_kept_as_ok():
    pol = SamplePolicy(prepared(1), FakeRefit(max_reasks=2))
    first = pol.first()
    r1 = pol.on_outcome(first, answer(NO_LINE), [])
    assert isinstance(r1, Resubmit)
    assert r1.request.messages[-1]["content"][-1]["text"] == "full prompt" + REASK     # never the old answer
    r2 = pol.on_outcome(r1.request, answer(NO_LINE), [])
    assert isinstance(r2, Resubmit) and r2.request.messages == r1.request.messages
    out = pol.on_outcome(r2.request, answer("still\nnothing"), [])
    assert isinstance(out, Final)
    rec = out.record
    assert rec.status == "ok" and rec.answer_format_ok is False and rec.reasks == 2 and rec.prediction == "nothing"
    assert not rec.permanent and not rec.transient            # not retried on resume (greedy would repeat it)


def test_oom_walks_the_token_ladder_then_ends_as_an_oom_record():
    refit = FakeRefit()
    pol = SamplePolicy(prepared(1, tokens=40_000), refit)
    req, limits = pol.first(), []
    while True:
        out = pol.on_outcome(req, InjectedOOM(), [])
        if isinstance(out, Final):
            break
        req = out.request
        limits.append(req.input_tokens)
    assert limits == [20_000, 10_000, 8192]
    rec = out.record
    assert rec.status == "oom"
    assert [d.kind for d in rec.degraded] == ["token_budget"] * 3
    assert [(d.before, d.after) for d in rec.degraded] == [(40_000, 20_000), (20_000, 10_000), (10_000, 8192)]
    assert rec.tried[-1].kind == "failed" and rec.tried[:3] == rec.degraded


def test_a_reask_after_an_oom_uses_the_refitted_prompt():
    pol = SamplePolicy(prepared(1), FakeRefit())
    r = pol.on_outcome(pol.first(), InjectedOOM(), [])
    r2 = pol.on_outcome(r.request, answer(NO_LINE), [])
    assert r2.request.messages[-1]["content"][-1]["text"] == "table cut to 20000" + REASK


def test_a_failed_reask_keeps_the_first_answer_and_an_outage_marks_it_for_retry():
    pol = SamplePolicy(prepared(1), FakeRefit())
    r1 = pol.on_outcome(pol.first(), answer(NO_LINE), [])
    out = pol.on_outcome(r1.request, ConnectionRefusedError("[Errno 111] Connection refused"), [])
    rec = out.record
    assert isinstance(out, Final) and rec.status == "ok" and rec.response == NO_LINE
    assert rec.degraded[-1].kind == "reask_failed" and rec.degraded[-1].transient and rec.transient


def test_a_timeout_keeps_the_partial_answer_as_a_timeout_record():
    pol = SamplePolicy(prepared(1), FakeRefit())
    out = pol.on_outcome(pol.first(), answer("partial", timed_out=True), [])
    assert out.record.status == "timeout" and out.record.response == "partial"


def test_engine_steps_become_typed_degradations_of_the_round():
    pol = SamplePolicy(prepared(1), FakeRefit())
    r1 = pol.on_outcome(pol.first(), answer(NO_LINE), [Degradation("batch_split", "after OOM", before=4, after=[2, 2])])
    out = pol.on_outcome(r1.request, answer(OK), [Degradation("prefix_fallback", "RuntimeError: x")])
    assert [(d.kind, d.round) for d in out.record.degraded] == [("batch_split", 0), ("prefix_fallback", 1)]


# ---- the generate step, on an engine that holds work in flight -----------------------------------------
@dataclass
class SlotEngine:
    """A fake continuous-batching engine: ``slots`` requests in flight; each pull takes work while a
    slot is free, an empty pull advances one step (the oldest request finishes)."""

    answers: dict[int, list[Any]]
    slots: int = 3
    chunk = None         # a whole group per pull, as the shared-prefix engine takes it

    def __post_init__(self) -> None:
        self.log: list[tuple[str, Any]] = []
        self.max_held = 0

    def run_stream(self, chunks: Iterator[list[GenRequest]], settings: Any) -> Iterator[tuple]:
        held: list[GenRequest] = []
        pending: list[GenRequest] = []
        for chunk in chunks:
            self.log.append(("pull", [r.key for r in chunk]))
            pending += chunk
            while pending and len(held) < self.slots:
                held.append(pending.pop(0))
            self.max_held = max(self.max_held, len(held))
            while held and (pending or not chunk):     # no free slot, or told to wait: step once
                r = held.pop(0)
                yield r, self.answers[r.key].pop(0), []
                if pending:
                    held.append(pending.pop(0))
                if not chunk:
                    break
        while held:
            r = held.pop(0)
            yield r, self.answers[r.key].pop(0), []


def test_each_sample_is_final_the_moment_it_is_done_and_reasks_do_not_wait_for_the_run():
    answers = {i: [answer(NO_LINE), answer(NO_LINE), answer(NO_LINE)] if i == 1 else [answer(OK)] for i in range(1, 9)}
    engine = SlotEngine(answers, slots=3)
    sunk: list[tuple[int, int]] = []
    served = [0]
    real_stream = engine.run_stream

    def counting(chunks, settings):
        for out in real_stream(chunks, settings):
            served[0] += 1
            yield out

    engine.run_stream = counting
    groups = [[prepared(i) for i in range(1, 5)], [prepared(i) for i in range(5, 9)]]
    generate(engine, None, groups, FakeRefit(), lambda rec: sunk.append((rec.id, served[0])))
    ids = [i for i, _ in sunk]
    assert sorted(ids) == list(range(1, 9)) and len(ids) == 8
    order = dict(sunk)
    assert served[0] == 10 and sorted(order.values()) == sorted(set(order.values()))   # one record per answer served
    pulls = [keys for kind, keys in engine.log if kind == "pull"]
    assert pulls[:3] == [[1, 2, 3, 4], [1], [5, 6, 7, 8]]   # id 1's re-ask went out before the next group, not after the run
    assert engine.max_held <= 3


def test_a_sample_that_failed_preparation_is_final_before_any_generation():
    p = prepared(1)
    p.request = None
    p.record.fail(MissingInputError("html table not found: x.html"), permanent=True)
    engine = SlotEngine({2: [answer(OK)]})
    sunk: list[SampleRecord] = []
    generate(engine, None, [[p, prepared(2)]], FakeRefit(), sunk.append)
    assert [r.id for r in sunk] == [1, 2] and sunk[0].status == "missing_input" and sunk[0].permanent


def test_the_engines_wait_for_prepared_groups_is_measured():
    """``Flow.wait_s`` is the time the engine's thread spent waiting for preparation (benchmarks report
    it), not the workers' own preparation time."""
    import time

    def slow_groups():
        for i, s in ((1, 0.2), (2, 0.05), (3, 0.05)):
            time.sleep(s)
            yield [prepared(i)]

    flow = generate(SlotEngine({i: [answer(OK)] for i in (1, 2, 3)}), None, slow_groups(), FakeRefit(), lambda rec: None)
    assert 0.3 <= flow.wait_s < 1.2
    assert 0.2 <= flow.first_wait_s < flow.wait_s - 0.09       # the start's wait, apart from the later pulls'
    flow = generate(SlotEngine({1: [answer(OK)]}), None, [[prepared(1)]], FakeRefit(), lambda rec: None)
    assert flow.wait_s < 0.05


def test_an_engine_that_drops_a_request_is_an_error_not_a_silent_loss():
    class Dropping:
        chunk = 1

        def run_stream(self, chunks, settings):
            for chunk in chunks:
                if chunk:
                    return
                yield from ()

    with pytest.raises(RuntimeError, match="unanswered"):
        generate(Dropping(), None, [[prepared(1)]], FakeRefit(), lambda rec: None)


def test_timeouts_and_typed_records_round_trip_through_from_dict():
    pol = SamplePolicy(prepared(1), FakeRefit())
    r1 = pol.on_outcome(pol.first(), answer(NO_LINE), [Degradation("batch_split", before=2, after=[1, 1])])
    out = pol.on_outcome(r1.request, SampleTimeout("slow"), [])
    d = out.record.to_dict()
    back = SampleRecord.from_dict(d)
    assert back.degraded == out.record.degraded and back.to_dict() == d
    assert isinstance(back.degraded[0], Degradation)
