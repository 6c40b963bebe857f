"""``python -m hitbench_utils render``: table images for a dataset that has none (ours has no PNGs).

Each table is drawn from its xlsx; where the xlsx is missing or a Git LFS stub, from the html table.
Images already rendered are skipped, so an interrupted render resumes; a manifest records each image's
size in pixels, its source and any failure. The images go to their own folder, never into the data.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import ConfigError, MissingInputError

MANIFEST = "manifest.json"


def table_names(data: Path, only: list[str] | None = None) -> list[str]:
    names = {p.stem for p in (data / "tables").glob("*.xlsx")} | {p.stem for p in (data / "html").glob("*.html")}
    if only:
        missing = sorted(set(only) - names)
        if missing:
            raise ConfigError("names", missing, f"tables present in {data}", "check the names (no extension)")
        names = set(only)
    return sorted(names)


def render_dataset(data: str | os.PathLike, out: str | os.PathLike, *, names: list[str] | None = None,
                   force: bool = False, progress: bool = True, max_cells: int | None = None) -> dict:
    """Render every table of ``data`` into ``out``/<name>.png; returns the manifest."""
    from tqdm.auto import tqdm

    from .render import render_html, render_xlsx

    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise ConfigError("data", str(data), "a RealHiTBench folder with tables/ and html/")
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    todo = table_names(data, names)
    counts = {"rendered": 0, "skipped": 0, "failed": 0}
    for name in tqdm(todo, desc="render", disable=not progress):
        png = out / f"{name}.png"
        if png.is_file() and not force and manifest.get(name, {}).get("ok"):
            counts["skipped"] += 1
            continue
        t0, entry = time.perf_counter(), {"ok": False}
        for source, path, fn in (("xlsx", data / "tables" / f"{name}.xlsx", render_xlsx),
                                 ("html", data / "html" / f"{name}.html", render_html)):
            try:
                kw = {"max_cells": max_cells} if source == "xlsx" else {}
                w, h = fn(path, png, **kw)
                entry.update(ok=True, source=source, width=w, height=h, pixels=w * h)
                break
            except (MissingInputError, OSError, ValueError, KeyError) as e:
                entry.setdefault("errors", []).append(f"{source}: {type(e).__name__}: {e}")
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        manifest[name] = entry
        counts["rendered" if entry["ok"] else "failed"] += 1
        if counts["rendered"] % 25 == 0:
            _write(manifest_path, manifest)
    _write(manifest_path, manifest)
    return {"out": str(out), "tables": len(todo), **counts, "manifest": str(manifest_path)}


def _write(path: Path, manifest: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
