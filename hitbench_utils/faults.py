"""Fault injection around any backend, so failure paths are tested on a CPU with the tiny model.

``FaultyBackend(inner, faults={id: "oom" | "timeout" | "exception", ...})`` raises the chosen error
whenever a batch contains a chosen id (optionally only for its first ``times`` calls), and counts the
calls each id received.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from .backends.base import GenRequest, GenResult, GenSettings
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
    def __init__(self, inner: Any, faults: dict[int, str] | None = None, times: int | None = None) -> None:
        self.inner, self.faults, self.times = inner, dict(faults or {}), times
        self.calls: Counter[int] = Counter()      # generate calls that included each id
        self.fired: Counter[int] = Counter()

    def __getattr__(self, name: str) -> Any:       # tokenizer, identity, info, count_tokens, image_tokens...
        return getattr(self.inner, name)

    def generate(self, requests: list[GenRequest], settings: GenSettings) -> list[GenResult]:
        for r in requests:
            self.calls[r.key] += 1
        for r in requests:
            kind = self.faults.get(r.key)
            if kind and (self.times is None or self.fired[r.key] < self.times):
                self.fired[r.key] += 1
                raise make_fault(kind)
        return self.inner.generate(requests, settings)
