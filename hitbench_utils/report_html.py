"""The report as HTML that reads like a paper's appendix: the paper table as a real ``<table>`` with the
question types spanning their metrics, tables that wrap to the page width (the run table's verdicts in a
table of their own), and figures at full width, embedded as base64 PNGs so the page is self-contained.

``sections(rep)`` gives each part as an HTML fragment; ``write_html`` puts them on one page and
notebooks/report.ipynb displays the same fragments, so both read alike.
"""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from .report_paper import breakable

if TYPE_CHECKING:
    from .report import Report

# Scoped to .hitbench so that it styles the notebook's outputs without touching Jupyter's own page.
STYLE = """
.hitbench{font-family:sans-serif;color:#222;font-size:15px;line-height:1.35}
body.hitbench{margin:1.5em 2em}
.hitbench h1{font-size:1.6em}.hitbench h2{font-size:1.3em;margin-top:1.6em;border-bottom:1px solid #ccc}
.hitbench table{border-collapse:collapse;margin:.4em 0 1.2em;max-width:100%}
.hitbench th,.hitbench td{border:1px solid #bbb;padding:3px 7px;text-align:right;vertical-align:top;
  overflow-wrap:break-word}
.hitbench th{background:#eef;font-weight:600}
.hitbench td.key,.hitbench th.key,.hitbench td.text{text-align:left}
.hitbench table.paper th.group{text-align:center;background:#dde}
.hitbench table.paper td.num{font-variant-numeric:tabular-nums}
.hitbench table.paper thead tr+tr th{white-space:nowrap}
.hitbench tbody tr:nth-child(even){background:#f7f7fb}
.hitbench img.fig{display:block;width:100%;height:auto;margin:.5em 0 1.5em}
.hitbench code,.hitbench .path{overflow-wrap:anywhere}
.hitbench td.num{white-space:nowrap}
.hitbench p.note{color:#555;font-size:.92em;max-width:60em}
"""
RUN_COLUMNS = ["run", "model", "modality", "format", "qa_file", "subset", "total", "ok", "errors", "truncated",
               "degraded", "no_final_answer", "time_s", "remaining"]
TITLES = {"paper": "Paper table", "runs": "Runs", "errors": "Errors per run and status",
          "truncation": "Truncation per run", "truncated_vs_rest": "Truncated samples against the rest",
          "latency": "Latency (ok samples, s)", "structure": "Structure Comprehending under both protocols"}


def frame_html(df: pd.DataFrame, index: bool = False, text_columns: tuple[str, ...] = ()) -> str:
    """A DataFrame as a wrapping HTML table: 2 decimals, '–' for missing, text columns left-aligned."""
    df = df.reset_index() if index else df
    head = "".join(f'<th class="{"key" if c in text_columns else ""}">{breakable(c)}</th>' for c in df.columns)
    rows = []
    for row in df.itertuples(index=False):
        cells = []
        for c, v in zip(df.columns, row):
            text = "–" if v is None or (isinstance(v, float) and pd.isna(v)) else f"{v:.2f}" if isinstance(v, float) else str(v)
            cells.append(f'<td class="text">{breakable(text)}</td>' if c in text_columns
                         else f'<td class="num">{html.escape(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return ""
    b64 = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img class="fig" alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def sections(rep: Report) -> dict[str, str]:
    """Each part of the report as an HTML fragment (a ``div.hitbench``), in reading order."""
    t, fig = rep.tables, rep.figures
    text = ("run", "model", "modality", "format", "qa_file", "subset", "verdict", "samples")
    runs = t["runs"]
    notes = []
    if "DA GPT" in rep.paper.columns:
        notes.append("DA GPT is the LLM judge's score on Data Analysis (the paper's GPT column).")
    if "SC protocol" in rep.paper.columns:
        notes.append("SC protocol names the Structure Comprehending reference: gold (the paired original "
                     "question's answer) or consistency (the model's own answer to it).")
    parts = {
        "paper": rep.paper_html
        + '<p class="note">One row per run: its folder, QA file and the subset that limit / ids / question_type '
          "selected. An error counts as 0; '–' where no question has the metric. " + " ".join(notes) + "</p>"
        + _img(fig.get("metrics_heatmap"), "metrics heat map"),
        "runs": frame_html(runs[[c for c in RUN_COLUMNS if c in runs.columns]], text_columns=text)
        + frame_html(runs[["run", "verdict"]], text_columns=text),
        "errors": frame_html(t["errors"], index=True, text_columns=text) + _img(fig.get("errors"), "errors per run"),
        "truncation": frame_html(t["truncation"], index=True, text_columns=text) + _img(fig.get("tokens"), "token lengths"),
        "truncated_vs_rest": frame_html(t["truncated_vs_rest"], text_columns=text) if len(t["truncated_vs_rest"])
        else "<p>No run has truncated samples.</p>",
        "latency": frame_html(t["latency"], index=True, text_columns=text) + _img(fig.get("latency"), "latency per run"),
    }
    if len(t.get("structure", ())):
        parts["structure"] = (frame_html(t["structure"], text_columns=(*text, "protocol", "tables"))
                              + '<p class="note">Structure Comprehending scored both ways: against the paired '
                                "original question's answer (gold) and against the model's own answer to it "
                                "(consistency). The paper table uses the run's protocol.</p>")
    return {k: f'<div class="hitbench">{v}</div>' for k, v in parts.items()}


def write_html(rep: Report, path: str | os.PathLike | None = None) -> Path:
    """A self-contained HTML page (every table, the paper table, the PNGs embedded); no Jupyter needed."""
    path = Path(path) if path else rep.out_dir / "report.html"
    listing = "".join(f'<li><b>{breakable(r.name)}</b>: <span class="path">{breakable(r.path)}</span></li>'
                      for r in rep.runs)
    body = [f"<h1>hitbench report</h1><p>{len(rep.runs)} runs:</p><ul>{listing}</ul>"]
    body += [f"<h2>{TITLES[name]}</h2>{frag}" for name, frag in sections(rep).items()]
    path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='viewport' "
                    "content='width=device-width, initial-scale=1'><title>hitbench report</title>"
                    f"<style>{STYLE}</style></head><body class='hitbench'>{''.join(body)}</body></html>",
                    encoding="utf-8")
    return path


def export_notebook_html(ipynb: str | os.PathLike, html_path: str | os.PathLike | None = None) -> Path:
    """An executed notebook as HTML through nbconvert (figures embedded as base64), e.g. the report notebook."""
    import nbformat
    from nbconvert import HTMLExporter

    ipynb = Path(ipynb)
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(ipynb, as_version=4))
    out = Path(html_path) if html_path else ipynb.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out
