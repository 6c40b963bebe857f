"""The report: tables, figures, the CLI, the notebook under papermill, its HTML export in headless Chromium.

Demo runs are made with the tiny model on the sample dataset: text/csv with injected errors, a few
truncations and some answers given right (so the metrics are not all 0), and mix/html for image tokens.
Every count is checked against the run log, never against the notebook's text.
"""
import base64
import dataclasses
import json
import re
import shutil
from io import BytesIO
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest
from PIL import Image

from chromium_probe import assert_not_blank, chromium_sees
from hitbench_utils import report as R
from hitbench_utils.__main__ import main
from hitbench_utils.config import RunConfig
from hitbench_utils.data import load_queries
from hitbench_utils.errors import ERROR_STATUSES
from hitbench_utils.faults import FaultyBackend, OracleBackend
from hitbench_utils.run import Job
from hitbench_utils import report_paper as RP
from hitbench_utils.report_paper import KEY_COLUMNS
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
    trunc = rep.tables["truncation"]          # one row per run, never a format pooled across runs
    recs = latest(demo_runs / "tiny_text_csv")
    assert list(trunc.index) == ["tiny_mix_html", "tiny_text_csv"]
    assert trunc.loc["tiny_text_csv", "truncated"] == sum(r["truncated"] for r in recs)
    assert trunc.loc["tiny_mix_html", "truncated"] == 0 and trunc.loc["tiny_mix_html", "modality"] == "mix"
    vs = rep.tables["truncated_vs_rest"].set_index("samples")
    assert vs.loc["truncated", "n"] == sum(r["truncated"] for r in recs)
    assert vs.loc["not truncated", "n"] == sum(not r["truncated"] for r in recs)
    assert vs.loc["truncated", "errors"] == sum(r["truncated"] and r["status"] != "ok" for r in recs)
    assert list(rep.tables["latency"]["count"]) == [sum(r["status"] == "ok" for r in latest(p.path)) for p in rep.runs]
    assert [line.split(" | ")[0] for line in rep.paper_md.splitlines()[2:]] == ["| tiny_mix_html", "| tiny_text_csv"]
    assert r"\begin{tabular}" in rep.paper_tex and r"tiny\_text\_csv & tiny & text & csv & QA\_final.json & limit 8" \
        in rep.paper_tex
    assert list(pd.read_csv(tmp_path / "out" / "paper_table.csv")["Run"]) == ["tiny_mix_html", "tiny_text_csv"]
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
    assert "\\midrule" in (out / "paper_table.tex").read_text() and "| tiny_text_csv | tiny |" in (out / "paper_table.md").read_text()
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


@pytest.fixture(scope="module")
def wide_runs(demo_runs, tmp_path_factory):
    """The demo runs, plus a run with a long folder name whose results.json names an SC protocol and whose
    Data Analysis records carry judge scores, plus a second run folder of the same name as a demo run."""
    root = tmp_path_factory.mktemp("wide")
    long = root / "Qwen3-VL-8B-Instruct_text_csv_QA_final_max_input_tokens_560_temperature_0.7"
    shutil.copytree(demo_runs / "tiny_text_csv", long)
    res = json.loads((long / "results.json").read_text())
    res["config"]["structure_reference"] = "consistency"
    (long / "results.json").write_text(json.dumps(res))
    shutil.copytree(demo_runs / "tiny_mix_html", root / "again" / "tiny_mix_html")
    runs = R.load_runs([str(demo_runs / "*"), str(long), str(root / "again" / "tiny_mix_html")])
    runs[2].latest = [dict(r, status="ok", scores={**(r.get("scores") or {}), "judge": 70.0}, score_status="scored")
                      if r["question_type"] == "Data Analysis" else r for r in runs[2].latest]
    assert any(r["question_type"] == "Data Analysis" for r in runs[2].latest)
    fc = next(r for r in runs[2].latest if r["question_type"] == "Fact Checking")
    runs[2].latest.append(dict(fc, id=10_000, question_type="Structure Comprehending"))   # its SC protocol shows
    return runs


def test_paper_table_rows_name_their_run_with_judge_and_protocol(wide_runs, tmp_path):
    rep = R.build_report(wide_runs, tmp_path / "out")
    p = rep.paper
    assert list(p["Run"]) == [r.name for r in wide_runs]
    assert wide_runs[1].name == "tiny_text_csv" and wide_runs[2].name == wide_runs[2].path.name
    assert wide_runs[0].name == f"{wide_runs[0].path.parent.name}/tiny_mix_html"     # the same folder name twice:
    assert wide_runs[3].name == "again/tiny_mix_html"                                 # told apart by the parent
    assert list(p["Subset"]) == ["limit 4", "limit 8", "limit 8", "limit 4"] and set(p["QA file"]) == {"QA_final.json"}
    keys = p[KEY_COLUMNS].astype(str).agg(" ".join, axis=1)
    assert keys.is_unique                                  # two runs never print as identical rows
    assert list(p["SC protocol"]) == ["–", "–", "consistency", "–"]
    want = aggregate(wide_runs[2].latest)["by_type"]["Data Analysis"]["judge"]
    assert want is not None and p.loc[2, "DA GPT"] == pytest.approx(want) and p["DA GPT"].isna().sum() == 3
    assert list(p.columns).index("DA GPT") == list(p.columns).index("DA EM") + 1
    assert "DA GPT" in rep.tables["metrics"].columns
    assert r"\multicolumn{4}{c}{Data Analysis}" in rep.paper_tex and "| DA GPT |" in rep.paper_md


def test_report_html_structure(wide_runs, tmp_path):
    page = R.write_html(R.build_report(wide_runs, tmp_path / "out")).read_text()
    assert "tiny_<wbr>text_<wbr>csv" in page                # names may wrap where they have no spaces
    page = page.replace("<wbr>", "")
    assert "<pre" not in page                               # the paper table is no markdown in a <pre>
    table = re.search(r'<table id="paper-table" class="paper">(.*?)</table>', page, re.S)[1]
    assert re.findall(r'<th colspan="(\d)" class="group">([^<]+)</th>', table) == [
        ("2", "Fact Checking"), ("2", "Numerical Reasoning"), ("2", "Structure Comprehending"), ("4", "Data Analysis"),
        ("2", "Visualization")]
    assert re.findall(r'<tr><td class="key">([^<]+)</td>', table) == [r.name for r in wide_runs]
    headings = re.findall(r"<h2>([^<]+)</h2>", page)
    assert headings == ["Paper table", "Runs", "Errors per run and status", "Truncation per run",
                        "Truncated samples against the rest", "Latency (ok samples, s)"]
    runs_part = page.split("<h2>Runs</h2>")[1].split("<h2>")[0]
    first, second = re.findall(r"<thead>(.*?)</thead>", runs_part)
    assert "verdict" not in first and re.findall(r"<th[^>]*>([^<]+)</th>", second) == ["run", "verdict"]
    assert len(decoded_images(page)) == 4


def test_report_html_in_headless_chromium_fits_1400px(wide_runs, tmp_path):
    page = R.write_html(R.build_report(wide_runs, tmp_path / "out"))
    seen, shot = chromium_sees(page, tmp_path)
    assert seen["scrollWidth"] <= seen["clientWidth"], seen          # no horizontal scroll at 1400 px
    assert seen["overflowing"] == 0, seen
    assert seen["paper"] == [r.name for r in wide_runs]                # a real <table>, one row per run
    assert len(seen["images"]) == 4 and all(i["ok"] and i["natural"] >= 1200 for i in seen["images"]), seen
    assert all(i["shown"] >= 0.9 * seen["body"] for i in seen["images"]), seen   # figures at full width
    assert_not_blank(shot, (1400, 2000))


def test_report_notebook_html_in_headless_chromium(request, tmp_path):
    _, html_path = request.getfixturevalue("executed_report")
    seen, shot = chromium_sees(html_path, tmp_path)
    assert seen["paper"] == ["tiny_text_csv", "tiny_mix_html"], seen
    assert seen["scrollWidth"] <= seen["clientWidth"], seen
    assert len(seen["images"]) == 4 and all(i["ok"] for i in seen["images"]), seen
    assert_not_blank(shot, (1400, 2000))


def test_structure_under_both_protocols_and_run_key(wide_runs, tmp_path, monkeypatch):
    """Aggregates that carry SC under both protocols (``structure``) get their own table and section, and
    name the protocol in the paper table; results.json's run_key.subset is the subset when present."""
    sc = {"protocol": "gold", "tables": "swap", "n": 3, "paired": 3,
          "gold": {"F1": 50.0, "EM": 33.3, "unscored": 0}, "consistency": {"F1": 80.0, "EM": 66.7, "unscored": 1}}
    real = R.aggregate

    def with_sc(records):
        out = real(records)
        if records is wide_runs[1].latest:
            out["structure"] = sc
            out["by_type"].setdefault("Structure Comprehending", {})["protocol"] = "gold"
        return out
    monkeypatch.setattr(R, "aggregate", with_sc)
    monkeypatch.setattr(RP, "aggregate", with_sc)
    rep = R.build_report(wide_runs, tmp_path / "out")
    t = rep.tables["structure"]
    assert list(t["run"]) == ["tiny_text_csv"] and t.loc[0, "consistency F1"] == 80.0 and t.loc[0, "tables"] == "swap"
    assert list(rep.paper["SC protocol"]) == ["–", "gold", "consistency", "–"]
    page = R.write_html(rep).read_text().replace("<wbr>", "")
    assert "<h2>Structure Comprehending under both protocols</h2>" in page and "80.00" in page
    res = json.loads((wide_runs[2].path / "results.json").read_text())
    res["run_key"] = {"run": wide_runs[2].path.name, "qa_file": "QA_final.json", "subset": {"ids": [5, 6]}}
    (wide_runs[2].path / "results.json").write_text(json.dumps(res))
    assert R.load_run(wide_runs[2].path).subset == "ids 5, 6"
    res["run_key"]["subset"] = None                      # None: the whole QA file
    (wide_runs[2].path / "results.json").write_text(json.dumps(res))
    assert R.load_run(wide_runs[2].path).subset == "all"


def test_subset_labels():
    assert R.subset_label({"limit": None, "ids": None, "question_type": None}) == "all"
    assert R.subset_label({"limit": 8}) == "limit 8"
    assert R.subset_label({"ids": [1464, 2016, 1]}) == "ids 1464, 2016, 1"
    assert R.subset_label({"ids": list(range(5, 105))}) == "100 ids, 5–104"
    assert R.subset_label({"ids": "[3, 4]", "question_type": ["Fact Checking", "Visualization"], "limit": 2}) \
        == "ids 3, 4; question_type Fact Checking, Visualization; limit 2"
    assert R.subset_label("first 50 of Data Analysis") == "first 50 of Data Analysis"
    assert R.subset_label({"label": "SC only", "limit": 3}) == "SC only"


@pytest.mark.parametrize("name", ["report.ipynb", "debug_errors.ipynb"])
def test_committed_notebooks_are_stripped_and_have_parameters_tag(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("parameters" in c.metadata.get("tags", []) for c in code)
    assert all(not c.outputs and c.execution_count is None for c in code)
