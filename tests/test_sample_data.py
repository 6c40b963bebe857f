"""The embedded synthetic sample dataset: layout, coverage, correct references, determinism."""
from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest

from hitbench_utils import render, sample_data as sd

QA_FIELDS = ["id", "FileName", "CompStrucCata", "Source", "Question", "QuestionType", "SubQType", "COT",
             "FinalAnswer", "ProcessedAnswer"]

# Runs chart programs the way DESIGN.md §8 scores them: lines stripped, module-level exec with fresh
# globals, Agg, plt.show a no-op, each in its own working folder; prints each program's y-data read
# from the current axes for its chart type. (One process for all four keeps the test fast.)
RUNNER = r"""
import json, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
plt.show = lambda *a, **k: None
out = {}
for folder, kind in json.loads(sys.argv[1]):
    os.chdir(folder)
    plt.close("all")
    src = "\n".join(line.strip() for line in open("program.py", encoding="utf-8").read().splitlines())
    exec(compile(src, "program", "exec"), {"__name__": "__main__"})
    ax = plt.gca()
    if kind == "Line":
        ys = [[float(v) for v in l.get_ydata()] for l in ax.get_lines()]
    elif kind == "Bar":
        ys = [float(p.get_height()) for p in ax.patches]
    elif kind == "Scatter":
        ys = [[float(v) for v in c.get_offsets()[:, 1]] for c in ax.collections]
    else:
        ys = [round((p.theta2 - p.theta1) / 360, 2) for p in ax.patches]
    out[folder] = ys
print(json.dumps(out))
"""


def _flat_sorted(values: list) -> list[float]:
    flat = [v for x in values for v in (x if isinstance(x, list) else [x])]
    return sorted(round(float(v), 2) for v in flat)


def _queries(folder: Path) -> list[dict]:
    return json.loads((folder / "QA_final.json").read_text(encoding="utf-8"))["queries"]


def _csv(folder: Path, name: str, skip: int) -> pd.DataFrame:
    return pd.read_csv(folder / "csv" / f"{name}.csv", header=None, skiprows=skip, thousands=",")


def test_layout_is_complete(sample_data: Path):
    assert "synthetic" in (sample_data / "README.md").read_text(encoding="utf-8")
    assert len(sd.SAMPLE_TABLES) == 10
    for name in sd.SAMPLE_TABLES:
        for fmt, ext in sd.FORMATS.items():
            assert (sample_data / fmt / f"{name}.{ext}").stat().st_size > 100, (fmt, name)
        ws = openpyxl.load_workbook(sample_data / "tables" / f"{name}.xlsx").worksheets[0]
        assert ws.merged_cells.ranges, name                       # real merged cells
        assert any(c.font.b for row in ws.iter_rows() for c in row), name   # bold headers
        assert 6 <= ws.max_row <= 25 and 4 <= ws.max_column <= 10, (name, ws.dimensions)
        from PIL import Image
        with Image.open(sample_data / "image" / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100


def test_questions_cover_every_type_and_have_the_real_fields(sample_data: Path):
    qs = _queries(sample_data)
    assert qs == sd.sample_questions()
    assert [q["id"] for q in qs] == list(range(1, 41))
    for q in qs:
        assert list(q) == QA_FIELDS
        assert q["FileName"] in sd.SAMPLE_TABLES and q["Source"] == "hitbench synthetic sample"
        assert q["SubQType"] in sd.QUESTION_TYPES[q["QuestionType"]]
        assert q["COT"] and all(set(c) == {"planning"} for c in q["COT"])
        assert q["FinalAnswer"] and q["ProcessedAnswer"]
    assert {(q["QuestionType"], q["SubQType"]) for q in qs} == {
        (t, s) for t, subs in sd.QUESTION_TYPES.items() for s in subs}
    per_table = {n: sum(q["FileName"] == n for q in qs) for n in sd.SAMPLE_TABLES}
    assert min(per_table.values()) >= 2
    for q in qs:
        if q["SubQType"] == "Exploratory Analysis":
            rel, coef = q["ProcessedAnswer"].rsplit(", ", 1)
            assert rel.endswith("correlation") and -1 <= float(coef) <= 1


def test_visualization_references_reproduce_processed_answer(sample_data: Path, tmp_path: Path):
    jobs = {}
    for q in _queries(sample_data):
        if q["QuestionType"] != "Visualization":
            continue
        assert q["FinalAnswer"].startswith("import pandas as pd") and q["FinalAnswer"].endswith("plt.show()")
        assert "pd.read_excel('table.xlsx'" in q["FinalAnswer"]
        d = tmp_path / str(q["id"])
        d.mkdir()
        shutil.copy(sample_data / "tables" / f"{q['FileName']}.xlsx", d / "table.xlsx")
        (d / "program.py").write_text(q["FinalAnswer"], encoding="utf-8")
        jobs[str(d)] = (q, q["SubQType"].split()[0].replace("Chart", ""))
    assert {k for _, k in jobs.values()} == {"Line", "Bar", "Pie", "Scatter"}
    p = subprocess.run([sys.executable, "-c", RUNNER, json.dumps([[d, k] for d, (_, k) in jobs.items()])],
                       cwd=tmp_path, env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    results = json.loads(p.stdout)
    for d, (q, kind) in jobs.items():
        got = results[d]
        ref = ast.literal_eval(q["ProcessedAnswer"].strip())
        assert q["ProcessedAnswer"].endswith("\n")
        if kind == "Pie":   # DESIGN §8: reference values become shares of their total
            ref = [round(v / sum(ref), 2) for v in ref]
        if kind in ("Line", "Scatter"):
            assert isinstance(ref[0], list) and len(got) == len(ref)
        assert got and _flat_sorted(got) == _flat_sorted(ref), (q["id"], got, ref)


def test_numeric_references_recomputed_from_the_csv(sample_data: Path):
    ans = {q["id"]: q["ProcessedAnswer"] for q in _queries(sample_data)}
    sales = _csv(sample_data, "sales-sample01", 2)
    sales[0] = sales[0].ffill()
    assert ans[2] == str(sales[sales[0] == "Europe"].iloc[:, 2:6].to_numpy().sum())
    assert ans[5] == f"Strong positive correlation, {sales[2].corr(sales[6]):.2f}"
    emp = _csv(sample_data, "employment-sample02", 3)
    rates = emp[~emp[0].str.startswith("Total")][6]
    assert ans[9] == f"{rates.mean():.2f}, {rates.std():.2f}"
    hosp = _csv(sample_data, "hospital-sample06", 3)
    assert ans[27] == f"{hosp.iloc[:, 1:5].sum(axis=1).mean():.2f}"
    agri = _csv(sample_data, "agriculture-sample10", 2)
    section = agri[0].where(agri[1].isna()).ffill()
    assert ans[39] == str(int(agri[(section == "Cereals") & agri[1].notna()][6].sum()))
    enr = _csv(sample_data, "enrollment-sample03", 2)
    slope, icpt = np.polyfit(range(8), enr[7], 1)
    assert ans[12] == str(round(slope * 8 + icpt))
    weather = _csv(sample_data, "weather-sample05", 2)
    assert ans[22] == str(int((weather[1] > 10).sum()))


def test_text_formats_agree_with_the_csv(sample_data: Path):
    """html (rowspan/colspan), json and latex carry the same cells as the csv, in the same places."""
    for name in sd.SAMPLE_TABLES:
        rows = pd.read_csv(sample_data / "csv" / f"{name}.csv", header=None, dtype=str,
                           keep_default_na=False).values.tolist()
        grid = render.grid_from_html(sample_data / "html" / f"{name}.html")
        assert (grid.n_rows, grid.n_cols) == (len(rows), len(rows[0]))
        texts = {(c.row, c.col): c.text for c in grid.cells}
        for r, row in enumerate(rows):
            for c, v in enumerate(row):
                assert texts.get((r, c), "") == v, (name, r, c)
        recs = json.loads((sample_data / "json" / f"{name}.json").read_text(encoding="utf-8"))
        assert len(recs) == len(rows) - 1 and all(len(x) == len(rows[0]) for x in recs)
        tex = (sample_data / "latex" / f"{name}.txt").read_bytes().decode("utf-8")
        assert "\\begin{tabular}" in tex and "\\multicolumn" in tex and "\r\n" in tex
        assert tex.count("\\\\\r\n") == len(rows) - 1
        md = (sample_data / "markdown" / f"{name}.md").read_text(encoding="utf-8").splitlines()
        assert md[1].startswith("|---:|:") and len(md) == len(rows) + 1


def test_build_is_deterministic_and_pngs_are_up_to_date(sample_data: Path, tmp_path: Path):
    other = sd.ensure_sample_dataset(tmp_path / "again")
    files = sorted(p.relative_to(sample_data) for p in sample_data.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert len(files) == 2 + 1 + (10 + 4) * 7      # 10 tables and the _swap copies of the 4 with SC questions
    for rel in files:
        assert (sample_data / rel).read_bytes() == (other / rel).read_bytes(), rel
    for name in sd.SAMPLE_TABLES:
        png = tmp_path / f"{name}.png"
        render.render_xlsx(sample_data / "tables" / f"{name}.xlsx", png)
        assert png.read_bytes() == (sample_data / "image" / f"{name}.png").read_bytes(), name


def test_ensure_is_idempotent_and_uses_the_versioned_cache(tmp_path: Path, monkeypatch, sample_data: Path):
    monkeypatch.setenv("HITBENCH_CACHE", str(tmp_path / "cache"))
    dest = sd.default_dest()
    assert dest == tmp_path / "cache" / f"sample-{sd.content_version()}"
    shutil.copytree(sample_data, dest)      # a complete folder of this version is reused untouched
    stamp = (dest / "QA_final.json").stat().st_mtime_ns
    assert sd.ensure_sample_dataset() == dest
    assert (dest / "QA_final.json").stat().st_mtime_ns == stamp
    (dest / "csv" / "sales-sample01.csv").unlink()     # an incomplete one is rebuilt in place
    assert sd.ensure_sample_dataset() == dest
    assert (dest / "csv" / "sales-sample01.csv").read_bytes() == (sample_data / "csv" / "sales-sample01.csv").read_bytes()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]    # no temp folders left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        sd.ensure_sample_dataset(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_pie_reference_is_stable_under_renormalisation():
    for q in sd.sample_questions():
        if q["SubQType"] == "PieChart Generation":
            shares = ast.literal_eval(q["ProcessedAnswer"])
            assert math.isclose(sum(shares), 1.0) and [round(s / sum(shares), 2) for s in shares] == shares
