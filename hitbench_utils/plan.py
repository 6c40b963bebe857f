"""The plan step: which samples this invocation runs, as prefix groups of (query, attempt).

A single process runs every runnable id (no record yet, or an error with attempts left, or a missing
input that is there now), largest table first, each prefix group together. A data-parallel rank runs
the chunks it claims (``parallel.Claims``); a claim never splits a group.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

from . import data as D
from .parallel import Claims, claim_order, ranked_world, split_groups
from .runlog import RunLog, attempts, runnable, view
from .status import write_plan

log = logging.getLogger("hitbench")

CLAIM_SIZE = 512          # ids a rank claims at most at once (claims shrink as the run ends)


def plan(job: Any, runlog: RunLog, rank: int | None) -> Iterator[list[tuple[D.Query, int]]]:
    """Sets ``job.total`` (None for a rank: its share is known only when the run ends) and, for a rank,
    ``job.claims``."""
    cfg = job.config
    ids, cost, groups = claim_order(job.queries, job.data_path, cfg.fmt, job.templates, cfg.max_input_tokens)
    by_id = {q.id: q for q in job.queries}
    if rank is None:
        write_plan(job.run_dir, [q.id for q in job.queries], cfg.max_attempts)
        records = runlog.contents.records
        todo = set(runnable(ids, records, cfg.max_attempts)) | restored(job, records)
        log.info("run %s: %d queries, %d already done, %d to run", job.run_dir, len(ids), len(ids) - len(todo), len(todo))
        job.total = len(todo)
        chunks: Iterator = iter([([i for i in ids if i in todo], attempts(records))])
    else:
        claims = job.claims = Claims(job.run_dir, rank)
        with claims.exclusive():
            write_plan(job.run_dir, ids, cfg.max_attempts)
        job.total = None
        chunks = claims.chunks(ids, CLAIM_SIZE, cfg.max_attempts, ranked_world(), cost, groups)
    return ([(by_id[i], tries.get(i, 0) + 1) for i in g] for chunk, tries in chunks for g in split_groups(chunk, groups))


def restored(job: Any, records: list[dict]) -> set[int]:
    """Ids whose latest record is a (permanent) missing_input whose files are there now, attempts left."""
    cfg, tries, by_id = job.config, attempts(records), {q.id: q for q in job.queries}
    return {i for i, r in view(records).items() if i in by_id and r["status"] == "missing_input"
            and tries[i] < cfg.max_attempts
            and D.inputs_present(job.data_path, job.image_dir, cfg.fmt, cfg.modality, job.structure.input_name(by_id[i]))}
