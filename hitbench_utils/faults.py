"""Fault injection around any backend, so failure paths are tested on a CPU with the tiny model.

``FaultyBackend(inner, faults={id: "oom" | "timeout" | "exception", ...})`` raises the chosen error
whenever a batch contains a chosen id (optionally only for its first ``times`` calls), and counts the
calls each id received. ``OracleBackend`` answers with the references, so scoring paths see full marks.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .backends.base import Capabilities, GenRequest, GenResult, GenSettings
from .errors import SampleTimeout


class InjectedOOM(RuntimeError):
    """Looks like torch's OOM to ``status_of`` (its name and message), without needing a GPU."""

    def __init__(self, msg: str = "CUDA out of memory (injected)") -> None:
        super().__init__(msg)


InjectedOOM.__name__ = "OutOfMemoryError"


def make_fault(kind: str) -> BaseException:
    if kind == "oom":
        return InjectedOOM()
    if kind == "timeout":
        return SampleTimeout("generation exceeded max_time_per_sample (injected)")
    if kind == "exception":
        return RuntimeError("injected failure")
    raise ValueError(f"fault kind {kind!r} not in oom, timeout, exception")


class FaultyBackend:
    def __init__(self, inner: Any, faults: dict[int, str] | None = None, times: int | None = None, *,
                 oom_above_tokens: int | None = None, oom_above_pixels: int | None = None) -> None:
        """``oom_above_*`` simulate a memory bound: any request over it (prompt tokens, image pixels) OOMs."""
        self.inner, self.faults, self.times = inner, dict(faults or {}), times
        self.oom_above_tokens, self.oom_above_pixels = oom_above_tokens, oom_above_pixels
        self.calls: Counter[int] = Counter()      # generate calls that included each id
        self.fired: Counter[int] = Counter()

    def __getattr__(self, name: str) -> Any:       # tokenizer, identity, info, count_tokens, image_tokens...
        return getattr(self.inner, name)

    def admit(self, requests: list[GenRequest]) -> None:
        """The shared-prefix engine asks here before it computes a question itself: the same faults."""
        self._inject(requests)
        self.inner.admit(requests)

    def generate(self, requests: list[GenRequest], settings: GenSettings) -> list[GenResult]:
        self._inject(requests)
        return self.inner.generate(requests, settings)

    def _inject(self, requests: list[GenRequest]) -> None:
        for r in requests:
            self.calls[r.key] += 1
        for r in requests:
            if self.oom_above_tokens and (r.input_tokens or 0) > self.oom_above_tokens:
                raise InjectedOOM(f"CUDA out of memory (injected: {r.input_tokens} tokens > {self.oom_above_tokens})")
            if self.oom_above_pixels and r.image is not None and r.image.width * r.image.height > self.oom_above_pixels:
                raise InjectedOOM(f"CUDA out of memory (injected: image {r.image.size} > {self.oom_above_pixels} px)")
        for r in requests:
            kind = self.faults.get(r.key)
            if kind and (self.times is None or self.fired[r.key] < self.times):
                self.fired[r.key] += 1
                raise make_fault(kind)


class OracleBackend:
    """Answers each question in ``only`` (all when None) with its reference (code for charts); the rest
    go to ``inner``. Tokenizer and counts come from ``inner``. It answers in ``generate``, so it runs
    under the plain engine (no shared-prefix capability)."""

    capabilities = Capabilities()

    def __init__(self, inner: Any, queries: list, only: set[int] | None = None) -> None:
        self.inner, self.only = inner, only
        self.answers = {q.id: q.raw["FinalAnswer"] for q in queries}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def _knows(self, key: Any) -> bool:
        return self.only is None or key in self.only

    def generate(self, requests: list[GenRequest], settings: GenSettings) -> list[GenResult]:
        rest = [r for r in requests if not self._knows(r.key)]
        it = iter(self.inner.generate(rest, settings) if rest else [])
        return [GenResult(f"Reasoning...\n[Final Answer]: {self.answers[r.key]}", 5) if self._knows(r.key) else next(it)
                for r in requests]
