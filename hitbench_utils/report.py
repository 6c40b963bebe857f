"""Tables and figures from run folders (no torch): the run table, errors, token lengths, the paper
table with its heat map, truncated samples against the rest, latencies, and a self-contained HTML page.

It reads run folders only (samples.jsonl, plan.json, results.json), never notebook outputs.
``build_report(runs, out_dir)`` writes everything. notebooks/report.ipynb and
``python -m hitbench_utils report`` both call it. Counts use the latest record of each planned id,
as ``status`` does. Everything is grouped by run: a run is named by its folder (made unique among
the runs shown), its QA file and the subset that ``limit``, ``ids`` or ``question_type`` selected.
"""
from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from . import report_figures as F
from .errors import ERROR_STATUSES
from .report_html import export_notebook_html, write_html  # noqa: F401 - the report's public API
from .report_paper import (SHORT, metric_columns, metric_value, paper_frame, paper_html, paper_latex, paper_markdown,
                           structure_frame)
from .runfolder import RunFolder
from .runlog import read_log, view
from .scoring.aggregates import PAPER_COLUMNS, aggregate
from .status import summarize

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
    name: str = ""              # the folder name; load_runs makes it unique among the runs it loads
    modality: str = "?"
    format: str | None = None   # None for the image modality
    model: str = "?"
    max_input_tokens: int | None = None
    qa_file: str = "QA_final.json"
    subset: str = "all"         # what limit / ids / question_type selected
    sc_protocol: str | None = None   # the Structure Comprehending reference protocol, when the run names one


def subset_label(sel: object) -> str:
    """'all', or what selected the questions: 'limit 8', 'ids 1, 3, 6' (or '12 ids, 1–2016'), 'question_type X'.

    ``sel`` is results.json's ``subset`` block when a run wrote one (a label, or a dict with ``label``
    or the three keys), else the run's config."""
    if isinstance(sel, str):
        return sel or "all"
    sel = sel if isinstance(sel, dict) else {}
    if isinstance(sel.get("label"), str):
        return sel["label"]
    parts = []
    ids = sel.get("ids")
    if isinstance(ids, str):
        try:
            ids = json.loads(ids)
        except json.JSONDecodeError:
            ids = [ids]
    if ids not in (None, [], ""):
        ids = ids if isinstance(ids, list) else [ids]
        nums = [i for i in ids if isinstance(i, int)]
        parts.append("ids " + ", ".join(map(str, ids)) if len(ids) <= 4 or len(nums) < len(ids)
                     else f"{len(ids)} ids, {min(nums)}–{max(nums)}")
    qt = sel.get("question_type")
    if qt:
        parts.append("question_type " + (", ".join(qt) if isinstance(qt, list) else str(qt)))
    if sel.get("limit") is not None:
        parts.append(f"limit {sel['limit']}")
    return "; ".join(parts) or "all"


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    contents = read_log(path)
    if contents.header is None:
        raise FileNotFoundError(f"{path} holds no run (no samples.jsonl header). Fix: pass run folders")
    latest = view(contents.records)
    plan, res = RunFolder(path).plan, RunFolder(path).results
    results = json.loads(res.read_text()) if res.is_file() else {}
    fp = contents.header.get("fingerprint") or {}
    cfg = {**(contents.header.get("config") or {}), **(results.get("config") or {})}
    ids = (json.loads(plan.read_text()).get("ids") if plan.is_file() else None) or sorted(latest)
    modality = fp.get("modality") or cfg.get("modality") or "?"
    sc = ((results.get("aggregates") or {}).get("by_type") or {}).get("Structure Comprehending") or {}
    return Run(path, contents.header, [latest[i] for i in ids if i in latest], summarize(path), results, path.name,
               modality, None if modality == "image" else fp.get("format", cfg.get("format")),
               Path(str(cfg.get("model") or "?").rstrip("/")).name, fp.get("max_input_tokens", cfg.get("max_input_tokens")),
               Path(str(cfg.get("qa_file") or fp.get("qa_file") or "QA_final.json")).name,
               subset_label(_subset_of(results, cfg)),
               sc.get("protocol") or cfg.get("structure_reference"))


def _subset_of(results: dict, cfg: dict) -> object:
    """results.json's ``run_key.subset`` (None: the whole QA file) or ``subset``, else the config."""
    key = results.get("run_key")
    if isinstance(key, dict) and "subset" in key:
        return key["subset"]
    return results["subset"] if "subset" in results else cfg


def unique_names(paths: list[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell apart runs of the same name."""
    depth = {p: 1 for p in paths}
    while True:
        names = {p: "/".join(p.resolve().parts[-depth[p]:]) for p in paths}
        clash = [p for p in paths if list(names.values()).count(names[p]) > 1 and depth[p] < len(p.resolve().parts)]
        if not clash:
            return [names[p] for p in paths]
        for p in clash:
            depth[p] += 1


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
    out = [load_run(p) for p in paths]
    for run, name in zip(out, unique_names(paths)):
        run.name = name
    return out


# ---- tables ---------------------------------------------------------------------------------------
def run_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: counts by status (latest attempt per planned id), time spent and remaining."""
    rows = []
    for run in runs:
        s, t = run.summary, run.results.get("time") or {}
        row = {"run": run.name, "model": run.model, "modality": run.modality, "format": run.format or "–",
               "qa_file": run.qa_file, "subset": run.subset, "total": s["total"], "ok": s["ok"], "errors": sum(s["errors"].values())}
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
    """The latest record of every planned id, one row each, with its run and the run's token limit."""
    cols = ["id", "status", "question_type", "truncated", "input_tokens_original", "input_tokens_sent",
            "image_tokens", "latency_s"]
    rows = [{"run": run.name, "max_input_tokens": run.max_input_tokens, **{c: r.get(c) for c in cols}}
            for run in runs for r in run.latest]
    return pd.DataFrame(rows, columns=["run", "max_input_tokens", *cols])


def truncation_table(runs: list[Run]) -> pd.DataFrame:
    """Per run (never a format pooled across runs): samples with a token count, how many were truncated,
    the share (%) and the limit."""
    df = samples_frame(runs).dropna(subset=["input_tokens_original"])
    rows = []
    for run in runs:
        d = df[df["run"] == run.name]
        k = int(d["truncated"].fillna(False).astype(bool).sum())
        rows.append({"run": run.name, "modality": run.modality, "format": run.format or "–", "samples": len(d),
                     "truncated": k, "share_%": round(100 * k / len(d), 1) if len(d) else float("nan"),
                     "max_input_tokens": run.max_input_tokens})
    return pd.DataFrame(rows, columns=["run", "modality", "format", "samples", "truncated", "share_%",
                                       "max_input_tokens"]).set_index("run")


def _metric_row(records: list[dict], cols: list[tuple[str, str]]) -> dict:
    agg = aggregate(records)
    return {f"{SHORT[q]} {m}": metric_value(agg, q, m) for q, m in cols}


def _columns(runs: list[Run]) -> list[tuple[str, str]]:
    """The paper's columns, and the judge's (DA GPT) when some run has judge scores."""
    return metric_columns(aggregate(r.latest) for r in runs)


def metrics_table(runs: list[Run]) -> pd.DataFrame:
    """The paper's columns (per QuestionType) for each run; NaN where no query has the metric."""
    cols = _columns(runs)
    names = [f"{SHORT[q]} {m}" for q, m in cols]
    return pd.DataFrame([{"run": r.name, **_metric_row(r.latest, cols)} for r in runs],
                        columns=["run", *names]).set_index("run").astype(float)


def truncated_vs_rest(runs: list[Run]) -> pd.DataFrame:
    """For each run with truncated samples: the same metrics over the truncated samples and over the rest."""
    rows, cols = [], _columns(runs)
    names = [f"{SHORT[q]} {m}" for q, m in cols]
    for run in runs:
        parts = {"truncated": [r for r in run.latest if r.get("truncated")],
                 "not truncated": [r for r in run.latest if not r.get("truncated")]}
        if parts["truncated"]:
            rows += [{"run": run.name, "samples": k, "n": len(v), "errors": sum(r["status"] != "ok" for r in v),
                      **_metric_row(v, cols)} for k, v in parts.items()]
    return pd.DataFrame(rows, columns=["run", "samples", "n", "errors", *names]).astype({c: float for c in names})


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


# ---- the whole report ------------------------------------------------------------------------------
@dataclass
class Report:
    out_dir: Path
    runs: list[Run]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    paper: pd.DataFrame = field(default_factory=pd.DataFrame)     # report_paper.paper_frame
    paper_md: str = ""
    paper_tex: str = ""
    paper_html: str = ""
    figures: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def build_report(runs: str | os.PathLike | Iterable[str | os.PathLike] | list[Run],
                 out_dir: str | os.PathLike) -> Report:
    """Compute every table and figure; write CSV/markdown/LaTeX tables and PNG figures to ``out_dir``."""
    runs = runs if isinstance(runs, list) and runs and isinstance(runs[0], Run) else load_runs(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, pf = metrics_table(runs), paper_frame(runs)
    rep = Report(out, runs, {"runs": run_table(runs), "errors": error_table(runs), "truncation": truncation_table(runs),
                             "metrics": metrics, "truncated_vs_rest": truncated_vs_rest(runs),
                             "latency": latency_table(runs),
                             "structure": structure_frame(runs, [aggregate(r.latest) for r in runs])}, pf, paper_markdown(pf), paper_latex(pf), paper_html(pf))
    for name, df in rep.tables.items():
        index = name in INDEXED
        df.to_csv(out / f"{name}.csv", index=index)
        (out / f"{name}.md").write_text(text_table(df, "markdown", index), encoding="utf-8")
        (out / f"{name}.tex").write_text(text_table(df, "latex", index), encoding="utf-8")
        rep.files += [out / f"{name}.{ext}" for ext in ("csv", "md", "tex")]
    pf.to_csv(out / "paper_table.csv", index=False)
    for ext, text in (("md", rep.paper_md), ("tex", rep.paper_tex)):
        (out / f"paper_table.{ext}").write_text(text, encoding="utf-8")
    rep.files += [out / f"paper_table.{ext}" for ext in ("csv", "md", "tex")]
    samples, names = samples_frame(runs), [r.name for r in runs]
    with F.style():
        for name, fig in (("errors", F.fig_errors(rep.tables["errors"])), ("tokens", F.fig_tokens(samples, names)),
                          ("metrics_heatmap", F.fig_heatmap(metrics)), ("latency", F.fig_latency(samples, names))):
            rep.figures[name] = F.save(fig, out / f"{name}.png")
            rep.files.append(rep.figures[name])
    return rep
