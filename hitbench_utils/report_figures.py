"""The report's figures, one panel per run (never a format pooled across runs), drawn to be read at full
page width: 12 inches wide at 150 dpi with 11-point text, so a 1400-pixel page shows them at about
their natural size. ``save(fig, path)`` writes a PNG."""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

FIG_W, DPI, FONT = 12.0, 150, 11
PANELS_PER_ROW = 3


@contextmanager
def style() -> Iterator[None]:
    """Legible text for every figure made inside (matplotlib reads rcParams when a text is created)."""
    with matplotlib.rc_context({"font.size": FONT, "axes.titlesize": FONT + 1, "axes.labelsize": FONT,
                                "xtick.labelsize": FONT - 1, "ytick.labelsize": FONT - 1, "legend.fontsize": FONT - 1}):
        yield


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def wrap(label: str, width: int = 22) -> str:
    """Run names are long and have no spaces: break them after '_', '-' or ' ' (or anywhere) at ``width``."""
    lines, cur = [], ""
    for piece in re.findall(r"[^_\- ]+[_\- ]?|[_\- ]", str(label)):
        if cur and len(cur) + len(piece) > width:
            lines.append(cur.rstrip())
            cur = ""
        while len(piece) > width:
            lines.append(piece[:width])
            piece = piece[width:]
        cur += piece
    return "\n".join(lines + ([cur.rstrip()] if cur else []))


def fig_errors(errors: pd.DataFrame) -> Figure:
    """Error records per run (the table's rows), one bar per status (its columns)."""
    t = errors.loc[:, errors.sum() > 0]
    fig = Figure(figsize=(FIG_W, 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(t.columns))
    for j, st in enumerate(t.columns):
        bars = ax.bar([i + j * width for i in range(len(t))], t[st], width, label=st)
        ax.bar_label(bars, labels=[str(int(v)) if v else "" for v in t[st]])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(t))], [wrap(n) for n in t.index])
    ax.set_ylabel("error records (latest attempt)")
    ax.set_title("Errors per run and status")
    if len(t.columns):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no errors", ha="center", va="center", transform=ax.transAxes)
    return fig


def fig_tokens(samples: pd.DataFrame, runs: list[str]) -> Figure:
    """Per run: input_tokens_original (log bins) with its max_input_tokens line; then its image tokens."""
    panels = []
    for run in runs:
        d = samples[samples["run"] == run]
        panels.append(("text", run, d.dropna(subset=["input_tokens_original"])))
        if d["image_tokens"].notna().any():
            panels.append(("image", run, d.dropna(subset=["image_tokens"])))
    ncols = max(1, min(PANELS_PER_ROW, len(panels)))
    nrows = max(1, -(-len(panels) // ncols))
    fig = Figure(figsize=(FIG_W, 3.4 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (kind, run, d) in zip(axes, panels):
        if kind == "image":
            ax.hist(d["image_tokens"], bins=20, color="tab:green")
            ax.set_title(wrap(f"{run}: image tokens", 36))
            ax.set_xlabel("image_tokens")
            continue
        lims = sorted(set(d["max_input_tokens"].dropna()))
        span = [float(v) for v in (*d["input_tokens_original"], *lims)] or [1.0]
        ax.hist(d["input_tokens_original"], bins=np.geomspace(0.9 * min(span), 1.1 * max(span), 40), color="tab:blue")
        ax.set_xscale("log")      # token counts are long-tailed; log bins keep the limit line and the data apart
        for lim in lims:
            ax.axvline(lim, color="tab:red", ls="--", label=f"max_input_tokens={int(lim):,}")
        k = int(d["truncated"].fillna(False).sum())
        ax.set_title(wrap(f"{run}: {k}/{len(d)} truncated ({100 * k / max(1, len(d)):.1f}%)", 36))
        ax.set_xlabel("input_tokens_original")
        if lims:
            ax.legend()
    for ax in axes[len(panels):]:
        ax.axis("off")
    return fig


def fig_heatmap(metrics: pd.DataFrame) -> Figure:
    """The metrics table as a heat map (0–100), values written in the cells, '–' where missing."""
    fig = Figure(figsize=(FIG_W, 0.55 * len(metrics) + 2.2), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(metrics.to_numpy(dtype=float), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), v in pd.DataFrame(metrics.to_numpy()).stack(future_stack=True).items():
        ax.text(j, i, "–" if pd.isna(v) else f"{v:.1f}", ha="center", va="center",
                color="dimgray" if pd.isna(v) else "black" if v > 60 else "white")
    ax.set_xticks(range(len(metrics.columns)), metrics.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(metrics)), [wrap(n, 40) for n in metrics.index])
    ax.set_facecolor("lightgray")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title("Metrics per QuestionType and run")
    return fig


def fig_latency(samples: pd.DataFrame, runs: list[str]) -> Figure:
    """latency_s of the ok samples, one box per run."""
    ok = samples[samples["status"] == "ok"]
    data = [ok[ok["run"] == r]["latency_s"].dropna().tolist() for r in runs]
    fig = Figure(figsize=(FIG_W, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([d or [float("nan")] for d in data], showfliers=True)
    for i, d in enumerate(data, 1):
        ax.scatter([i] * len(d), d, s=10, alpha=0.5, color="tab:orange")
    ax.set_xticks(range(1, len(runs) + 1), [f"{wrap(r)}\n(n={len(d)})" for r, d in zip(runs, data)])
    ax.set_ylabel("latency_s (ok samples)")
    ax.set_title("Latency per run")
    return fig
