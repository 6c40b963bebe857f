"""The report: tables, figures, the CLI, the notebook under papermill, its HTML export in headless Chromium.

Demo runs are made with the tiny model on the sample dataset: text/csv with injected errors, a few
truncations and some answers given right (so the metrics are not all 0), and mix/html for image tokens.
Every count is checked against the run log, never against the notebook's text.
"""
import base64
import dataclasses
import re
import shutil
import subprocess
from io import BytesIO
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest
from PIL import Image

from hitbench_utils import report as R
from hitbench_utils.__main__ import main
from hitbench_utils.config import RunConfig
from hitbench_utils.data import load_queries
from hitbench_utils.errors import ERROR_STATUSES
from hitbench_utils.faults import FaultyBackend, OracleBackend
from hitbench_utils.run import Job
from hitbench_utils.runlog import read_log, view
from hitbench_utils.scoring.aggregates import aggregate

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
FAULTS = {2: "oom", 5: "exception", 7: "timeout"}
ORACLE = {1, 3, 6}          # answered with the reference: 1 and 3 are not truncated, 6 is


# FaultyBackend wraps generate(); the shared-prefix engine drives the model directly, so it is turned off here.
NO_PREFIX = {"share_prefix": False} if "share_prefix" in {f.name for f in dataclasses.fields(RunConfig)} else {}


def make_run(run_dir, backend, data, **kw):
    kw = {**NO_PREFIX, **kw}
    cfg = RunConfig(data_path=str(data), run_dir=str(run_dir), dtype="float32", device="cpu", max_reasks=0,
                    max_new_tokens=4, token_budget=100_000, **kw)
    return Job(cfg, backend=backend, progress=False).execute()


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory, tiny_backend, sample_data):
    root = tmp_path_factory.mktemp("runs")
    oracle = OracleBackend(tiny_backend, load_queries(sample_data / "QA_final.json"), only=ORACLE)
    make_run(root / "tiny_text_csv", FaultyBackend(oracle, FAULTS), sample_data, format="csv", limit=8,
             max_input_tokens=560)
    make_run(root / "tiny_mix_html", tiny_backend, sample_data, modality="mix", format="html", limit=4)
    return root


def latest(run_dir):
    return list(view(read_log(run_dir).records).values())


def check_counts(table: pd.DataFrame, root: Path):
    """The run table's counts, recomputed from each run's samples.jsonl."""
    assert set(table["run"]) == {"tiny_text_csv", "tiny_mix_html"}
    for _, row in table.iterrows():
        recs = latest(root / row["run"])
        assert row["total"] == len(recs) and row["ok"] == sum(r["status"] == "ok" for r in recs)
        for st in ERROR_STATUSES:
            assert row[st] == sum(r["status"] == st for r in recs), (row["run"], st)
        assert row["errors"] == sum(r["status"] != "ok" for r in recs)
        assert row["truncated"] == sum(bool(r["truncated"]) for r in recs)
        assert row["degraded"] == sum(bool(r["degraded"]) for r in recs)
    csv = table.set_index("run").loc["tiny_text_csv"]
    assert (csv["oom"], csv["exception"], csv["timeout"], csv["remaining"]) == (1, 1, 1, 3)
    assert 0 < csv["truncated"] < csv["total"]


def decoded_images(html_text: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r'src="data:image/png;base64,([^"]+)"', html_text):
        raw = base64.b64decode(b64)
        Image.open(BytesIO(raw)).verify()          # raises on a broken image
        out.append(Image.open(BytesIO(raw)))
    return out


def test_tables_match_the_run_log(demo_runs, tmp_path):
    rep = R.build_report(str(demo_runs / "*"), tmp_path / "out")
    check_counts(rep.tables["runs"], demo_runs)
    for run in rep.runs:     # the metrics are scoring.aggregate over the latest records
        by_type = aggregate(latest(run.path))["by_type"]
        for (qtype, metric), col in zip(R.PAPER_COLUMNS, R.METRIC_COLUMNS):
            want = (by_type.get(qtype) or {}).get(metric)
            got = rep.tables["metrics"].loc[run.name, col]
            assert (want is None and pd.isna(got)) or got == pytest.approx(want), (run.name, col)
    assert rep.tables["metrics"].loc["tiny_text_csv", "FC EM"] > 0        # the oracle answers count
    trunc = rep.tables["truncation"]
    recs = latest(demo_runs / "tiny_text_csv")
    assert trunc.loc["csv", "truncated"] == sum(r["truncated"] for r in recs) and trunc.loc["html", "truncated"] == 0
    vs = rep.tables["truncated_vs_rest"].set_index("samples")
    assert vs.loc["truncated", "n"] == sum(r["truncated"] for r in recs)
    assert vs.loc["not truncated", "n"] == sum(not r["truncated"] for r in recs)
    assert vs.loc["truncated", "errors"] == sum(r["truncated"] and r["status"] != "ok" for r in recs)
    assert list(rep.tables["latency"]["count"]) == [sum(r["status"] == "ok" for r in latest(p.path)) for p in rep.runs]
    assert rep.paper_md.count("| tiny |") == 2 and r"\begin{tabular}" in rep.paper_tex
    for name in ("runs", "errors", "truncation", "metrics", "truncated_vs_rest", "latency"):
        for ext in ("csv", "md", "tex"):
            assert (tmp_path / "out" / f"{name}.{ext}").stat().st_size > 0
    for name, png in rep.figures.items():
        with Image.open(png) as im:
            assert im.size[0] > 300 and len(im.convert("RGB").getcolors(1 << 20)) > 20, name


def test_cli_report_writes_tables_figures_and_a_self_contained_page(demo_runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(demo_runs / "tiny_text_csv"), str(demo_runs / "tiny_mix_*"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny_text_csv" in text and "FC EM" in text and "report.html" in text
    check_counts(pd.read_csv(out / "runs.csv"), demo_runs)
    assert "\\midrule" in (out / "paper_table.tex").read_text() and "| tiny |" in (out / "paper_table.md").read_text()
    images = decoded_images((out / "report.html").read_text())
    assert len(images) == 4 and all(im.size[0] > 300 for im in images)
    assert {p.name for p in out.glob("*.png")} == {"errors.png", "tokens.png", "metrics_heatmap.png", "latency.png"}


def test_load_runs_takes_folders_globs_and_lists(demo_runs, tmp_path):
    assert [r.name for r in R.load_runs(str(demo_runs / "*"))] == ["tiny_mix_html", "tiny_text_csv"]
    runs = R.load_runs([str(demo_runs / "tiny_text_csv"), str(demo_runs / "*")])
    assert [r.name for r in runs] == ["tiny_text_csv", "tiny_mix_html"]        # no duplicates, order kept
    with pytest.raises(FileNotFoundError, match="no run folder"):
        R.load_runs(str(tmp_path / "nothing*"))


def test_text_table_markdown_and_latex():
    df = pd.DataFrame({"run": ["a_b"], "x": [1.234], "y": [float("nan")]})
    assert R.text_table(df).splitlines()[2] == "| a_b | 1.23 | – |"
    assert r"a\_b & 1.23 & -- \\" in R.text_table(df, "latex")


@pytest.fixture(scope="module")
def executed_report(demo_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    pm.execute_notebook(str(NOTEBOOKS / "report.ipynb"), str(out / "notebook.ipynb"), progress_bar=False,
                        parameters=dict(runs=[str(demo_runs / "tiny_text_csv"), str(demo_runs / "tiny_mix_html")],
                                        out_dir=str(out)))
    return out, R.export_notebook_html(out / "notebook.ipynb")


def test_report_notebook_under_papermill(demo_runs, executed_report):
    out, html_path = executed_report
    check_counts(pd.read_csv(out / "runs.csv"), demo_runs)
    for name in ("errors", "tokens", "metrics_heatmap", "latency"):
        assert (out / f"{name}.png").stat().st_size > 1000
    assert (out / "paper_table.md").is_file() and (out / "paper_table.tex").is_file()
    assert html_path.stat().st_size > 10_000
    images = decoded_images(html_path.read_text())
    assert len(images) == 4 and all(im.size[0] > 300 for im in images)


def test_report_html_screenshot_in_headless_chromium_is_not_blank(request, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    _, html_path = request.getfixturevalue("executed_report")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    html_path.resolve().as_uri()], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        rgb = im.convert("RGB")
        assert rgb.size == (1280, 2000)
        colors = rgb.getcolors(1 << 22)
        white = sum(n for n, c in colors if min(c) >= 250)
        assert len(colors) > 100, "the screenshot has almost no colours: blank?"
        assert white < 0.97 * rgb.size[0] * rgb.size[1], "the screenshot is almost all white"


@pytest.mark.parametrize("name", ["report.ipynb", "debug_errors.ipynb"])
def test_committed_notebooks_are_stripped_and_have_parameters_tag(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("parameters" in c.metadata.get("tags", []) for c in code)
    assert all(not c.outputs and c.execution_count is None for c in code)
