"""The render command's outcome: LFS stubs are listed, not failures; pages that are not tables are skipped;
the progress bar counts the tables that are drawn, as they finish."""
import json
import re
import shutil

import pytest

from hitbench_utils.__main__ import main
from hitbench_utils.render_all import render_dataset

STUB = "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n"
PAGE = "<!DOCTYPE html><html><head><meta name='generator' content='pdf2htmlEX'/></head><body><div>p. 1</div></body></html>"


@pytest.fixture
def data(tmp_path, sample_data):
    d = tmp_path / "data"
    shutil.copytree(sample_data, d)
    return d


def test_only_lfs_stubs_exit_0_and_are_listed(data, tmp_path, capsys):
    name = "sales-sample01"
    for p in (data / "tables" / f"{name}.xlsx", data / "html" / f"{name}.html"):
        p.write_text(STUB)
    assert main(["render", "--data", str(data), "--out", str(tmp_path / "img")]) == 0
    out = capsys.readouterr().out
    assert "14 tables: 13 rendered, 0 already there, 1 failed" in out
    assert re.search(r"1 without an image because every source is a Git LFS pointer stub.*: sales-sample01$", out, re.M)
    entry = json.loads((tmp_path / "img" / "manifest.json").read_text())[name]
    assert entry["ok"] is False and entry["failure"] == "lfs_stub" and len(entry["errors"]) == 2
    assert not (tmp_path / "img" / f"{name}.png").exists()


def test_a_real_failure_still_exits_1(data, tmp_path, capsys):
    name = "budget-sample04"
    (data / "tables" / f"{name}.xlsx").write_bytes(b"PK\x03\x04 not a workbook")
    (data / "html" / f"{name}.html").write_text(STUB)       # a stub beside a broken file is not "only stubs"
    assert main(["render", "--data", str(data), "--out", str(tmp_path / "img"), "--names", name]) == 1
    assert "1 failed (see their errors in the manifest): budget-sample04" in capsys.readouterr().out
    assert json.loads((tmp_path / "img" / "manifest.json").read_text())[name]["failure"] == "error"


def test_html_pages_that_are_not_tables_are_skipped(data, tmp_path, capsys):
    for page in ("test", "chart_metric_util"):
        (data / "html" / f"{page}.html").write_text(PAGE)
    r = render_dataset(data, tmp_path / "img", progress=False)
    assert (r["tables"], r["rendered"], r["failed"], r["not_tables"]) == (14, 14, 0, ["chart_metric_util", "test"])
    manifest = json.loads((tmp_path / "img" / "manifest.json").read_text())
    assert "test" not in manifest and not (tmp_path / "img" / "test.png").exists()
    (data / "html" / "html-only-sample.html").write_text(
        "<html><body><table><tr><td>a</td><td>1</td></tr></table></body></html>")     # a table without xlsx: drawn
    assert main(["render", "--data", str(data), "--out", str(tmp_path / "img")]) == 0
    out = capsys.readouterr().out
    assert "15 tables: 1 rendered, 14 already there, 0 failed" in out and "2 html files skipped, not tables" in out
    assert json.loads((tmp_path / "img" / "manifest.json").read_text())["html-only-sample"]["source"] == "html"


def test_progress_counts_the_tables_drawn(data, tmp_path, capsys):
    main(["render", "--data", str(data), "--out", str(tmp_path / "img")])
    assert "14/14" in capsys.readouterr().err
    (tmp_path / "img" / "survey-sample08.png").unlink()
    main(["render", "--data", str(data), "--out", str(tmp_path / "img")])
    err = capsys.readouterr().err
    assert "1/1" in err and "14/14" not in err        # the 13 already there are not counted as work done


@pytest.mark.shared
def test_real_data_stubs_and_pages(real_data, tmp_path, capsys):
    """RealHiTBench's own: two tables are LFS stubs in both sources, two html files are pages."""
    names = ["economy-table92", "education-table02", "test", "chart_metric_util", "health-table09"]
    assert main(["render", "--data", str(real_data), "--out", str(tmp_path / "img"), "--names", *names]) == 0
    out = capsys.readouterr().out
    assert "3 tables: 1 rendered" in out and "stub (not an error; fetch them with `git lfs pull` in the dataset " \
        "clone): economy-table92, education-table02" in out and "skipped, not tables (no <table>, no xlsx): " \
        "chart_metric_util, test" in out
    assert (tmp_path / "img" / "health-table09.png").is_file()       # html only, and a table: drawn
