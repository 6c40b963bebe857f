"""Where a final sample goes: scored, appended to the log (fsync'd) at once, and counted in the progress
that ``run.log`` and the notebook's bar show."""
from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Callable

from .records import SampleRecord

log = logging.getLogger("hitbench")

PROGRESS_EVERY_S = 30.0
PROGRESS_EVERY_SHARE = 0.05


class Progress:
    """A progress line in run.log at least every 30 s (while samples finish) and at every 5 % of the
    samples: done/total, ok and errors by status, questions per minute, the ETA, and the engine's
    prefill and decode tokens per second where it counts them."""

    def __init__(self, total: int, label: str, engine: Any = None, bar: bool = True) -> None:
        from tqdm.auto import tqdm

        self.total, self.label, self.engine = total, label, engine
        self.done, self.status = 0, Counter()
        self.t0 = self.t_last = time.monotonic()
        self.next_share = PROGRESS_EVERY_SHARE
        self.bar = tqdm(total=total, desc=label, disable=not bar)

    def update(self, rec: SampleRecord) -> None:
        self.done += 1
        self.status[rec.status] += 1
        self.bar.update(1)
        now = time.monotonic()
        share = self.done / self.total if self.total else 0.0
        if share >= self.next_share or now - self.t_last >= PROGRESS_EVERY_S or self.done == self.total:
            while self.next_share <= share:
                self.next_share += PROGRESS_EVERY_SHARE
            self.t_last = now
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        minutes = max(now - self.t0, 1e-9) / 60
        rate = self.done / minutes
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.status.items()) if k != "ok") or "none"
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            head = [f"progress {self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"]
        else:                    # a data-parallel rank: its share is known only at the end
            eta, head = float("inf"), [f"progress {self.done} done by this rank"]
        parts = head + [f"ok {self.status['ok']}", f"errors: {errors}", f"{rate:.1f} q/min"]
        if self.total:
            parts.append(f"ETA {_minutes(eta)}")
        stats = getattr(self.engine, "stats", None) or {}
        if stats.get("prefill_s"):
            parts.append(f"prefill {stats['prefix_tokens'] / stats['prefill_s']:,.0f} tok/s")
        if stats.get("decode_s"):
            parts.append(f"decode {stats['decode_rows'] / stats['decode_s']:,.0f} tok/s")
        return " | ".join(parts)

    def close(self) -> None:
        self.bar.close()


def _minutes(m: float) -> str:
    if m == float("inf"):
        return "unknown"
    return f"{m:.1f} min" if m < 120 else f"{m / 60:.1f} h"


class Sink:
    """Score a final record, append it, count it. ``score`` never raises: a scoring failure is data."""

    def __init__(self, append: Callable[[dict], None], score: Callable[[SampleRecord], None] | None,
                 progress: Progress | None, observe: Callable[[dict], list[dict]] | None = None) -> None:
        """``observe`` turns the record into the records to append: itself and, for Structure
        Comprehending, the waiting SC records its answer completes (``pairing.StructureTracker``)."""
        self.append, self.score, self.progress, self.observe = append, score, progress, observe

    def __call__(self, rec: SampleRecord) -> None:
        if self.score is not None:
            t0 = time.perf_counter()
            self.score(rec)
            rec.score_s = round(time.perf_counter() - t0, 6)
        for r in self.observe(rec.to_dict()) if self.observe else [rec.to_dict()]:
            self.append(r)
        if self.progress is not None:
            self.progress.update(rec)
