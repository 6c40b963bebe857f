"""The one owner of a run folder's file names (no torch).

Every module that reads or writes a run folder asks ``RunFolder`` for the path, so each file name has
one owner:

| file | written by | what |
|---|---|---|
| ``samples.jsonl`` / ``samples.rank<r>.jsonl`` | runlog | the append-only sample log (one per rank) |
| ``plan.json`` | status | the ids the folder is meant to cover |
| ``results.json`` | status | config, counts, aggregates, time |
| ``claims.jsonl``, ``claims.lock``, ``ranks/`` | parallel | data-parallel claims and liveness |
| ``launch.json``, ``rank<r>.out`` | parallel | a multi-process launch's spec and outputs |
| ``.lock`` / ``.lock.rank<r>`` | runlog | one writer per log |
| ``run.log`` / ``run.rank<r>.log`` | run | the text log (progress lines, warnings) |
| ``charts/`` | scoring | chart artifacts |
| ``judge_cache.jsonl`` | scoring | the LLM judge's cache |
| ``checkpoint.json`` | status | the seed-shaped export, on request |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LOG_NAME = "samples.jsonl"
LOCK_NAME = ".lock"
PLAN = "plan.json"
RESULTS = "results.json"
CLAIMS = "claims.jsonl"
CLAIMS_LOCK = "claims.lock"
SPEC = "launch.json"
TEXT_LOG = "run.log"
CHARTS = "charts"
JUDGE_CACHE = "judge_cache.jsonl"
CHECKPOINT = "checkpoint.json"
# What ``overwrite=True`` moves aside into previous-<time>/ (besides the sample logs).
RUN_FILES = (RESULTS, CHECKPOINT, TEXT_LOG, CLAIMS, PLAN)


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def log(self, rank: int | None = None) -> Path:
        return self.path / (LOG_NAME if rank is None else f"samples.rank{rank}.jsonl")

    def logs(self) -> list[Path]:
        """samples.jsonl first, then the ranks' logs in rank order."""
        ranks = sorted(self.path.glob("samples.rank*.jsonl"), key=lambda p: (len(p.name), p.name))
        return ([self.log()] if self.log().is_file() else []) + ranks

    def lock_name(self, rank: int | None = None) -> str:
        return LOCK_NAME if rank is None else f"{LOCK_NAME}.rank{rank}"

    def text_log(self, rank: int | None = None) -> Path:
        return self.path / (TEXT_LOG if rank is None else f"run.rank{rank}.log")

    @property
    def plan(self) -> Path:
        return self.path / PLAN

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def claims(self) -> Path:
        return self.path / CLAIMS

    @property
    def claims_lock(self) -> Path:
        return self.path / CLAIMS_LOCK

    @property
    def ranks(self) -> Path:
        return self.path / "ranks"

    @property
    def spec(self) -> Path:
        return self.path / SPEC

    def rank_output(self, rank: int) -> Path:
        return self.path / f"rank{rank}.out"

    @property
    def charts(self) -> Path:
        return self.path / CHARTS

    @property
    def judge_cache(self) -> Path:
        return self.path / JUDGE_CACHE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT
