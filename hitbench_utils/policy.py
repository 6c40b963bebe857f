"""The retry policy: one sample's state machine over the engine's typed outcomes (no model, no engine).

An outcome is an answer (with or without its final-answer line, or cut by the time limit) or an error
(an OOM, or anything else). From each, the sample either is final (its record is appended at once) or
goes back to the engine: a re-ask the moment its answer lacks the final line, the OOM ladder's next rung
the moment it runs out of memory. So no sample waits for any other, and a kill loses only the samples
the engine holds.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from .backends.base import GenRequest, GenResult
from .errors import SampleTimeout, is_transient, status_of
from .prepare import Prepared
from .prompts import extract_answer
from .records import Degradation, SampleRecord

log = logging.getLogger("hitbench")


class Refitter(Protocol):
    """What the OOM ladder needs from preparation (``prepare.Preparer``)."""

    cfg: Any
    reask: str

    def fit(self, p: Prepared, limit: int | None = None) -> list[dict]: ...

    def halve_image(self, p: Prepared, why: str) -> None: ...

    def request(self, p: Prepared, messages: list[dict]) -> GenRequest: ...


@dataclass
class Final:
    record: SampleRecord


@dataclass
class Resubmit:
    request: GenRequest


class SamplePolicy:
    """One sample from its first request to its final record."""

    def __init__(self, p: Prepared, refit: Refitter) -> None:
        assert p.request is not None, "a sample that failed preparation is final already"
        self.p, self.refit, self.round = p, refit, 0
        self.max_reasks = refit.cfg.max_reasks
        self.messages = p.request.messages       # the prompt as last fitted (the OOM ladder refits it)

    @property
    def record(self) -> SampleRecord:
        return self.p.record

    def first(self) -> GenRequest:
        return self.p.request

    def on_outcome(self, req: GenRequest, res: GenResult | BaseException, steps: list[Degradation]) -> Final | Resubmit:
        rec = self.record
        for s in steps:
            rec.degrade(s.kind, s.detail, round=self.round, before=s.before, after=s.after, transient=s.transient)
        if isinstance(res, BaseException):
            return self._on_error(req, res)
        rec.generate_s += res.seconds
        rec.response, rec.output_tokens = res.text, res.output_tokens
        if self.round == 0 and res.input_tokens is not None:
            rec.input_tokens_server = res.input_tokens
        if res.timed_out:
            rec.fail(SampleTimeout(f"generation passed max_time_per_sample={self.refit.cfg.max_time_per_sample}s "
                                   f"after {res.output_tokens} new tokens"))
            rec.response = res.text           # keep the partial answer: nothing is lost
            return self._final()
        rec.status, rec.error, rec.traceback, rec.permanent = "ok", None, None, False
        rec.prediction, rec.answer_format_ok = extract_answer(res.text, rec.question_type == "Visualization")
        rec.reasks = self.round
        if not rec.answer_format_ok and self.round < self.max_reasks:
            self.round += 1
            return Resubmit(self._request(self.messages))
        return self._final()

    def _on_error(self, req: GenRequest, e: BaseException) -> Final | Resubmit:
        rec = self.record
        if status_of(e) == "oom":
            msgs = self._degrade()
            if msgs is not None:
                self.messages = msgs
                return Resubmit(self._request(msgs))
        if self.round and rec.response is not None:       # a failed re-ask keeps the first answer
            rec.degrade("reask_failed", f"{type(e).__name__}: {e}"[:300], round=self.round, transient=is_transient(e))
            return self._final()
        rec.fail(e)
        rec.tried = rec.degraded + [Degradation("failed", f"{type(e).__name__}: {e}"[:300], round=self.round)]
        return self._final()

    def _request(self, messages: list[dict]) -> GenRequest:
        """This round's request: the same (already truncated) prompt, with the reminder on a re-ask."""
        return self.refit.request(self.p, with_reask(messages, self.refit.reask) if self.round else messages)

    def _degrade(self) -> list[dict] | None:
        """The OOM ladder's next rung: halve the token budget down to ``oom_floor_tokens``, then (image,
        mix) halve the image's pixels down to ``oom_floor_pixels``; None when nothing is left to try."""
        p, rec, cfg = self.p, self.record, self.refit.cfg
        sent = rec.input_tokens_sent or cfg.max_input_tokens
        try:
            if p.table and sent > cfg.oom_floor_tokens:
                limit = max(cfg.oom_floor_tokens, sent // 2)
                p.limit = limit
                msgs = self.refit.fit(p, limit=limit)
                rec.degrade("token_budget", "max_input_tokens lowered after OOM", round=self.round, before=sent, after=limit)
            elif p.image is not None and p.image.width * p.image.height > cfg.oom_floor_pixels:
                self.refit.halve_image(p, "after OOM")
                msgs = self.refit.fit(p, limit=p.limit)
            else:
                return None
        except Exception as e:  # noqa: BLE001 - a failed degradation is the end of the ladder
            rec.degrade("degradation_failed", f"{type(e).__name__}: {e}"[:300], round=self.round)
            return None
        log.warning("OOM on id=%s: retrying after %s", rec.id, rec.degraded[-1].kind)
        return msgs

    def _final(self) -> Final:
        rec = self.record
        rec.latency_s = round(rec.prepare_s + rec.generate_s, 6)     # its own share of its batches
        return Final(rec)


def with_reask(messages: list[dict], reask: str) -> list[dict]:
    """The same (already truncated) prompt with the reminder appended to the user turn."""
    out = json.loads(json.dumps(messages))
    out[-1]["content"][-1]["text"] += reask
    return out
