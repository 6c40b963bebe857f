"""Tables and figures from run folders (no torch): the run table, errors, token lengths, the paper
table with its heat map, truncated samples against the rest, latencies, and a self-contained HTML page.

It reads run folders only (samples.jsonl, plan.json, results.json), never notebook outputs.
``build_report(runs, out_dir)`` writes everything. notebooks/report.ipynb and
``python -m hitbench_utils report`` both call it. Counts use the latest record of each planned id,
as ``status`` does.
"""
from __future__ import annotations

import base64
import glob
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .errors import ERROR_STATUSES
from .runlog import read_log, view
from .scoring.aggregates import PAPER_COLUMNS, aggregate, paper_table
from .status import summarize

SHORT = {"Fact Checking": "FC", "Numerical Reasoning": "NR", "Structure Comprehending": "SC",
         "Data Analysis": "DA", "Visualization": "Vis"}
METRIC_COLUMNS = [f"{SHORT[q]} {m}" for q, m in PAPER_COLUMNS]
INDEXED = ("errors", "truncation", "metrics", "latency")      # tables whose index is a column of their own


@dataclass
class Run:
    """One run folder, read once."""

    path: Path
    header: dict
    latest: list[dict]          # the latest record of each planned id
    summary: dict               # status.summarize
    results: dict               # results.json, or {}
    name: str = ""
    modality: str = "?"
    format: str | None = None   # None for the image modality
    model: str = "?"
    max_input_tokens: int | None = None


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    contents = read_log(path)
    if contents.header is None:
        raise FileNotFoundError(f"{path} holds no run (no samples.jsonl header). Fix: pass run folders")
    latest = view(contents.records)
    fp, cfg = contents.header.get("fingerprint") or {}, contents.header.get("config") or {}
    plan, res = path / "plan.json", path / "results.json"
    ids = (json.loads(plan.read_text()).get("ids") if plan.is_file() else None) or sorted(latest)
    modality = fp.get("modality") or cfg.get("modality") or "?"
    return Run(path, contents.header, [latest[i] for i in ids if i in latest], summarize(path),
               json.loads(res.read_text()) if res.is_file() else {}, path.name, modality,
               None if modality == "image" else fp.get("format", cfg.get("format")),
               Path(str(cfg.get("model") or "?").rstrip("/")).name,
               fp.get("max_input_tokens", cfg.get("max_input_tokens")))


def load_runs(runs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Run]:
    """Run folders from a folder, a glob, or a list of either; folders without a run log are skipped."""
    specs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    paths: list[Path] = []
    for spec in specs:
        hits = [Path(spec)] if Path(spec).is_dir() else sorted(Path(p) for p in glob.glob(str(spec)))
        seen = {q.resolve() for q in paths}
        paths += [p for p in hits if (p / "samples.jsonl").is_file() and p.resolve() not in seen]
    if not paths:
        raise FileNotFoundError(f"no run folder (with samples.jsonl) matches {specs}. Fix: pass run folders or a glob")
    return [load_run(p) for p in paths]


# ---- tables ---------------------------------------------------------------------------------------
def run_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: counts by status (latest attempt per planned id), time spent and remaining."""
    rows = []
    for run in runs:
        s, t = run.summary, run.results.get("time") or {}
        row = {"run": run.name, "modality": run.modality, "format": run.format or "–", "model": run.model,
               "total": s["total"], "ok": s["ok"], "errors": sum(s["errors"].values())}
        row.update({st: s["errors"].get(st, 0) for st in _statuses(runs)})
        row.update(truncated=s["truncated"], degraded=s["degraded"], no_final_answer=s["answer_format_failures"],
                   time_s=round(float(t.get("total_s", sum(r.get("latency_s") or 0 for r in run.latest))), 1),
                   remaining=s["remaining"], verdict=s["verdict"])
        rows.append(row)
    return pd.DataFrame(rows)


def _statuses(runs: list[Run]) -> list[str]:
    """The typed error statuses, then any other non-ok status found in the logs."""
    return [*ERROR_STATUSES, *sorted({r["status"] for run in runs for r in run.latest} - {"ok", *ERROR_STATUSES})]


def error_table(runs: list[Run]) -> pd.DataFrame:
    """Error records per run (rows) and status (columns)."""
    return run_table(runs).set_index("run")[_statuses(runs)]


def samples_frame(runs: list[Run]) -> pd.DataFrame:
    """The latest record of every planned id, one row each, with its run's format group and token limit."""
    cols = ["id", "status", "question_type", "truncated", "input_tokens_original", "input_tokens_sent",
            "image_tokens", "latency_s"]
    rows = [{"run": run.name, "group": run.format or "image", "max_input_tokens": run.max_input_tokens,
             **{c: r.get(c) for c in cols}} for run in runs for r in run.latest]
    return pd.DataFrame(rows, columns=["run", "group", "max_input_tokens", *cols])


def truncation_table(runs: list[Run]) -> pd.DataFrame:
    """Per format: samples with a token count, how many were truncated, and the share (%)."""
    df = samples_frame(runs).dropna(subset=["input_tokens_original"])
    g = df.groupby("group", sort=False)
    out = pd.DataFrame({"samples": g.size(), "truncated": g["truncated"].apply(lambda s: int(s.fillna(False).sum())),
                        "max_input_tokens": g["max_input_tokens"].apply(lambda s: ", ".join(map(str, sorted(set(s)))))})
    out.insert(2, "share_%", (100 * out["truncated"] / out["samples"]).round(1))
    return out.rename_axis("format")


def _metric_row(records: list[dict]) -> dict:
    by_type = aggregate(records)["by_type"]
    return {f"{SHORT[q]} {m}": (by_type.get(q) or {}).get(m) for q, m in PAPER_COLUMNS}


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    """The paper's columns (per QuestionType) for each run; NaN where no query has the metric."""
    return pd.DataFrame([{"run": r.name, **_metric_row(r.latest)} for r in runs],
                        columns=["run", *METRIC_COLUMNS]).set_index("run").astype(float)


def paper(runs: list[Run], fmt: str = "markdown") -> str:
    """The paper-style table (scoring.paper_table), one row per run."""
    return paper_table([{"model": r.model, "modality": r.modality, "format": r.format,
                         "aggregates": aggregate(r.latest)} for r in runs], fmt)


def truncated_vs_rest(runs: list[Run]) -> pd.DataFrame:
    """For each run with truncated samples: the same metrics over the truncated samples and over the rest."""
    rows = []
    for run in runs:
        parts = {"truncated": [r for r in run.latest if r.get("truncated")],
                 "not truncated": [r for r in run.latest if not r.get("truncated")]}
        if parts["truncated"]:
            rows += [{"run": run.name, "samples": k, "n": len(v), "errors": sum(r["status"] != "ok" for r in v),
                      **_metric_row(v)} for k, v in parts.items()]
    return pd.DataFrame(rows, columns=["run", "samples", "n", "errors", *METRIC_COLUMNS]).astype(
        {c: float for c in METRIC_COLUMNS})


def latency_table(runs: list[Run]) -> pd.DataFrame:
    """latency_s of the ok samples per run: count, mean, quartiles, max."""
    df = samples_frame(runs)
    ok = df[df["status"] == "ok"]
    return ok.groupby("run", sort=False)["latency_s"].describe().round(3).reindex([r.name for r in runs])


def text_table(df: pd.DataFrame, fmt: str = "markdown", index: bool = False) -> str:
    """A DataFrame as a markdown or booktabs LaTeX table (2 decimals, '–' for missing values)."""
    df = df.reset_index() if index else df

    def cell(v: object) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–" if fmt == "markdown" else "--"
        s = f"{v:.2f}" if isinstance(v, float) else str(v)
        if fmt == "markdown":
            return s.replace("|", "\\|")
        return "".join("\\" + ch if ch in "&%$#_{}" else ch for ch in s).replace("–", "--")

    head, body = [cell(c) for c in df.columns], [[cell(v) for v in row] for row in df.itertuples(index=False)]
    if fmt == "markdown":
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(r) + " |" for r in body]) + "\n"
    return "\n".join([r"\begin{tabular}{" + "l" * len(head) + "}", r"\toprule", " & ".join(head) + r" \\",
                      r"\midrule", *(" & ".join(r) + r" \\" for r in body), r"\bottomrule", r"\end{tabular}"]) + "\n"


# ---- figures ----------------------------------------------------------------------------------------
def fig_errors(runs: list[Run]) -> Figure:
    """Error records per run, one bar per status."""
    t = error_table(runs)
    t = t.loc[:, t.sum() > 0]
    fig = Figure(figsize=(max(6, 1.6 * len(runs) + 3), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(t.columns))
    for j, st in enumerate(t.columns):
        bars = ax.bar([i + j * width for i in range(len(t))], t[st], width, label=st)
        ax.bar_label(bars, labels=[str(int(v)) if v else "" for v in t[st]])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(t))], t.index, rotation=20, ha="right")
    ax.set_ylabel("error records (latest attempt)")
    ax.set_title("Errors per run and status")
    if len(t.columns):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    return fig


def fig_tokens(runs: list[Run]) -> Figure:
    """Per format: input_tokens_original with the max_input_tokens line; image tokens below where present."""
    df = samples_frame(runs)
    groups = list(dict.fromkeys(df["group"]))
    img = df.dropna(subset=["image_tokens"])
    nrows = 2 if len(img) else 1
    fig = Figure(figsize=(4.8 * max(1, len(groups)), 3.6 * nrows), layout="constrained")
    axes = fig.subplots(nrows, max(1, len(groups)), squeeze=False)
    for j, g in enumerate(groups):
        d, ax = df[(df["group"] == g)].dropna(subset=["input_tokens_original"]), axes[0][j]
        lims = sorted(set(d["max_input_tokens"].dropna()))
        span = [float(v) for v in (*d["input_tokens_original"], *lims)] or [1.0]
        ax.hist(d["input_tokens_original"], bins=np.geomspace(0.9 * min(span), 1.1 * max(span), 40), color="tab:blue")
        ax.set_xscale("log")      # token counts are long-tailed; log bins keep the limit line and the data apart
        for lim in lims:
            ax.axvline(lim, color="tab:red", ls="--", label=f"max_input_tokens={int(lim):,}")
        k = int(d["truncated"].fillna(False).sum())
        ax.set_title(f"{g}: {k}/{len(d)} truncated ({100 * k / max(1, len(d)):.1f}%)")
        ax.set_xlabel("input_tokens_original")
        ax.legend(fontsize=8)
        if nrows == 2:
            di, ax2 = img[img["group"] == g], axes[1][j]
            if len(di):
                ax2.hist(di["image_tokens"], bins=20, color="tab:green")
                ax2.set_title(f"{g}: image tokens")
                ax2.set_xlabel("image_tokens")
            else:
                ax2.axis("off")
    return fig


def fig_heatmap(metrics: pd.DataFrame) -> Figure:
    """The metrics table as a heat map (0–100), values written in the cells, '–' where missing."""
    fig = Figure(figsize=(1.0 * len(metrics.columns) + 3, 0.6 * len(metrics) + 2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(metrics.to_numpy(dtype=float), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), v in pd.DataFrame(metrics.to_numpy()).stack(future_stack=True).items():
        ax.text(j, i, "–" if pd.isna(v) else f"{v:.1f}", ha="center", va="center",
                color="black" if not pd.isna(v) and v > 60 else "white", fontsize=8)
    ax.set_xticks(range(len(metrics.columns)), metrics.columns, rotation=45, ha="right")
    ax.set_yticks(range(len(metrics)), metrics.index)
    ax.set_facecolor("lightgray")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("Metrics per QuestionType")
    return fig


def fig_latency(runs: list[Run]) -> Figure:
    """latency_s of the ok samples, one box per run."""
    df = samples_frame(runs)
    data = [df[(df["run"] == r.name) & (df["status"] == "ok")]["latency_s"].dropna().tolist() for r in runs]
    fig = Figure(figsize=(max(6, 1.6 * len(runs) + 3), 4), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([d or [float("nan")] for d in data], showfliers=True)
    for i, d in enumerate(data, 1):
        ax.scatter([i] * len(d), d, s=8, alpha=0.5, color="tab:orange")
    ax.set_xticks(range(1, len(runs) + 1), [f"{r.name}\n(n={len(d)})" for r, d in zip(runs, data)], rotation=20)
    ax.set_ylabel("latency_s (ok samples)")
    ax.set_title("Latency per run")
    return fig


# ---- the whole report ------------------------------------------------------------------------------
@dataclass
class Report:
    out_dir: Path
    runs: list[Run]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    paper_md: str = ""
    paper_tex: str = ""
    figures: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def build_report(runs: str | os.PathLike | Iterable[str | os.PathLike] | list[Run],
                 out_dir: str | os.PathLike) -> Report:
    """Compute every table and figure; write CSV/markdown/LaTeX tables and PNG figures to ``out_dir``."""
    runs = runs if isinstance(runs, list) and runs and isinstance(runs[0], Run) else load_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = metrics_table(runs)
    rep = Report(out, runs, {"runs": run_table(runs), "errors": error_table(runs), "truncation": truncation_table(runs),
                             "metrics": metrics, "truncated_vs_rest": truncated_vs_rest(runs),
                             "latency": latency_table(runs)}, paper(runs, "markdown"), paper(runs, "latex"))
    for name, df in rep.tables.items():
        index = name in INDEXED
        df.to_csv(out / f"{name}.csv", index=index)
        (out / f"{name}.md").write_text(text_table(df, "markdown", index), encoding="utf-8")
        (out / f"{name}.tex").write_text(text_table(df, "latex", index), encoding="utf-8")
        rep.files += [out / f"{name}.{ext}" for ext in ("csv", "md", "tex")]
    for ext, text in (("md", rep.paper_md), ("tex", rep.paper_tex)):
        (out / f"paper_table.{ext}").write_text(text, encoding="utf-8")
        rep.files.append(out / f"paper_table.{ext}")
    for name, fig in (("errors", fig_errors(runs)), ("tokens", fig_tokens(runs)),
                      ("metrics_heatmap", fig_heatmap(metrics)), ("latency", fig_latency(runs))):
        rep.figures[name] = out / f"{name}.png"
        fig.savefig(rep.figures[name], dpi=100, bbox_inches="tight")
        rep.files.append(rep.figures[name])
    return rep


def write_html(rep: Report, path: str | os.PathLike | None = None) -> Path:
    """A self-contained HTML page (tables, the paper table, PNGs embedded as base64); no Jupyter needed."""
    path = Path(path) if path else rep.out_dir / "report.html"
    titles = {"runs": "Runs", "errors": "Errors per run and status", "truncation": "Truncation per format",
              "metrics": "Metrics per QuestionType", "truncated_vs_rest": "Truncated samples against the rest",
              "latency": "Latency (ok samples, s)"}
    figs = {"errors": "errors", "truncation": "tokens", "metrics": "metrics_heatmap", "latency": "latency"}
    parts = [f"<h1>hitbench report</h1><p>{len(rep.runs)} runs: "
             + ", ".join(html.escape(str(r.path)) for r in rep.runs) + "</p>"]
    for name, df in rep.tables.items():
        parts.append(f"<h2>{titles[name]}</h2>"
                     + df.to_html(na_rep="–", float_format=lambda v: f"{v:.2f}", index=name in INDEXED))
        if name == "metrics":
            parts.append(f"<h3>Paper table (markdown)</h3><pre>{html.escape(rep.paper_md)}</pre>")
        if name in figs and figs[name] in rep.figures:
            b64 = base64.b64encode(rep.figures[figs[name]].read_bytes()).decode()
            parts.append(f'<p><img alt="{figs[name]}" src="data:image/png;base64,{b64}"></p>')
    style = ("body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eef}img{max-width:100%}")
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>hitbench report</title>"
                    f"<style>{style}</style></head><body>{''.join(parts)}</body></html>", encoding="utf-8")
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
