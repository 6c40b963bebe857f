"""Preparation: a query's inputs, its prompt, truncation and image fitting, into a ready request.

A failure here is already the sample's record (``record.status`` set): nothing is raised. The same
``Preparer`` refits a prompt under a lower limit for the OOM ladder. ``prepare_stream`` runs it in a pool
of forked CPU workers ahead of the engine, a prefix group per task (so a table's tokenization, cached by
the truncation module, serves all its questions), in order, with a bounded look-ahead.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import data as D
from .backends.base import GenRequest
from .backends.registry import shares_prefix
from .engine.prefixes import cut
from .errors import TruncationError
from .images import fit_image, halve_pixels
from .pairing import StructurePlan
from .prompts import Prompt, Templates, build_prompt, reask_text
from .records import SampleRecord

log = logging.getLogger("hitbench")


@dataclass
class Prepared:
    record: SampleRecord
    prompt: Prompt
    table: str = ""
    image: Any = None
    request: GenRequest | None = None     # None: preparation failed, the record says why
    limit: int | None = None              # the token limit after OOM degradation (None: max_input_tokens)


class Preparer:
    """Everything a prompt needs from the run's configuration, and the backend's token counts."""

    def __init__(self, cfg: Any, backend: Any, templates: Templates, data_path: Path, image_dir: Path,
                 request_hook: Callable[[GenRequest], GenRequest] | None = None,
                 structure: StructurePlan | None = None) -> None:
        self.cfg, self.backend, self.templates = cfg, backend, templates
        self.data_path, self.image_dir, self.hook = data_path, image_dir, request_hook
        self.structure = structure or StructurePlan()     # which file each question reads (SC: _swap)
        self.reask = reask_text(templates) if cfg.max_reasks else ""
        self.cuts: dict | None = {} if shares_prefix(backend, cfg) else None   # recent prefixes' tokenizations, for ``cut``

    def request(self, p: Prepared, messages: list[dict]) -> GenRequest:
        req = GenRequest(p.record.id, messages, p.image, p.record.input_tokens_sent, share_from=p.prompt.suffix)
        return self.hook(req) if self.hook else req

    def prepare(self, q: D.Query, attempt: int) -> Prepared:
        """Read inputs, build and truncate the prompt."""
        rec = SampleRecord.start(q, attempt)
        self.structure.start(rec, q)                # SC: the _swap table, the pair, the gold reference
        t0 = time.perf_counter()
        cfg = self.cfg
        p = Prepared(rec, build_prompt(self.templates, q, cfg.modality, cfg.fmt or "html", ""))
        try:
            if cfg.fmt:
                notes: list[str] = []
                p.table = D.read_table(self.data_path, cfg.fmt, rec.table_file, cfg.table_encoding, notes)
                for note in notes:
                    rec.degrade("table_encoding", note)
            if cfg.modality in ("image", "mix"):
                original = D.load_image(self.image_dir, rec.table_file)
                p.image = fit_image(original, cfg.min_pixels, cfg.max_pixels)
                rec.image_size, rec.image_size_sent = list(original.size), list(p.image.size)
                rec.image_tokens = self.backend.image_tokens(p.image)
            p.request = self.request(p, self.fit(p))
            if self.cuts is not None:       # the engine's prefix split, made here rather than in the GPU's thread
                p.request.cut = cut(self.backend, p.request, self.cuts)
        except Exception as e:  # noqa: BLE001 - a failed preparation is the sample's record
            rec.fail(e)
        rec.prepare_s = time.perf_counter() - t0
        return p

    def fit(self, p: Prepared, limit: int | None = None) -> list[dict]:
        """Bring the whole prompt (+ the re-ask reminder) under the limit: cut the table text first; when
        even its header cannot fit (mix), halve the image's pixels and try again."""
        limit = limit or self.cfg.max_input_tokens
        while True:
            try:
                return self._fit_text(p, limit)
            except TruncationError:
                if p.image is None or p.image.width * p.image.height <= self.cfg.oom_floor_pixels:
                    raise
                self.halve_image(p, f"to fit max_input_tokens={limit}")

    def halve_image(self, p: Prepared, why: str) -> None:
        """Half the image's pixels, recorded: the last rung of fitting the limit and of the OOM ladder."""
        w, h = p.image.size
        p.image = halve_pixels(p.image)
        p.record.image_size_sent, p.record.image_tokens = list(p.image.size), self.backend.image_tokens(p.image)
        p.record.degrade("image_halved", why, before=[w, h], after=list(p.image.size))

    def fixed_tokens(self, p: Prepared) -> tuple[int, int]:
        """(the prompt without its table, the re-ask reminder's share): what no cut can remove."""
        be = self.backend
        base = be.count_tokens(p.prompt.messages(table=""), p.image)
        reserve = be.count_tokens(p.prompt.messages(table="", reask=self.reask), p.image) - base if self.reask else 0
        return base, reserve

    def _fit_text(self, p: Prepared, limit: int) -> list[dict]:
        from .truncation import truncate_table

        rec, be = p.record, self.backend
        base, reserve = self.fixed_tokens(p)
        image = " and image" if p.image is not None else ""
        if not p.table:
            rec.input_tokens_original = rec.input_tokens_sent = base
            if base + reserve > limit:
                raise TruncationError(f"the prompt (instructions, question{image}) is {base + reserve:,} tokens, over "
                                      f"max_input_tokens={limit:,}; " + ("lower max_pixels or " if image else "")
                                      + "raise the limit", permanent=p.image is None)
            return p.prompt.messages()
        budget = limit - base - reserve
        if budget <= 0:
            raise TruncationError(f"instructions and question{image} alone take {base + reserve:,} tokens, over "
                                  f"max_input_tokens={limit:,}; nothing is left for the table. Fix: raise "
                                  "max_input_tokens", permanent=p.image is None)
        for _ in range(4):  # BPE merges across the table's edges can add a token or two: re-cut tighter
            cut = truncate_table(p.table, self.cfg.fmt, budget=budget, tokenizer=be.tokenizer)
            msgs = p.prompt.messages(table=cut.text)
            sent = be.count_tokens(msgs, p.image)
            if sent + reserve <= limit:
                break
            budget -= sent + reserve - limit
        else:
            raise TruncationError(f"could not bring the prompt under max_input_tokens={limit:,} (last try {sent:,})",
                                  permanent=True)
        rec.input_tokens_original = sent if not cut.truncated else base + cut.tokens_original
        rec.input_tokens_sent, rec.truncated, rec.rows_dropped = sent, cut.truncated, cut.rows_dropped
        if cut.truncated:
            log.warning("TRUNCATED id=%s %s %s: %s -> %s tokens (max_input_tokens=%s), %s of %s rows dropped",
                        rec.id, self.cfg.fmt, rec.file_name, f"{rec.input_tokens_original:,}", f"{sent:,}",
                        f"{limit:,}", f"{cut.rows_dropped:,}", f"{cut.rows_total:,}")
        return msgs


# ---- preparation beside the GPU ---------------------------------------------------------------------
_WORKER: Preparer | None = None      # the forked workers' copy (inherited, never pickled)


def _prepare_group(items: list[tuple[D.Query, int]]) -> list[Prepared]:
    assert _WORKER is not None
    return [_WORKER.prepare(q, a) for q, a in items]


def default_workers(device: str) -> int:
    """Forked CPU workers next to a GPU; none on a CPU, where the model itself needs the cores."""
    return max(1, min(8, (os.cpu_count() or 2) - 2)) if str(device).startswith("cuda") else 0


def look_ahead(per_pull: int) -> int:
    """Groups in preparation ahead of the consumer for an engine that takes ``per_pull`` groups a pull:
    three pulls, so the next pull's groups were submitted a whole pull before it and are ready when it
    comes. With a window of one pull, every pull waited for its last groups: on an H200 the whole latex
    setting's wait fell from 10.2 s to 2.3 s with three (bench/README.md)."""
    return max(8, 3 * per_pull)


def prepare_stream(preparer: Preparer, groups: Iterable[list[tuple[D.Query, int]]], workers: int,
                   ahead: int = 8) -> Iterator[list[Prepared]]:
    """Each group prepared, in order, by ``workers`` forked processes working up to ``ahead`` groups in
    front of the consumer (0 workers: in this process, on demand). A worker pool that breaks (a worker
    killed) is not fatal: the rest is prepared here."""
    if workers <= 0:
        for g in groups:
            yield [preparer.prepare(q, a) for q, a in g]
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    global _WORKER
    _WORKER = preparer
    it = iter(groups)
    window: deque = deque()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        broken = False
        while True:
            while not broken and len(window) < ahead:
                g = next(it, None)
                if g is None:
                    break
                window.append((g, pool.submit(_prepare_group, g)))
            if not window:
                g = next(it, None)
                if g is None:
                    return
                window.append((g, None))
            g, fut = window.popleft()
            try:
                yield fut.result() if fut is not None else [preparer.prepare(q, a) for q, a in g]
            except BrokenProcessPool:
                broken = True
                log.warning("the preparation workers broke; preparing in this process from here on")
                yield [preparer.prepare(q, a) for q, a in g]
                window = deque((g2, None) for g2, _ in window)
