"""Recompute every score of a run folder from its stored outputs, without a model.

Rescored records are appended to the log with the same ``attempt`` number and a ``rescored_at`` time,
so the view shows the new scores while attempts and history stay intact; results.json is rewritten.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .runfolder import RunFolder
from .runlog import RunLock, RunLog, read_log, view

SCORE_KEYS = ("scores", "score_status", "score_error", "structure", "reference")


def rescore_run(run_dir: str | os.PathLike, *, workers: int = 2, chart_compat: bool = False, judge=None,
                chart_timeout: float = 20, write: bool = True, data_path: str | None = None,
                chart_allow_unsealed: bool = False, progress: bool = False,
                structure_reference: str | None = None) -> dict:
    """Rescore a run folder. ``write=False`` (``--dry-run``) compares only: no file of the folder is
    created or changed (no log records, no results.json, no chart artifacts). ``progress`` shows a bar
    that counts records as they finish. Structure Comprehending records get both protocols again
    (``structure_reference`` switches the chosen one; None keeps the run's)."""
    from tqdm.auto import tqdm

    from .scoring import rescore_records, scoring_provenance

    run_dir = Path(run_dir)
    contents = read_log(run_dir)
    if contents.header is None:
        raise FileNotFoundError(f"{run_dir} holds no run (no samples.jsonl header). Fix: pass a run folder")
    data_path = data_path or contents.header.get("data_path")
    latest = _attach_structure(list(view(contents.records).values()), contents.header, structure_reference)
    t0 = time.time()
    with tqdm(total=len(latest), desc="rescore", unit="record", disable=not progress) as bar:
        new = rescore_records(latest, data_path=data_path, artifacts_dir=str(RunFolder(run_dir).charts) if write else None,
                              judge=judge, chart_timeout=chart_timeout, chart_compat=chart_compat, workers=workers,
                              chart_allow_unsealed=chart_allow_unsealed, on_done=lambda _: bar.update(1),
                              structure_reference=structure_reference)
    changed = [(a, b) for a, b in zip(latest, new) if any(a.get(k) != b.get(k) for k in SCORE_KEYS)]
    report = {"run_dir": str(run_dir), "records": len(latest), "changed": len(changed), "seconds": round(time.time() - t0, 2),
              "changed_ids": [b["id"] for _, b in changed][:50], "provenance": scoring_provenance(chart_compat=chart_compat, judge=judge)}
    if write and changed:
        with RunLock(run_dir):
            log = RunLog.open(run_dir, contents.header, resume=True)
            for _, b in changed:
                log.append(dict(b, rescored_at=time.time()))
            log.close()
    if write:
        from .status import summarize, write_results

        results = RunFolder(run_dir).results
        prev = json.loads(results.read_text()) if results.is_file() else {}
        write_results(run_dir, config=prev.get("config", contents.header.get("config", {})), summary=summarize(run_dir),
                      seconds=0.0, backend_info=prev.get("backend"), scoring=report["provenance"])
    return report


def _attach_structure(records: list[dict], header: dict, reference: str | None) -> list[dict]:
    """Records of runs made before SC pairing (no ``structure`` field) get one, so rescore scores them under
    both protocols: those runs asked SC questions on the original tables, which the field then says."""
    if not any(r.get("question_type") == "Structure Comprehending" and "structure" not in r for r in records):
        return records
    from .data import Query
    from .pairing import plan_structure

    fp = header.get("fingerprint") or {}
    try:
        plan = plan_structure(header.get("qa_path") or "", tables=fp.get("structure_tables") or "original",
                              reference=reference or "gold", data_path=header.get("data_path"))
    except Exception:  # noqa: BLE001 - the QA file moved: keep the records as they are
        return records
    out = []
    for r in records:
        if r.get("question_type") == "Structure Comprehending" and "structure" not in r:
            q = Query(int(r["id"]), str(r.get("file_name") or ""), str(r.get("question") or ""), str(r["question_type"]),
                      str(r.get("sub_qtype") or ""), str(r.get("reference") or ""))
            r = dict(r, structure=plan.describe(q), table_file=r.get("file_name"))
        out.append(r)
    return out


def format_rescore(r: dict) -> str:
    lines = [f"rescored {r['records']} records in {r['seconds']} s: {r['changed']} changed"]
    if r["changed_ids"]:
        lines.append("changed ids: " + ", ".join(map(str, r["changed_ids"])))
    lines.append(f"chart mode: {r['provenance']['chart_mode']}; libraries: "
                 + ", ".join(f"{k} {v}" for k, v in r["provenance"]["library_versions"].items()))
    return "\n".join(lines)
