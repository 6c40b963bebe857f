"""``python -m hitbench_utils render``: table images for a dataset that has none (ours has no PNGs).

Each table is drawn from its xlsx; where the xlsx is missing or a Git LFS stub, from the html table.
Images already rendered are skipped, so an interrupted render resumes; a manifest records each image's
size in pixels, its source and any failure. The images go to their own folder, never into the data.

Two kinds of file are not failures of the renderer, so they do not fail the command:
- a table whose every source is a Git LFS pointer stub (or absent): the data lacks it; the manifest
  marks it ``"failure": "lfs_stub"`` and the summary lists it;
- an html file that holds no ``<table>`` and has no xlsx (``html/test.html``, ``chart_metric_util.html``
  in RealHiTBench are pages, not tables): it is skipped and listed as not a table.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from .data import is_lfs_pointer
from .errors import ConfigError, MissingInputError

MANIFEST = "manifest.json"
_TABLE_TAG = re.compile(rb"<table[\s>]", re.I)


def table_names(data: Path, only: list[str] | None = None) -> list[str]:
    """Every name with a ``tables/<name>.xlsx`` or an ``html/<name>.html`` (or ``only``, checked)."""
    names = {p.stem for p in (data / "tables").glob("*.xlsx")} | {p.stem for p in (data / "html").glob("*.html")}
    if only:
        missing = sorted(set(only) - names)
        if missing:
            raise ConfigError("names", missing, f"tables present in {data}", "check the names (no extension)")
        names = set(only)
    return sorted(names)


def is_table(data: Path, name: str) -> bool:
    """False for an html file without a ``<table>`` element and no xlsx: a page, not a table.
    An LFS stub counts as a table (it stands for one), so it is reported, not hidden."""
    xlsx, page = data / "tables" / f"{name}.xlsx", data / "html" / f"{name}.html"
    if xlsx.is_file() or not page.is_file() or is_lfs_pointer(page):
        return True
    return bool(_TABLE_TAG.search(page.read_bytes()))


def render_dataset(data: str | os.PathLike, out: str | os.PathLike, *, names: list[str] | None = None,
                   force: bool = False, progress: bool = True, max_cells: int | None = None) -> dict:
    """Render every table of ``data`` into ``out``/<name>.png; returns the summary (counts and lists).

    ``failed`` counts every table without an image; ``lfs_stubs`` names those whose sources are all
    LFS stubs, ``errors`` the others (only these are failures of the command); ``not_tables`` the
    html pages that were skipped. The progress bar counts tables as they finish."""
    from tqdm.auto import tqdm

    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise ConfigError("data", str(data), "a RealHiTBench folder with tables/ and html/")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    names_all = table_names(data, names)
    not_tables = [n for n in names_all if not is_table(data, n)]
    for n in not_tables:
        manifest.pop(n, None)
    todo = [n for n in names_all if n not in not_tables]
    done = [n for n in todo if not force and manifest.get(n, {}).get("ok") and (out / f"{n}.png").is_file()]
    work = [n for n in todo if n not in set(done)]
    rendered = 0
    with tqdm(total=len(work), desc="render", unit="table", disable=not progress) as bar:
        for name in work:
            manifest[name] = _render_one(data, out, name, max_cells)
            rendered += manifest[name]["ok"]
            bar.update(1)
            if rendered and rendered % 25 == 0:
                _write(manifest_path, manifest)
    _write(manifest_path, manifest)
    failed = [n for n in work if not manifest[n]["ok"]]
    return {"out": str(out), "tables": len(todo), "rendered": rendered, "skipped": len(done),
            "failed": len(failed), "lfs_stubs": [n for n in failed if manifest[n].get("failure") == "lfs_stub"],
            "errors": [n for n in failed if manifest[n].get("failure") != "lfs_stub"],
            "not_tables": not_tables, "manifest": str(manifest_path)}


def _render_one(data: Path, out: Path, name: str, max_cells: int | None) -> dict:
    """One table: the xlsx, else the html; a failure is typed from the files, never from a message."""
    from .render import render_html, render_xlsx

    t0, entry, kinds = time.perf_counter(), {"ok": False}, []
    for source, path, fn in (("xlsx", data / "tables" / f"{name}.xlsx", render_xlsx),
                             ("html", data / "html" / f"{name}.html", render_html)):
        kinds.append("absent" if not path.is_file() else "lfs_stub" if is_lfs_pointer(path) else "file")
        try:
            kw = {"max_cells": max_cells} if source == "xlsx" else {}
            w, h = fn(path, out / f"{name}.png", **kw)
            entry.update(ok=True, source=source, width=w, height=h, pixels=w * h)
            break
        except (MissingInputError, OSError, ValueError, KeyError) as e:
            entry.setdefault("errors", []).append(f"{source}: {type(e).__name__}: {e}")
    if not entry["ok"]:
        entry["failure"] = "lfs_stub" if "lfs_stub" in kinds and "file" not in kinds else "error"
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


def format_render(r: dict) -> str:
    """The command's summary: counts, then the LFS stubs, the skipped pages and the real errors by name."""
    lines = [f"{r['tables']} tables: {r['rendered']} rendered, {r['skipped']} already there, {r['failed']} failed; "
             f"manifest {r['manifest']}"]
    if r["lfs_stubs"]:
        lines.append(f"{len(r['lfs_stubs'])} without an image because every source is a Git LFS pointer stub "
                     f"(not an error; fetch them with `git lfs pull` in the dataset clone): " + ", ".join(r["lfs_stubs"]))
    if r["not_tables"]:
        lines.append(f"{len(r['not_tables'])} html files skipped, not tables (no <table>, no xlsx): "
                     + ", ".join(r["not_tables"]))
    if r["errors"]:
        lines.append(f"{len(r['errors'])} failed (see their errors in the manifest): " + ", ".join(r["errors"]))
    return "\n".join(lines)


def _write(path: Path, manifest: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
