"""The generate step: prepared samples flow into the engine, each outcome goes through the sample's own
``SamplePolicy``, and every sample is handed to the sink the moment it is final.

The engine pulls its work from ``source()``. Each pull gets the requests the policy sent back (re-asks,
OOM retries) first, then the next prepared group. When there is nothing new but answers are still
coming, the pull is an empty list ("wait"): the engine advances its work in flight and asks again. So a
re-ask is queued as soon as its answer lacks the final-answer line, and no sample waits for the rest of
the run.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from .backends.base import GenRequest, GenSettings
from .policy import Final, Refitter, Resubmit, SamplePolicy
from .prepare import Prepared
from .records import SampleRecord

log = logging.getLogger("hitbench")


class Flow:
    """The bookkeeping between the engine and the policies: who is live, what is queued, what is in flight."""

    def __init__(self, refit: Refitter, sink: Callable[[SampleRecord], None]) -> None:
        self.refit, self.sink = refit, sink
        self.live: dict[Any, SamplePolicy] = {}
        self.queue: deque[GenRequest] = deque()
        self.in_flight = 0          # requests the engine has and has not answered yet
        self.wait_s = 0.0           # time the engine's thread spent waiting for prepared groups
        self.first_wait_s = 0.0     # of which at the first pull (the start: nothing can be ahead yet)

    def admit(self, group: list[Prepared]) -> list[GenRequest]:
        """A prepared group's requests; a sample whose preparation failed is final at once."""
        out = []
        for p in group:
            if p.request is None:
                p.record.latency_s = round(p.record.prepare_s, 6)
                self.sink(p.record)
                continue
            pol = SamplePolicy(p, self.refit)
            self.live[p.record.id] = pol
            out.append(pol.first())
        return out

    def source(self, groups: Iterable[list[Prepared]], chunk: int | None = None, whole: int = 1
               ) -> Iterator[list[GenRequest]]:
        """Each pull: what the policies sent back, then new work. ``chunk`` is the engine's unit: None,
        ``whole`` whole prefix groups (an engine that keeps slots decoding across pulls); a number, at most
        that many requests in all (a batch), so the samples in progress stay within it."""
        it = iter(groups)
        exhausted = False
        fresh: deque[GenRequest] = deque()         # admitted, not yet handed to the engine
        first = True
        while True:
            out = list(self.queue)
            self.queue.clear()
            room = (whole if not out else 0) if chunk is None else chunk - len(out)
            while room > 0:
                if not fresh and not exhausted:
                    t0 = time.perf_counter()
                    group = next(it, None)
                    waited = time.perf_counter() - t0
                    self.wait_s += waited
                    if first:
                        self.first_wait_s += waited
                    if group is None:
                        exhausted = True
                    else:
                        fresh.extend(self.admit(group))
                        continue
                if not fresh:
                    break
                if chunk is None:
                    out += fresh
                    fresh.clear()
                    room -= 1
                    continue
                out.append(fresh.popleft())
                room -= 1
            if not out and not self.in_flight and exhausted and not fresh:
                return
            self.in_flight += len(out)
            first = first and not out
            yield out                # empty: wait for answers in flight

    def outcome(self, req: GenRequest, res: Any, steps: list) -> None:
        self.in_flight -= 1
        pol = self.live[req.key]
        nxt = pol.on_outcome(req, res, steps)
        if isinstance(nxt, Resubmit):
            self.queue.append(nxt.request)
        else:
            assert isinstance(nxt, Final)
            del self.live[req.key]
            self.sink(nxt.record)


def generate(engine: Any, settings: GenSettings, groups: Iterable[list[Prepared]], refit: Refitter,
             sink: Callable[[SampleRecord], None]) -> Flow:
    """Run every prepared sample to its final record; the sink gets each one as soon as it is final.
    Returns the flow, for its ``wait_s``."""
    flow = Flow(refit, sink)
    whole = getattr(engine, "groups_per_pull", 1)     # an engine taking whole groups says how many a pull
    for req, res, steps in engine.run_stream(flow.source(groups, engine.chunk, whole), settings):
        flow.outcome(req, res, steps)
    if flow.live:       # an engine that dropped requests would otherwise lose them silently
        raise RuntimeError(f"the engine ended with {len(flow.live)} sample(s) unanswered: ids {sorted(flow.live)[:20]}")
    return flow
