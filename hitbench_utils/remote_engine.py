"""Requests to a server as one continuous stream: ``concurrency`` in flight, each result yielded the
moment it arrives.

A server batches for itself, so there is nothing to pad or group: what matters is to keep its queue
full and to hand every answer on at once, so that a kill loses only the requests still at the server.
New work is taken whenever a place is free; a request the caller sends back (a re-ask, the OOM ladder's
next rung) goes out at the next free place.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Iterable, Iterator

from .backends.base import GenRequest, GenResult, GenSettings
from .engine import release_frames
from .records import Degradation

EMPTY_PULLS_LIMIT = 10_000     # a caller that says "wait" with nothing in flight is a bug: fail loudly


class RemoteEngine:
    chunk = 1           # it pulls whenever a place is free

    def __init__(self, backend: Any, concurrency: int) -> None:
        self.backend, self.concurrency = backend, max(1, int(concurrency))
        self.stats = {"requests": 0, "max_in_flight": 0}

    def run(self, requests: list[GenRequest], settings: GenSettings
            ) -> Iterator[tuple[GenRequest, GenResult | BaseException, list[Degradation]]]:
        yield from self.run_stream([requests], settings)

    def _call(self, req: GenRequest, settings: GenSettings) -> GenResult:
        t0 = time.perf_counter()
        res = self.backend.generate([req], settings)[0]
        res.seconds = time.perf_counter() - t0
        return res

    def run_stream(self, chunks: Iterable[list[GenRequest]], settings: GenSettings
                   ) -> Iterator[tuple[GenRequest, GenResult | BaseException, list[Degradation]]]:
        """Take chunks while places are free; an empty chunk means the caller waits on results."""
        source, exhausted, empty = iter(chunks), False, 0
        pending: deque[GenRequest] = deque()
        running: dict[Future, GenRequest] = {}
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="hitbench-remote") as pool:
            while True:
                while not exhausted and not pending and len(running) < self.concurrency:
                    chunk = next(source, None)
                    if chunk is None:
                        exhausted = True
                    elif chunk:
                        pending.extend(chunk)
                        empty = 0
                    elif running:
                        break
                    else:
                        empty += 1
                        if empty > EMPTY_PULLS_LIMIT:
                            raise RuntimeError("the request source waits for results, but none are in flight")
                while pending and len(running) < self.concurrency:
                    req = pending.popleft()
                    running[pool.submit(self._call, req, settings)] = req
                    self.stats["requests"] += 1
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], len(running))
                if not running:
                    if exhausted and not pending:
                        return
                    continue
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    req = running.pop(fut)
                    try:
                        yield req, fut.result(), []
                    except Exception as e:  # noqa: BLE001 - every failure becomes data
                        release_frames(e)
                        yield req, e, []
