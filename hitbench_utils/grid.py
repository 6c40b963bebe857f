"""Run the infer notebook once per (modality, format) with papermill: the old run_resume_both.sh, fixed.

Each combination writes its executed notebook into its own run folder (papermill does not create the
folder, so we do). A failing combination does not stop the others; the command ends with a summary.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from .config import RunConfig
from .status import summarize

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "infer.ipynb"


def combinations(modalities: Sequence[str], formats: Sequence[str]) -> list[tuple[str, str]]:
    """image has no text format: it runs once, whatever formats are asked for."""
    out: list[tuple[str, str]] = []
    for m in modalities:
        for f in formats:
            if (m, f if m != "image" else "-") not in [(a, b if a != "image" else "-") for a, b in out]:
                out.append((m, f))
    return out


def run_grid(modalities: Sequence[str], formats: Sequence[str], *, notebook: str | Path | None = None,
             runs_root: str | Path = "runs", params: dict[str, Any] | None = None,
             kernel_name: str | None = None, progress: bool = True) -> list[dict]:
    """Run each combination in turn; the bar counts combinations as they finish (with the last outcome)."""
    import papermill as pm
    from tqdm.auto import tqdm

    nb = Path(notebook or NOTEBOOK)
    results: list[dict] = []
    combos = combinations(modalities, formats)
    bar = tqdm(total=len(combos), desc="grid", unit="run", disable=not progress)
    for modality, fmt in combos:
        p = dict(params or {}, modality=modality, format=fmt)
        cfg = RunConfig(**{k: v for k, v in p.items() if k in RunConfig.__dataclass_fields__}).validate()
        run_dir = Path(p.get("run_dir") or cfg.default_run_dir(runs_root))
        run_dir.mkdir(parents=True, exist_ok=True)
        p["run_dir"] = str(run_dir)
        t0, row = time.time(), {"modality": modality, "format": cfg.fmt or "-", "run_dir": str(run_dir)}
        try:
            pm.execute_notebook(str(nb), str(run_dir / "infer.ipynb"), parameters=p, kernel_name=kernel_name,
                                progress_bar=False, cwd=str(Path.cwd()))
            row["outcome"] = "ran"
        except Exception as e:  # noqa: BLE001 - one combination's failure is reported, the rest go on
            row["outcome"] = f"failed: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        row["seconds"] = round(time.time() - t0, 1)
        row["verdict"] = summarize(run_dir)["verdict"]
        results.append(row)
        bar.set_postfix_str(f"{modality}/{row['format']}: {row['outcome'][:40]}", refresh=False)
        bar.update(1)
    bar.close()
    return results


def format_grid(rows: list[dict]) -> str:
    head = f"{'modality':8} {'format':8} {'seconds':>8}  outcome / verdict"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['modality']:8} {r['format']:8} {r['seconds']:8.1f}  {r['outcome']}; {r['verdict']}")
    failed = sum(not r["outcome"].startswith("ran") for r in rows)
    lines.append(f"{len(rows)} combinations, {failed} failed")
    return "\n".join(lines)
