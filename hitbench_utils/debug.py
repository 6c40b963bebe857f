"""Debugging one run folder: list its error and degraded ids, and re-run one id with overrides.

``problems(run_dir)`` lists the ids whose latest record is an error, or ok but degraded (an OOM split,
a fallback), with status, message, token counts, image size, attempts and the last error's traceback.

``rerun(run_dir, id, overrides=..., commit=False)`` runs that one id again in this process, with the
run's own configuration (from the log header) plus the overrides (max_input_tokens, max_pixels,
batch_size, max_new_tokens). It always runs into a temporary run folder, so the run is untouched.
With ``commit=True`` the new record is appended to the run's log as its next attempt, through the
normal log (the lock, the fingerprint check, fsync), with a ``debug_overrides`` field, and
results.json is rewritten. A commit is refused, before any work, when the overrides change the
run's fingerprint (max_input_tokens, max_new_tokens, max_pixels...): a record made under other
settings would otherwise be counted in the run's results as if made under its own. Use a new run
folder for those settings. batch_size is not part of the fingerprint, so it can be committed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import HitbenchError
from .records import describe
from .runlog import attempts, fingerprint_diff, read_log, view

OVERRIDES = ("max_input_tokens", "max_pixels", "batch_size", "max_new_tokens")


class CommitRefused(HitbenchError):
    """commit=True with overrides that change the run's fingerprint."""


def problems(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The error ids (latest record not ok), then the degraded ok ids, one row each."""
    records = read_log(run_dir).records
    latest, tries = view(records), attempts(records)
    last_tb: dict[int, str] = {}
    for r in records:
        if r.get("traceback"):
            last_tb[int(r["id"])] = r["traceback"]
    rows = [{"id": i, "status": r["status"], "attempts": tries.get(i, 0), "question_type": r.get("question_type"),
             "error": r.get("error") or "", "input_tokens_original": r.get("input_tokens_original"),
             "input_tokens_sent": r.get("input_tokens_sent"), "truncated": bool(r.get("truncated")),
             "image_size": "×".join(map(str, r["image_size"])) if r.get("image_size") else None,
             "image_tokens": r.get("image_tokens"), "tried": describe(r.get("tried")),
             "degraded": describe(r.get("degraded")), "traceback": last_tb.get(i)}
            for i, r in sorted(latest.items()) if r["status"] != "ok" or r.get("degraded")]
    df = pd.DataFrame(rows, columns=["id", "status", "attempts", "question_type", "error", "input_tokens_original",
                                     "input_tokens_sent", "truncated", "image_size", "image_tokens", "tried",
                                     "degraded", "traceback"])
    return df.sort_values(["status"], key=lambda s: s == "ok", kind="stable").reset_index(drop=True)


@dataclass
class Rerun:
    """What one re-run gave, and whether it was written to the run."""

    id: int
    record: dict                        # the new record
    previous: dict                      # the run's latest record for this id
    overrides: dict
    seconds: float                      # wall time of the re-run (prepare, generate, score)
    peak_memory_bytes: int | None
    memory_kind: str                    # which measure peak_memory_bytes is
    fingerprint_diff: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    committed: bool = False
    backend: Any = None                 # reuse it for the next re-run (loading a model is slow)

    def table(self) -> pd.DataFrame:
        keys = ["status", "attempt", "error", "input_tokens_original", "input_tokens_sent", "truncated",
                "rows_dropped", "image_size_sent", "image_tokens", "output_tokens", "latency_s", "degraded",
                "prediction", "score_status", "scores"]
        return pd.DataFrame({"before": [_show(self.previous.get(k)) for k in keys],
                             "re-run": [_show(self.record.get(k)) for k in keys]}, index=keys)

    def summary(self) -> str:
        mem = "n/a" if self.peak_memory_bytes is None else f"{self.peak_memory_bytes / 2**20:,.1f} MiB"
        lines = [f"id {self.id}: {self.previous.get('status')} -> {self.record['status']} in {self.seconds:.2f} s; "
                 f"peak memory {mem} ({self.memory_kind})", f"overrides: {self.overrides or 'none'}"]
        if self.fingerprint_diff:
            lines.append("differs from the run's fingerprint in: " + ", ".join(sorted(self.fingerprint_diff)))
        lines += [f"note: {n}" for n in self.notes]
        lines.append("committed to the run as attempt %s" % self.record["attempt"] if self.committed
                     else "not written to the run (commit=False)")
        return "\n".join(lines)


def _show(v: Any) -> str:
    return "" if v is None else json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else str(v)


def run_config(run_dir: str | os.PathLike, overrides: dict | None = None) -> tuple[Any, dict, list[str]]:
    """The run's RunConfig (from its header) with the overrides applied; also the applied ones and notes."""
    from .config import RunConfig

    header = read_log(run_dir).header
    if header is None:
        raise FileNotFoundError(f"{run_dir} holds no run (no samples.jsonl header). Fix: pass a run folder")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = {k: v for k, v in (header.get("config") or {}).items() if k in known}
    notes, applied = [], {}
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in OVERRIDES:
            raise ValueError(f"override {k}={v!r} is not allowed; allowed: {', '.join(OVERRIDES)}")
        if k not in known:
            notes.append(f"{k}={v!r} ignored: this version's RunConfig has no {k} field")
            continue
        cfg[k], applied[k] = v, v
    return RunConfig(**cfg), applied, notes


def rerun(run_dir: str | os.PathLike, id: int, *, overrides: dict | None = None, commit: bool = False,
          backend: Any = None) -> Rerun:
    """Re-run one id with the run's configuration plus ``overrides``; write it to the run only if ``commit``."""
    from .backends.registry import load_backend
    from .run import Job

    run_dir, id = Path(run_dir), int(id)
    contents = read_log(run_dir)
    previous = view(contents.records).get(id)
    if previous is None:
        raise ValueError(f"id {id} has no record in {run_dir}. Fix: pick an id from problems(run_dir)")
    cfg, applied, notes = run_config(run_dir, overrides)
    with tempfile.TemporaryDirectory(prefix=f"hitbench-debug-{id}-") as tmp:
        cfg.run_dir, cfg.ids, cfg.limit, cfg.question_type = str(Path(tmp) / "run"), [id], None, None
        cfg.resume, cfg.overwrite, cfg.max_attempts = True, False, 1
        if backend is None:
            backend = load_backend(cfg.validate())
        job = Job(cfg, backend=backend, progress=False)
        diff = fingerprint_diff(contents.header.get("fingerprint", {}), job.header()["fingerprint"])
        if commit and diff:
            raise CommitRefused(
                f"commit=True refused: these settings differ from the run's fingerprint ("
                + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                + "). A record made under other settings would be counted as one of this run's. Fix: re-run with "
                "commit=False to see the outcome, or start a new run folder with these settings")
        meter = _Meter(getattr(backend, "device", None))
        t0 = time.perf_counter()
        job.execute()
        seconds = time.perf_counter() - t0
        peak, kind = meter.peak()
        record = view(read_log(job.run_dir).records)[id]
    record["attempt"] = attempts(contents.records).get(id, 0) + 1     # the attempt it is, or would be, in the run
    out = Rerun(id, record, previous, applied, seconds, peak, kind, diff, notes, backend=backend)
    if commit:
        out.record = _commit(run_dir, record, applied, seconds, job)
        out.committed = True
    return out


def _commit(run_dir: Path, record: dict, applied: dict, seconds: float, job: Any) -> dict:
    """Append the record as the id's next attempt through the normal log, then rewrite results.json."""
    from .runfolder import RunFolder
    from .runlog import RunLock, RunLog
    from .status import summarize, write_results

    with RunLock(run_dir):
        log = RunLog.open(run_dir, job.header(), resume=True)    # checks the fingerprint once more
        rec = dict(record, attempt=attempts(log.contents.records).get(record["id"], 0) + 1,
                   debug_overrides=applied, debug_rerun_at=time.time())
        if job.config.score and rec["status"] == "ok" and rec.get("question_type") == "Visualization":
            from .runfolder import RunFolder     # the chart artifacts belong in the run's folder, not the temp one
            from .scoring_step import Scorer

            rec.update(Scorer(job.config, job.data_path, RunFolder(run_dir)).score(rec))
        log.append(rec)
        log.close()
        res = RunFolder(run_dir).results
        prev = json.loads(res.read_text()) if res.is_file() else {}
        write_results(run_dir, config=prev.get("config") or log.header.get("config", {}), summary=summarize(run_dir),
                      seconds=seconds, backend_info=prev.get("backend"), scoring=prev.get("scoring"))
    return rec


class _Meter:
    """Peak memory of a re-run: torch.cuda.max_memory_allocated on a GPU, else the growth of peak RSS."""

    def __init__(self, device: str | None) -> None:
        self.cuda = str(device or "").startswith("cuda")
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.rss0 = _peak_rss()

    def peak(self) -> tuple[int, str]:
        if self.cuda:
            import torch

            return int(torch.cuda.max_memory_allocated()), "GPU: torch.cuda.max_memory_allocated"
        return max(0, _peak_rss() - self.rss0), ("CPU: growth of this process's peak RSS (ru_maxrss); "
                                                 "0 means it stayed under an earlier peak")


def _peak_rss() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)
