"""The paper-style results table, one row per run, as markdown, booktabs LaTeX and an HTML ``<table>``.

Rows are keyed by run, never by (model, modality, format) alone: the run's label (its folder name,
made unique), the QA file and the subset a ``limit``, ``ids`` or ``question_type`` selected. So two
runs never print as identical rows. The metric columns are the paper's (scoring.PAPER_COLUMNS); the
Data Analysis judge score (the paper's DA-GPT column) and the Structure Comprehending protocol are
shown when some run carries them.
"""
from __future__ import annotations

import html
import math
from typing import Any, Iterable, Protocol

import pandas as pd

from .scoring.aggregates import PAPER_COLUMNS, aggregate

SHORT = {"Fact Checking": "FC", "Numerical Reasoning": "NR", "Structure Comprehending": "SC",
         "Data Analysis": "DA", "Visualization": "Vis"}
KEY_COLUMNS = ["Run", "Model", "Modality", "Format", "QA file", "Subset"]
JUDGE = ("Data Analysis", "GPT")            # shown as "DA GPT": aggregates' Data Analysis ``judge``


class RunLike(Protocol):
    name: str
    model: str
    modality: str
    format: str | None
    qa_file: str
    subset: str
    sc_protocol: str | None
    latest: list[dict]


def metric_columns(aggs: Iterable[dict]) -> list[tuple[str, str]]:
    """PAPER_COLUMNS, with (Data Analysis, GPT) after DA EM when any aggregate has a judge score."""
    cols = list(PAPER_COLUMNS)
    if any(((a.get("by_type") or {}).get("Data Analysis") or {}).get("judge") is not None for a in aggs):
        at = max(i for i, (q, _) in enumerate(cols) if q == "Data Analysis") + 1
        cols.insert(at, JUDGE)
    return cols


def metric_value(agg: dict, qtype: str, metric: str) -> float | None:
    """One cell from ``aggregate``'s output (the judge under its own name); None when absent."""
    summary = (agg.get("by_type") or {}).get(qtype) or {}
    value = summary.get("judge" if (qtype, metric) == JUDGE else metric)
    return None if value is None else float(value)


def sc_protocol(agg: dict) -> str | None:
    """The Structure Comprehending protocol the aggregate's SC numbers use, when it names one."""
    return ((agg.get("by_type") or {}).get("Structure Comprehending") or {}).get("protocol")


def _has_sc(run: RunLike) -> bool:
    return any(r.get("question_type") == "Structure Comprehending" for r in run.latest)


def paper_frame(runs: list[RunLike]) -> pd.DataFrame:
    """One row per run: the key columns, 'SC protocol' when a run with SC questions names one (from its
    aggregate, else its config's ``structure_reference``), then the metrics."""
    aggs = [aggregate(r.latest) for r in runs]
    cols = metric_columns(aggs)
    protocols = [sc_protocol(a) or (r.sc_protocol if _has_sc(r) else None) for r, a in zip(runs, aggs)]
    protocol = any(protocols)
    rows = []
    for run, agg, proto in zip(runs, aggs, protocols):
        row: dict[str, Any] = dict(zip(KEY_COLUMNS, [run.name, run.model, run.modality, run.format or "–",
                                                     run.qa_file, run.subset]))
        if protocol:
            row["SC protocol"] = proto or "–"
        row.update({f"{SHORT[q]} {m}": metric_value(agg, q, m) for q, m in cols})
        rows.append(row)
    keys = KEY_COLUMNS + (["SC protocol"] if protocol else [])
    return pd.DataFrame(rows, columns=keys + [f"{SHORT[q]} {m}" for q, m in cols])


def _split(df: pd.DataFrame) -> tuple[list[str], list[tuple[str, str]]]:
    """The key columns (first) and the (question type, metric) of each metric column (after them)."""
    named = {f"{SHORT[q]} {m}": (q, m) for q, m in (*PAPER_COLUMNS, JUDGE)}
    keys = [c for c in df.columns if c not in named]
    if list(df.columns[:len(keys)]) != keys:
        raise ValueError(f"paper table columns {list(df.columns)}: the key columns must come first")
    return keys, [named[c] for c in df.columns[len(keys):]]


def _num(v: object, missing: str) -> str:
    return missing if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.2f}"


def paper_markdown(df: pd.DataFrame) -> str:
    keys, metrics = _split(df)
    head = keys + [f"{SHORT[q]} {m}" for q, m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(keys) + ["---:"] * len(metrics)) + "|"]
    for row in df.itertuples(index=False):
        cells = [str(v).replace("|", "\\|") for v in row[:len(keys)]] + [_num(v, "–") for v in row[len(keys):]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _tex(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--"}
    return "".join(table.get(ch, ch) for ch in text)


def _groups(metrics: list[tuple[str, str]]) -> list[tuple[str, int]]:
    return [(q, sum(qq == q for qq, _ in metrics)) for q in dict.fromkeys(q for q, _ in metrics)]


def paper_latex(df: pd.DataFrame) -> str:
    """booktabs, the question types as spanning headers over their metrics, as in the paper."""
    keys, metrics = _split(df)
    spans, rules, first = [], [], len(keys) + 1
    for q, width in _groups(metrics):
        spans.append(rf"\multicolumn{{{width}}}{{c}}{{{q}}}")
        rules.append(rf"\cmidrule(lr){{{first}-{first + width - 1}}}")
        first += width
    lines = [r"\begin{tabular}{" + "l" * len(keys) + "r" * len(metrics) + "}", r"\toprule",
             " & ".join([""] * len(keys) + spans) + r" \\", " ".join(rules),
             " & ".join([_tex(k) for k in keys] + [_tex(m) for _, m in metrics]) + r" \\", r"\midrule"]
    for row in df.itertuples(index=False):
        lines.append(" & ".join([_tex(str(v)) for v in row[:len(keys)]] + [_num(v, "--") for v in row[len(keys):]])
                     + r" \\")
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def breakable(text: object) -> str:
    """Escaped text that a browser may wrap after '_', '/' and '-' (run names and paths have no spaces)."""
    out = html.escape(str(text))
    for ch in "_/-":
        out = out.replace(ch, ch + "<wbr>")
    return out


def paper_html(df: pd.DataFrame, table_id: str = "paper-table") -> str:
    """A real ``<table>``: two header rows (question types spanning their metrics), one row per run."""
    keys, metrics = _split(df)
    top = "".join(f'<th rowspan="2" class="key">{breakable(k)}</th>' for k in keys)
    top += "".join(f'<th colspan="{w}" class="group">{html.escape(q)}</th>' for q, w in _groups(metrics))
    sub = "".join(f"<th>{html.escape(m)}</th>" for _, m in metrics)
    body = []
    for row in df.itertuples(index=False):
        cells = [f'<td class="key">{breakable(v)}</td>' for v in row[:len(keys)]]
        cells += [f'<td class="num">{_num(v, "–")}</td>' for v in row[len(keys):]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table id="{html.escape(table_id)}" class="paper"><thead><tr>{top}</tr><tr>{sub}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def structure_frame(runs: list[RunLike], aggs: list[dict]) -> pd.DataFrame:
    """Structure Comprehending under both protocols, for the runs whose aggregates carry them
    (``aggregate(...)["structure"]``: the protocol the paper table uses, the tables, gold and consistency)."""
    cols = ["run", "protocol", "tables", "n", "paired", "gold F1", "gold EM", "gold unscored",
            "consistency F1", "consistency EM", "consistency unscored"]
    rows = []
    for run, agg in zip(runs, aggs):
        sc = agg.get("structure")
        if isinstance(sc, dict):
            row = {"run": run.name, **{k: sc.get(k) for k in ("protocol", "tables", "n", "paired")}}
            for name in ("gold", "consistency"):
                part = sc.get(name) or {}
                row.update({f"{name} F1": part.get("F1"), f"{name} EM": part.get("EM"),
                            f"{name} unscored": part.get("unscored")})
            rows.append(row)
    return pd.DataFrame(rows, columns=cols).astype({c: float for c in cols if c.endswith(("F1", "EM"))})
