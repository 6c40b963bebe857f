"""What a run folder says about itself: status, verdict, results.json, the seed-shaped checkpoint.

Reads only the folder (no torch, no model), so ``python -m hitbench_utils status`` is instant.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from .errors import RunLogError
from .runfolder import PLAN, RunFolder
from .runlog import attempts, needs_retry, read_log, view



def write_plan(run_dir: str | os.PathLike, ids: list[int], max_attempts: int) -> None:
    """The ids this run folder is meant to cover: the union over invocations, so re-running a few ids
    with ``ids=[...]`` never shrinks what status counts."""
    path = Path(run_dir) / PLAN
    old = read_plan(path).get("ids", []) if path.is_file() else []
    merged = list(dict.fromkeys(list(old) + list(ids)))
    _atomic_json(path, {"ids": merged, "max_attempts": max_attempts, "written": time.time()})


def read_plan(path: Path) -> dict:
    """plan.json, checked: a damaged one is a RunLogError naming the file and the line, never a traceback."""
    fix = f"Fix: delete {path}; the next run (or resume) writes it again from its QA selection"
    try:
        plan = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunLogError(f"{path} is not valid UTF-8 (byte offset {e.start}). {fix}") from None
    except json.JSONDecodeError as e:
        raise RunLogError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). {fix}") from None
    plan = plan if isinstance(plan, dict) else {"ids": None}
    ids, ma = plan.get("ids"), plan.get("max_attempts", 3)
    if (not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids)
            or isinstance(ma, bool) or not isinstance(ma, int)):
        raise RunLogError(f"{path} (line 1) is not a plan: it needs \"ids\", a list of integers, and "
                          f"\"max_attempts\", an integer. {fix}")
    return plan


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def summarize(run_dir: str | os.PathLike) -> dict:
    run_dir = Path(run_dir)
    contents = read_log(run_dir)
    plan_path = run_dir / PLAN
    plan = read_plan(plan_path) if plan_path.is_file() else {}
    latest, tries = view(contents.records), attempts(contents.records)
    ids = plan.get("ids") or sorted(latest)
    max_attempts = int(plan.get("max_attempts", 3))
    recs = [latest[i] for i in ids if i in latest]
    errors = Counter(r["status"] for r in recs if r["status"] != "ok")
    permanent = [r["id"] for r in recs if r["status"] != "ok" and (r.get("permanent") or tries[int(r["id"])] >= max_attempts)]
    retryable = [r["id"] for r in recs if needs_retry(r) and tries[int(r["id"])] < max_attempts]
    never = [i for i in ids if i not in latest]
    s = {
        "run_dir": str(run_dir), "total": len(ids), "ok": sum(r["status"] == "ok" for r in recs),
        "errors": dict(sorted(errors.items())), "error_ids": {k: [r["id"] for r in recs if r["status"] == k] for k in errors},
        "permanent_errors": permanent, "truncated": sum(bool(r.get("truncated")) for r in recs),
        "degraded": sum(bool(r.get("degraded")) for r in recs),
        "answer_format_failures": sum(r["status"] == "ok" and r.get("answer_format_ok") is False for r in recs),
        "remaining": len(never) + len(retryable), "never_run": len(never), "retryable": len(retryable),
        "missing_ids": never,
        "attempts": sum(tries.values()), "bad_lines": contents.bad_lines, "torn_tail": contents.torn_tail,
        "header": bool(contents.header), "extra_records": len(set(latest) - set(ids)),
    }
    if not contents.header and not contents.records:
        s["verdict"] = f"empty: no run in {run_dir}"
    elif s["remaining"]:
        s["verdict"] = (f"incomplete: {s['remaining']} of {s['total']} remaining ({len(never)} never run, "
                        f"{len(retryable)} errors to retry); resume to continue")
    elif permanent:
        s["verdict"] = f"complete with {len(permanent)} permanent errors"
    else:
        s["verdict"] = "complete"
    return s


def format_status(s: dict) -> str:
    lines = [f"run folder:  {s['run_dir']}", f"total:       {s['total']}", f"ok:          {s['ok']}"]
    errs = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    lines.append(f"errors:      {sum(s['errors'].values())} ({errs})")
    for k, ids in s["error_ids"].items():
        lines.append(f"  {k}: ids {', '.join(map(str, ids[:20]))}{' ...' if len(ids) > 20 else ''}")
    lines += [f"truncated:   {s['truncated']}", f"degraded:    {s['degraded']}",
              f"no final-answer line (ok, not retried): {s['answer_format_failures']}",
              f"remaining:   {s['remaining']}"]
    missing = s.get("missing_ids") or []
    if missing:
        lines.append(f"  never run: ids {', '.join(map(str, missing[:20]))}{' ...' if len(missing) > 20 else ''}")
    for n, why in s["bad_lines"]:
        lines.append(f"warning: samples.jsonl line {n} skipped: {why}")
    if s["torn_tail"]:
        lines.append("note: the log ends in a torn line (an interrupted write); resume cuts it off")
    lines.append(s["verdict"])
    return "\n".join(lines)


def write_results(run_dir: str | os.PathLike, *, config: dict, summary: dict, seconds: float,
                  backend_info: dict | None = None, scoring: dict | None = None) -> dict:
    """results.json: config, counts, aggregates per QuestionType and the time spent."""
    run_dir = Path(run_dir)
    recs = list(view(read_log(run_dir).records).values())
    try:
        from .scoring.aggregates import aggregate, paper_cells

        aggregates = aggregate(recs)
        aggregates["paper"] = paper_cells(aggregates)
    except Exception as e:  # noqa: BLE001 - results.json must still be written
        aggregates = {"error": f"{type(e).__name__}: {e}"}
    from .scoring.aggregates import run_key
    prev = {}
    if RunFolder(run_dir).results.is_file():
        try:
            prev = json.loads(RunFolder(run_dir).results.read_text())
        except json.JSONDecodeError:
            prev = {}
    out = {"run_key": run_key(str(run_dir), config), "config": config, "backend": backend_info or prev.get("backend"),
           "summary": summary,
           "scoring": scoring or prev.get("scoring"),
           "aggregates": aggregates, "time": {"this_invocation_s": round(seconds, 3),
                                              "total_s": round(prev.get("time", {}).get("total_s", 0) + seconds, 3),
                                              "sample_latency_sum_s": round(sum(r.get("latency_s", 0) for r in recs), 3)},
           "written": time.time()}
    _atomic_json(RunFolder(run_dir).results, out)
    return out


def export_checkpoint(run_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Path:
    """checkpoint.json in the old scripts' shape: processed_ids holds successes only."""
    run_dir = Path(run_dir)
    latest = view(read_log(run_dir).records)
    results = []
    for i in sorted(latest):
        r = latest[i]
        pred = r.get("prediction") if r["status"] == "ok" else f"[ERROR] {r['status']}: {r.get('error')}"
        results.append({"id": r["id"], "FileName": r.get("file_name"), "QuestionType": r.get("question_type"),
                        "SubQType": r.get("sub_qtype"), "Question": r.get("question"), "Response": r.get("response"),
                        "Prediction": pred, "ProcessedAnswer": r.get("reference"), "scores": r.get("scores", {})})
    out = Path(path) if path else run_dir / "checkpoint.json"
    _atomic_json(out, {"results": results, "processed_ids": [r["id"] for r in latest.values() if r["status"] == "ok"]})
    return out


def check_outcome(s: dict, max_error_share: float = 0.05) -> str:
    """The verdict a script can trust: raises ``RunFailed`` (the notebook's last cell, so papermill exits
    non-zero) when no sample succeeded, when errors remain to retry, or when permanent errors exceed
    ``max_error_share`` of the run; otherwise returns the verdict, naming any permanent errors."""
    from .errors import RunFailed

    total, ok, permanent = s["total"], s["ok"], s["permanent_errors"]
    counts = f"{ok} of {total} ok, {s['remaining']} remaining, {len(permanent)} permanent errors"
    where = s["run_dir"]
    if total and not ok:
        raise RunFailed(f"no sample succeeded ({counts}). See python -m hitbench_utils status {where}; fix the "
                        "cause the error records name, then run the same command again to resume")
    if s["remaining"]:
        raise RunFailed(f"{s['remaining']} samples still to run or retry ({counts}). Run the same command again "
                        "to resume")
    if total and len(permanent) > max_error_share * total:
        raise RunFailed(f"permanent errors in {len(permanent)} of {total} samples, over max_error_share="
                        f"{max_error_share} ({counts}). See python -m hitbench_utils status {where}")
    if permanent:
        return f"{s['verdict']}: ids {', '.join(map(str, permanent[:20]))}{' ...' if len(permanent) > 20 else ''}"
    return s["verdict"]
