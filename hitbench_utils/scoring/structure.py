"""Structure Comprehending (SC) scoring under both protocols (DESIGN.md §2), as pure functions.

An SC record carries ``structure``: its pair (``pair_id``, ``pair_qa_file``, ``pair_in_run``) and, per
protocol, ``{"reference", "scores", "score_status", "score_error"}``:
- ``gold``: the reference is the paired original question's FinalAnswer (the seed harness's protocol);
- ``consistency``: the reference is the model's own prediction on the paired original in the same run (the
  official RealHiTBench code's). Until that prediction exists it is ``unscored`` and ``score_error`` says why.
The record's top-level ``reference``/``scores``/``score_status``/``score_error`` are the chosen protocol's
(``structure.protocol``), so the usual aggregates show SC under it; ``structure_aggregate`` gives both.
"""
from __future__ import annotations

from typing import Any, Iterable

from hitbench_utils.scoring.qa import score_answer

__all__ = ["SC_TYPE", "STRUCTURE_TABLES", "STRUCTURE_REFERENCES", "gold_answer", "consistency_reference",
           "score_structure", "structure_changed", "structure_aggregate"]

SC_TYPE = "Structure Comprehending"
STRUCTURE_TABLES = ("swap", "original")
STRUCTURE_REFERENCES = ("gold", "consistency")
_FIELDS = ("reference", "scores", "score_status", "score_error", "structure")


def gold_answer(raw: dict, fallback: str = "") -> str:
    """The original question's FinalAnswer (what the seed's harness scored SC against); its ProcessedAnswer
    when the FinalAnswer is empty or absent."""
    v = raw.get("FinalAnswer")
    if v is None or (isinstance(v, str) and not v.strip()):
        return fallback
    return v if isinstance(v, str) else str(v)


def consistency_reference(st: dict, original: dict | None) -> tuple[str | None, str | None]:
    """(reference, why not): the paired original's prediction in this run, or the reason there is none."""
    pid = st.get("pair_id")
    if pid is None:
        return None, f"no paired original question: {st.get('pair_error') or 'unpaired'}"
    if not st.get("pair_in_run"):
        return None, (f"the paired original ({st.get('pair_qa_file')} id {pid}) is not part of this run's QA file, "
                      "so the model has no answer to it here")
    if original is None:
        return None, f"the paired original question (id {pid}) has no record in this run yet"
    if original.get("status", "ok") != "ok":
        return None, f"the paired original question (id {pid}) failed ({original.get('status')}); it has no prediction"
    pred = original.get("prediction")
    if pred is None or not str(pred).strip():
        return None, f"the paired original question (id {pid}) has an empty prediction"
    return str(pred), None


def _one(reference: str | None, why: str | None, record: dict) -> dict[str, Any]:
    if record.get("status", "ok") != "ok":
        return {"reference": reference, "scores": {}, "score_status": "not_run", "score_error": None}
    if reference is None or not reference.strip():
        return {"reference": reference, "scores": {}, "score_status": "unscored",
                "score_error": why or "the reference answer is empty"}
    prediction = record.get("prediction")
    if prediction is None:
        prediction = record.get("response") or ""
    return {"reference": reference, "scores": score_answer(reference, str(prediction)), "score_status": "scored",
            "score_error": None}


def score_structure(record: dict, original: dict | None, protocol: str | None = None) -> dict[str, Any]:
    """The fields to merge into an SC record: ``structure`` with both protocols scored, and the top-level
    ``reference``/``scores``/``score_status``/``score_error`` of the chosen one (``protocol``, else the
    record's own). ``original`` is the paired original's latest record in this run, or None."""
    st = dict(record.get("structure") or {})
    chosen = protocol or st.get("protocol") or "gold"
    gold = (st.get("gold") or {}).get("reference")
    st["gold"] = _one(gold, None if gold else "the paired original's answer is empty or unknown", record)
    ref, why = consistency_reference(st, original)
    st["consistency"] = _one(ref, why, record)
    if ref is not None and original is not None:
        st["consistency"]["reference_attempt"] = original.get("attempt")
    st["protocol"] = chosen
    top = st[chosen]
    return {"structure": st, "reference": top["reference"] or "", "scores": dict(top["scores"]),
            "score_status": top["score_status"], "score_error": top["score_error"]}


def structure_changed(old: dict, new: dict) -> bool:
    return any(old.get(k) != new.get(k) for k in _FIELDS)


def structure_aggregate(records: Iterable[dict]) -> dict[str, Any] | None:
    """SC under both protocols: ``{"protocol", "tables", "n", "paired", "gold": summary, "consistency":
    summary}`` with the same summary fields as ``aggregate``'s by_type (None without SC records)."""
    from hitbench_utils.scoring.aggregates import _summary

    sc = [r for r in records if r.get("question_type") == SC_TYPE and isinstance(r.get("structure"), dict)]
    if not sc:
        return None
    protocols = sorted({str(r["structure"].get("protocol")) for r in sc})
    tables = sorted({str(r["structure"].get("tables")) for r in sc})
    out: dict[str, Any] = {"protocol": protocols[0] if len(protocols) == 1 else "mixed: " + ", ".join(protocols),
                           "tables": tables[0] if len(tables) == 1 else "mixed: " + ", ".join(tables),
                           "n": len(sc), "paired": sum(r["structure"].get("pair_id") is not None for r in sc)}
    for name in STRUCTURE_REFERENCES:
        rows = []
        for r in sc:
            part = r["structure"].get(name) or {}
            status = r.get("status", "ok")
            rows.append({"question_type": SC_TYPE, "sub_qtype": r.get("sub_qtype"), "status": status,
                         "score_status": part.get("score_status") if status == "ok" else "not_run",
                         "scores": part.get("scores") or {}})
        out[name] = _summary(rows, SC_TYPE)
    return out
