"""Batching over a backend, with failures isolated to the sample that caused them.

Requests are ordered by length and packed into batches of at most ``batch_size`` prompts and at most
``token_budget`` padded tokens, so long prompts run alone. A batch that fails is split: an OOM halves
it down to single samples (freeing memory between tries); any other exception re-runs the samples one
by one, so one bad sample never fails its neighbours.
"""
from __future__ import annotations

import gc
import logging
import time
from typing import Iterable, Iterator

from ..backends.base import Backend, GenRequest, GenResult, GenSettings
from ..errors import status_of
from ..records import Degradation

log = logging.getLogger("hitbench")


def free_memory() -> None:
    """A full release, after a failure or a run: a collection (a failed batch's tensors can sit in
    reference cycles through its traceback's frames), then the device's cache."""
    gc.collect()
    empty_cache()


def failed_at(exc: BaseException) -> str:
    """Where an exception was raised, for a failure's log line: the innermost frame, and the innermost
    two of this package (``file:line function``, innermost first), from the text ``release_frames`` kept."""
    import re
    import traceback

    text = getattr(exc, "hitbench_traceback", None)
    if text is None and exc.__traceback__ is not None:
        text = "".join(traceback.format_tb(exc.__traceback__))
    found = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', text or "")
    ours = [f for f in found[:-1] if "hitbench_utils" in f[0]][-2:]
    return " < ".join(f"{f.rsplit('/', 1)[-1]}:{n} {fn}" for f, n, fn in reversed(ours + found[-1:])) or "?"


def release_frames(exc: BaseException) -> None:
    """Keep the traceback as text and drop its frames: they hold the failed batch's tensors, and an
    OOM that keeps them alive makes the next sample OOM too (measured on an H100: 17 GiB stayed
    allocated after a 400K-token OOM until the exception object died)."""
    import traceback

    if getattr(exc, "hitbench_traceback", None) is None:
        exc.hitbench_traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]
    if exc.__traceback__ is not None:
        traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    exc.__context__ = exc.__cause__ = None


def plan_batches(requests: list[GenRequest], batch_size: int, token_budget: int | None) -> list[list[GenRequest]]:
    """Longest first (an OOM shows up early), each batch under both limits."""
    order = sorted(requests, key=lambda r: -(r.input_tokens or 0))
    batches: list[list[GenRequest]] = []
    cur: list[GenRequest] = []
    for r in order:
        longest = max([x.input_tokens or 0 for x in cur] + [r.input_tokens or 0])
        if cur and (len(cur) >= batch_size or (token_budget and longest * (len(cur) + 1) > token_budget)):
            batches.append(cur)
            cur = []
        cur.append(r)
    if cur:
        batches.append(cur)
    return batches


def default_token_budget(device: str) -> int:
    """Padded tokens per batch. Padding forces a dense attention mask, whose cost grows with the square
    of the longest prompt, so long prompts must run alone: 32K on a CPU; on a GPU, scaled to free memory
    (about 1K tokens per GiB free, measured: a 54K-token batch of 8 peaked at 40 GiB on an 80 GiB H100)."""
    if device.startswith("cuda"):
        try:
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return max(8192, int(free / 2**30 * 1024))
        except Exception:  # noqa: BLE001
            return 32768
    return 32768


class Engine:
    def __init__(self, backend: Backend, batch_size: int = 4, token_budget: int | None = None) -> None:
        if int(batch_size) < 1:
            from ..errors import ConfigError

            raise ConfigError("batch_size", batch_size, "an integer ≥ 1")
        if token_budget is None:
            token_budget = default_token_budget(str(getattr(backend, "device", "cpu")))
        self.backend, self.batch_size, self.token_budget = backend, int(batch_size), int(token_budget)

    @property
    def chunk(self) -> int:
        """Requests this engine wants per pull of a stream: a batch (it holds nothing between pulls)."""
        return self.batch_size

    def run(self, requests: list[GenRequest], settings: GenSettings
            ) -> Iterator[tuple[GenRequest, GenResult | BaseException, list[Degradation]]]:
        """Yield (request, result or the exception it ended with, degradation steps) as batches finish."""
        for batch in plan_batches(requests, self.batch_size, self.token_budget):
            yield from self._run_batch(batch, settings, [])

    def run_stream(self, chunks: Iterable[list[GenRequest]], settings: GenSettings
                   ) -> Iterator[tuple[GenRequest, GenResult | BaseException, list[Degradation]]]:
        """``run`` over chunks that arrive while earlier ones still generate (a rank's claims); an
        engine that keeps work in flight takes the next chunk before finishing the last."""
        for requests in chunks:
            yield from self.run(requests, settings)

    def _run_batch(self, batch: list[GenRequest], settings: GenSettings, steps: list[Degradation]
                   ) -> Iterator[tuple[GenRequest, GenResult | BaseException, list[Degradation]]]:
        t0 = time.perf_counter()
        try:
            results = self.backend.generate(batch, settings)
        except Exception as e:  # noqa: BLE001 - every failure becomes data
            release_frames(e)
            free_memory()
            if len(batch) == 1:
                yield batch[0], e, steps
                return
            if status_of(e) == "oom":
                half = len(batch) // 2
                step = Degradation("batch_split", "after OOM", before=len(batch), after=[half, len(batch) - half])
                log.warning("OOM on a batch of %d (%s tokens max): splitting", len(batch),
                            max(r.input_tokens or 0 for r in batch))
                yield from self._run_batch(batch[:half], settings, steps + [step])
                yield from self._run_batch(batch[half:], settings, steps + [step])
            else:
                log.warning("batch of %d failed (%s: %s): isolating samples", len(batch), type(e).__name__, e)
                for r in batch:
                    yield from self._run_batch([r], settings, steps)
            return
        dt = time.perf_counter() - t0
        for r, res in zip(batch, results):
            res.seconds = dt / len(batch)
            yield r, res, steps


def empty_cache() -> None:
    """Freed tensors' memory back to the device, so free memory reads true (no garbage collection: a
    dropped pool has no reference cycles, and a full collection took 0.28 s each in a profiled CPU run)."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
