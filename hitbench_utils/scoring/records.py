"""Record-level scoring, used by the run loop (one record at a time) and by rescore (a whole log).

``score_record`` decides which metric a record gets from its QuestionType/SubQType and never raises:
a scoring failure becomes ``score_status="error"`` with the message, so one bad sample cannot stop a
run or a rescore. The dict it returns is meant to be merged into the record.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING, Callable

from hitbench_utils.scoring.chart_code import chart_type_of
from hitbench_utils.scoring.judge import JUDGED_SUBTYPES, JudgeError
from hitbench_utils.scoring.qa import score_answer

if TYPE_CHECKING:
    from hitbench_utils.scoring.judge import Judge

__all__ = ["score_record", "rescore_records", "xlsx_path_for", "scoring_provenance", "SCORE_STATUSES"]

# scored: has its metrics; unscored: Summary/Anomaly with no judge (left out of means, not 0);
# not_run: the sample itself failed (status != ok; counts 0); missing_input: the chart's xlsx is
# absent or an LFS stub; error: scoring itself failed (judge down, sandbox failure).
SCORE_STATUSES = ("scored", "unscored", "not_run", "missing_input", "error")


def _out(scores: dict, status: str, error: str | None = None, detail: dict | None = None) -> dict:
    out = {"scores": scores, "score_status": status, "score_error": error}
    if detail:
        out["score_detail"] = detail
    return out


def score_record(record: dict, *, xlsx_path: str | None, artifacts_dir: str | None = None,
                 judge: Judge | None = None, chart_timeout: float = 20, chart_compat: bool = False,
                 chart_allow_unsealed: bool = False, secrets: Sequence[str] = (),
                 original: dict | None = None, structure_reference: str | None = None) -> dict:
    """Score one flat sample record; returns ``{"scores", "score_status", "score_error"}`` (plus
    ``score_detail`` with the chart's error or the judge's reply when there is one). A Structure
    Comprehending record with a ``structure`` field also gets it back with both protocols scored, and its
    ``reference`` (``original``: its paired original's record in the same run, for the consistency one).

    ``chart_allow_unsealed`` lets charts run when a sandbox layer is missing here (else they are
    errors naming it); ``secrets`` are redacted from every chart text stored."""
    try:
        if isinstance(record.get("structure"), dict):
            from hitbench_utils.scoring.structure import score_structure

            return score_structure(record, original, structure_reference)
        if record.get("status", "ok") != "ok":
            return _out({}, "not_run")
        qtype = record.get("question_type") or ""
        sub = record.get("sub_qtype") or ""
        prediction = record.get("prediction")
        if prediction is None:
            prediction = record.get("response") or ""
        reference = record.get("reference")
        reference = "" if reference is None else reference
        if qtype == "Visualization":
            return _score_chart_record(record, prediction, reference, sub, xlsx_path, artifacts_dir,
                                       chart_timeout, chart_compat, chart_allow_unsealed, secrets)
        if qtype == "Data Analysis" and sub in JUDGED_SUBTYPES:
            if judge is None:
                return _out({}, "unscored")
            table, table_info = _judge_table(judge, record)
            try:
                verdict = judge.score(record.get("question") or "", str(reference), str(prediction), sub, table)
            except JudgeError as exc:
                return _out({}, "error", f"judge error: {exc}", {"judge_model": judge.model})
            return _out({"judge": verdict["judge_score"]}, "scored", None,
                        {"judge_model": verdict["judge_model"], "judge_cached": verdict["cached"], **table_info})
        # Everything else — odd sub-types such as '' or 'Non-adverse, Adverse, Cancelled' included —
        # gets the QA metrics its QuestionType implies. An empty reference (QA_final's Structure
        # Comprehending items, whose reference is the model's own answer on the unswapped table) cannot
        # be scored here: unscored, not 0.
        if not str(reference).strip():
            return _out({}, "unscored", "the reference answer is empty")
        return _out(score_answer(str(reference), str(prediction)), "scored")
    except Exception as exc:  # never raise: a scoring bug must not stop a run
        return _out({}, "error", f"{type(exc).__name__}: {exc}")


def _judge_table(judge: Judge, record: dict) -> tuple[str | None, dict]:
    """The table for the judge's prompt, cut to its budget, when the judge was given a table source."""
    tables = getattr(judge, "tables", None)
    if tables is None:
        return None, {"judge_table": None}
    return tables(record)


def _score_chart_record(record: dict, prediction: str, reference: str, sub: str, xlsx_path: str | None,
                        artifacts_dir: str | None, timeout: float, compat: bool, allow_unsealed: bool = False,
                        secrets: Sequence[str] = ()) -> dict:
    from hitbench_utils.scoring.charts import score_chart

    chart_type = chart_type_of(sub)
    name = f"{record.get('id', 'chart')}"
    res = score_chart(str(prediction), chart_type, reference, xlsx_path or "", timeout=timeout,
                      artifacts_dir=artifacts_dir, compat=compat, artifact_name=name,
                      allow_unsealed=allow_unsealed, secrets=secrets)
    detail = {"chart_type": chart_type, "chart_error": res.get("error"), "chart_compat": compat}
    if res.get("unsealed"):
        detail["chart_sandbox_missing"] = res["unsealed"]
    if res.get("reference_error"):
        detail["reference_error"] = res["reference_error"]
    if res.get("artifacts"):
        detail["artifacts"] = res["artifacts"]
    if res.get("missing_input"):
        return _out({}, "missing_input", res.get("error"), detail)
    if res.get("infra_error"):
        return _out({}, "error", f"chart sandbox error: {res.get('error')}", detail)
    return _out({"ECR": bool(res["ECR"]), "Pass": bool(res["Pass"])}, "scored", None, detail)


def scoring_provenance(*, chart_compat: bool = False, judge: Judge | None = None) -> dict:
    """What scored a run, for results.json and the report: the chart mode (default, or the reference
    harness's scoping), the library versions, and the judge (None: Summary/Anomaly left unscored)."""
    from hitbench_utils.scoring.charts import library_versions

    return {"chart_mode": "chart_compat" if chart_compat else "default",
            "library_versions": library_versions(),
            "judge": judge.describe() if judge is not None else None}


def xlsx_path_for(data_path: str | os.PathLike, file_name: str | None) -> str | None:
    """``<data_path>/tables/<file_name>.xlsx`` (None without a file name)."""
    return os.path.join(os.fspath(data_path), "tables", f"{file_name}.xlsx") if file_name else None


def rescore_records(records: list[dict], *, data_path: str | os.PathLike, artifacts_dir: str | None = None,
                    judge: Judge | None = None, chart_timeout: float = 20, chart_compat: bool = False,
                    workers: int = 2, chart_allow_unsealed: bool = False, secrets: Sequence[str] = (),
                    on_done: Callable[[dict], None] | None = None, structure_reference: str | None = None) -> list[dict]:
    """Score every record again from its saved response (no inference); returns new records in the
    same order, each the old one with the score fields replaced. Charts and judge calls run in
    ``workers`` threads (the chart server runs the programs in parallel). ``on_done`` gets each new
    record as it finishes (a progress bar's update). Structure Comprehending records get both protocols
    again, the consistency one from their paired original among ``records`` (``structure_reference``:
    switch the chosen protocol; None keeps each record's)."""
    by_id = {r.get("id"): r for r in records}

    def original_of(record: dict) -> dict | None:
        st = record.get("structure")
        return by_id.get(st.get("pair_id")) if isinstance(st, dict) and st.get("pair_in_run") else None

    def one(record: dict) -> dict:
        xlsx = xlsx_path_for(data_path, record.get("table_file") or record.get("file_name"))
        fields = score_record(record, xlsx_path=xlsx,
                              artifacts_dir=artifacts_dir, judge=judge, chart_timeout=chart_timeout,
                              chart_compat=chart_compat, chart_allow_unsealed=chart_allow_unsealed, secrets=secrets,
                              original=original_of(record), structure_reference=structure_reference)
        new = {k: v for k, v in record.items() if k not in ("scores", "score_status", "score_error", "score_detail")}
        new.update(fields)
        return new

    def slow(record: dict) -> bool:
        return record.get("status", "ok") == "ok" and (
            record.get("question_type") == "Visualization"
            or (judge is not None and record.get("sub_qtype") in JUDGED_SUBTYPES))

    out: list[dict | None] = [None] * len(records)
    slow_idx = [i for i, r in enumerate(records) if slow(r)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {i: pool.submit(one, records[i]) for i in slow_idx}
        for i, record in enumerate(records):
            if i not in futures:
                out[i] = one(record)
                if on_done:
                    on_done(out[i])
        for fut in as_completed(futures.values()):
            if on_done:
                on_done(fut.result())
        for i, fut in futures.items():
            out[i] = fut.result()
    return out  # type: ignore[return-value]
