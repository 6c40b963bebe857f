"""Aggregates per QuestionType and SubQType, and the paper's results table (DESIGN.md §8.7 and §8.9).

The rules, which reproduce the published cells:
- F1/EM/ROUGE-L/SacreBLEU: the mean over the queries that have the metric;
- an error record (``status != "ok"``: the sample never got an answer) counts as 0 for every metric
  of its question type, because a failure is a wrong answer, and is also counted in ``errors``;
- Summary/Anomaly Analysis have no QA metrics (so Data Analysis F1/EM/ROUGE-L are the mean over
  Rudimentary, Exploratory and Predictive); their judge score is averaged when a judge ran, and
  records left ``unscored`` (no judge) are left out, not counted as 0;
- ECR and Pass are the share of **all** queries of the type (×100): an error, a missing xlsx or a
  sandbox failure is simply not a success.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterable

from hitbench_utils.scoring.judge import JUDGED_SUBTYPES
from hitbench_utils.scoring.qa import QA_METRICS

__all__ = ["aggregate", "paper_table", "paper_cells", "run_key", "QUESTION_TYPES", "PAPER_COLUMNS"]

QUESTION_TYPES = ("Fact Checking", "Numerical Reasoning", "Structure Comprehending", "Data Analysis",
                  "Visualization")
PAPER_COLUMNS = (("Fact Checking", "F1"), ("Fact Checking", "EM"), ("Numerical Reasoning", "F1"),
                 ("Numerical Reasoning", "EM"), ("Structure Comprehending", "F1"),
                 ("Structure Comprehending", "EM"), ("Data Analysis", "ROUGE-L"), ("Data Analysis", "F1"),
                 ("Data Analysis", "EM"), ("Visualization", "ECR"), ("Visualization", "Pass"))
_SHORT = {"Fact Checking": "FC", "Numerical Reasoning": "NR", "Structure Comprehending": "SC",
          "Data Analysis": "DA", "Visualization": "Vis"}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(records: list[dict], qtype: str) -> dict[str, Any]:
    ok = [r for r in records if r.get("status", "ok") == "ok"]
    failed = [r for r in records if r.get("status", "ok") != "ok"]
    scored = [r for r in ok if r.get("score_status") == "scored"]
    out: dict[str, Any] = {
        "n": len(records), "errors": len(failed),
        "error_statuses": dict(Counter(str(r.get("status")) for r in failed)),
        "scored": len(scored),
        "unscored": sum(r.get("score_status") == "unscored" for r in ok),
        "missing_input": sum(r.get("score_status") == "missing_input" for r in ok),
        "score_errors": sum(r.get("score_status") == "error" for r in ok),
        "not_scored_yet": sum(r.get("score_status") is None for r in ok),
    }
    if qtype == "Visualization":
        for metric in ("ECR", "Pass"):
            hits = sum(bool((r.get("scores") or {}).get(metric)) for r in scored)
            out[metric] = 100.0 * hits / len(records) if records else None
        return out
    qa_failed = [r for r in failed if r.get("sub_qtype") not in JUDGED_SUBTYPES]
    for metric in QA_METRICS:
        values = [float(r["scores"][metric]) for r in scored if metric in (r.get("scores") or {})]
        out[metric] = _mean(values + [0.0] * len(qa_failed)) if values or qa_failed else None
        out[f"n_{metric}"] = len(values) + len(qa_failed)
    judged = [float(r["scores"]["judge"]) for r in scored if "judge" in (r.get("scores") or {})]
    judged_failed = [r for r in failed if r.get("sub_qtype") in JUDGED_SUBTYPES]
    out["judge"] = _mean(judged + [0.0] * len(judged_failed)) if judged else None
    out["n_judge"] = len(judged) + len(judged_failed) if judged else 0
    return out


def aggregate(records: Iterable[dict]) -> dict[str, Any]:
    """``{"by_type": {qtype: summary}, "by_subtype": {qtype: {sub_qtype: summary}}, "n", "errors"}``.

    Each summary has ``n``, ``errors`` (status != ok, counted as 0), ``unscored``, ``missing_input``,
    ``score_errors``, the metric means (None when no query has the metric) and ``judge``. Questions of an
    unknown QuestionType are kept apart, in ``unknown_question_types`` (same shape as ``by_type``). With
    Structure Comprehending records that carry both protocols, ``structure`` has SC under each and
    ``by_type["Structure Comprehending"]["protocol"]`` names the one its numbers use."""
    from hitbench_utils.scoring.structure import structure_aggregate

    records = list(records)
    known = [r for r in records if (r.get("question_type") or "") in QUESTION_TYPES]
    unknown: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if (r.get("question_type") or "") not in QUESTION_TYPES:
            unknown[r.get("question_type") or ""].append(r)
    out = _aggregate_known(known)
    out["n"], out["errors"] = len(records), sum(r.get("status", "ok") != "ok" for r in records)
    if unknown:
        out["unknown_question_types"] = {q: _summary(v, q) for q, v in sorted(unknown.items())}
    sc = structure_aggregate(known)
    if sc is not None:
        out["structure"] = sc
        out["by_type"]["Structure Comprehending"]["protocol"] = sc["protocol"]
        out["by_type"]["Structure Comprehending"]["tables"] = sc["tables"]
    return out


def _aggregate_known(records: list[dict]) -> dict[str, Any]:
    by_type: dict[str, list[dict]] = defaultdict(list)
    by_sub: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        qtype = r.get("question_type") or ""
        by_type[qtype].append(r)
        by_sub[qtype][r.get("sub_qtype") or ""].append(r)
    order = [q for q in QUESTION_TYPES if q in by_type] + sorted(q for q in by_type if q not in QUESTION_TYPES)
    return {
        "n": len(records),
        "errors": sum(r.get("status", "ok") != "ok" for r in records),
        "by_type": {q: _summary(by_type[q], q) for q in order},
        "by_subtype": {q: {s: _summary(v, q) for s, v in sorted(by_sub[q].items())} for q in order},
    }


def paper_cells(agg: dict) -> dict[str, Any]:
    """One paper-table row's numbers: ``{"FC F1", ..., "Vis Pass", "DA GPT"}`` (DA GPT: the judge's mean
    score on Summary/Anomaly Analysis, None without a judge) and ``SC protocol`` (what the SC cells use)."""
    by_type = agg.get("by_type") or {}
    cells: dict[str, Any] = {f"{_SHORT[q]} {m}": (by_type.get(q) or {}).get(m) for q, m in PAPER_COLUMNS}
    cells["DA GPT"] = (by_type.get("Data Analysis") or {}).get("judge")
    cells["SC protocol"] = (by_type.get("Structure Comprehending") or {}).get("protocol")
    return cells


def run_key(run_dir: str, config: dict) -> dict[str, Any]:
    """What tells two runs' paper-table rows apart: the run folder name, the QA file, and the subset when
    ``limit``, ``ids`` or ``question_type`` selected one (None: the whole QA file); ``label`` joins them."""
    from pathlib import Path

    ids = config.get("ids")
    subset = {k: v for k, v in (("limit", config.get("limit")), ("ids", list(ids) if ids else None),
                                ("question_type", config.get("question_type"))) if v not in (None, "", [])}
    qa = Path(str(config.get("qa_file") or "QA_final.json")).name
    parts = [f"limit={subset['limit']}"] if "limit" in subset else []
    if "ids" in subset:
        shown = ",".join(map(str, subset["ids"][:5])) + (",..." if len(subset["ids"]) > 5 else "")
        parts.append(f"ids={shown} ({len(subset['ids'])})")
    if "question_type" in subset:
        parts.append(f"question_type={subset['question_type']}")
    label = f"{Path(run_dir).name} [{qa}" + ("; " + "; ".join(parts) if parts else "") + "]"
    return {"run": Path(run_dir).name, "qa_file": qa, "subset": subset or None, "label": label}


def _cell(row: dict, qtype: str, metric: str) -> float | None:
    agg = row.get("aggregates") or {}
    summary = (agg.get("by_type", agg) or {}).get(qtype) or {}
    value = summary.get(metric)
    return None if value is None else float(value)


def _latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(ch, ch) for ch in text)


def paper_table(rows: list[dict], fmt: str = "markdown") -> str:
    """The paper's results table, one row per (modality, format): FC F1/EM, NR F1/EM, SC F1/EM,
    DA ROUGE-L/F1/EM, Vis ECR/Pass, with 2 decimals; '–' where there is no value.

    ``rows`` are dicts with ``modality``, ``format`` (None for image-only), optional ``model``, and
    ``aggregates`` (what ``aggregate`` returned). ``fmt`` is 'markdown' or 'latex'."""
    if fmt not in ("markdown", "latex"):
        raise ValueError(f"fmt={fmt!r} is not allowed; allowed: 'markdown', 'latex'")
    with_model = any(r.get("model") for r in rows)
    keys = (["Model"] if with_model else []) + ["Modality", "Format"]
    body = []
    for r in rows:
        text = ([str(r.get("model") or "")] if with_model else []) + [str(r.get("modality") or "–"),
                                                                       str(r.get("format") or "–")]
        nums = [_cell(r, q, m) for q, m in PAPER_COLUMNS]
        body.append((text, ["–" if v is None else f"{v:.2f}" for v in nums]))
    if fmt == "markdown":
        head = keys + [f"{_SHORT[q]} {m}" for q, m in PAPER_COLUMNS]
        lines = ["| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] * len(keys) + ["---:"] * len(PAPER_COLUMNS)) + "|"]
        lines += ["| " + " | ".join(t + v) + " |" for t, v in body]
        return "\n".join(lines) + "\n"
    groups = [(q, sum(1 for qq, _ in PAPER_COLUMNS if qq == q)) for q in dict.fromkeys(q for q, _ in PAPER_COLUMNS)]
    first = len(keys) + 1
    spans, rules = [], []
    for q, width in groups:
        spans.append(rf"\multicolumn{{{width}}}{{c}}{{{q}}}")
        rules.append(rf"\cmidrule(lr){{{first}-{first + width - 1}}}")
        first += width
    lines = [r"\begin{tabular}{" + "l" * len(keys) + "r" * len(PAPER_COLUMNS) + "}", r"\toprule",
             " & ".join([""] * len(keys) + spans) + r" \\", " ".join(rules),
             " & ".join(keys + [m for _, m in PAPER_COLUMNS]) + r" \\", r"\midrule"]
    lines += [" & ".join([_latex_escape(x).replace("–", "--") for x in t] + [x.replace("–", "--") for x in v])
              + r" \\" for t, v in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"
