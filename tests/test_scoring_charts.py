"""Chart scoring: code extraction, the Pass rule, the sandboxed fork server, hostile programs,
throughput, and reference programs of our own for real RealHiTBench questions."""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hitbench_utils.scoring import chart_code
from hitbench_utils.scoring.charts import ChartRunner, sandbox_info, score_chart, xlsx_problem
from hitbench_utils.scoring.records import score_record

REPO = Path(__file__).resolve().parents[1]
HEAD = "import pandas as pd\nimport matplotlib.pyplot as plt\n"


def program(body: str) -> str:
    return HEAD + "df = pd.read_excel('table.xlsx')\n" + body.strip("\n") + "\nplt.show()\n"


@pytest.fixture(scope="module")
def xlsx(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tables") / "demo-table01.xlsx"
    pd.DataFrame({"Year": [2020, 2021, 2022, 2023], "Sales": [10.0, 12.5, 11.25, 14.0],
                  "Costs": [7, 8, np.nan, 9], "Share": [10, 20, 30, 40],
                  "Label": ["a", "b", "c", "d"]}).to_excel(path, index=False)
    return str(path)


# ---- pure helpers --------------------------------------------------------------------------
def test_extract_code_takes_the_last_pandas_span_then_the_matplotlib_one() -> None:
    text = ("Try this:\n```python\nimport pandas as pd\nx=1\nplt.show()\n```\nor better:\n"
            "```python\nimport pandas as pd\nx=2\nplt.show()\n```\n[Final Answer]: done")
    assert chart_code.extract_code(text) == "import pandas as pd\nx=2\nplt.show()"
    assert chart_code.extract_code("import matplotlib.pyplot as plt\nplt.plot([1])\nplt.show()") \
        == "import matplotlib.pyplot as plt\nplt.plot([1])\nplt.show()"
    assert chart_code.extract_code("no code here") is None
    assert chart_code.extract_code("import pandas as pd\nno show") is None


def test_strip_lines_and_path_rewrite() -> None:
    code = chart_code.strip_lines(" import pandas as pd \n df = pd.read_excel('x/y.xlsx')\n  plt.show()")
    assert code == "import pandas as pd\ndf = pd.read_excel('x/y.xlsx')\nplt.show()\n"
    src = ("a = pd.read_excel('employment-table02.xlsx')\nb = pd.read_excel(\"data/other.xlsx\", sheet_name='S')\n"
           "# reads table.xlsx\nc = 'it''s'\n")
    out = chart_code.rewrite_xlsx_paths(src, "/w/t.xlsx")
    assert out == ("a = pd.read_excel('/w/t.xlsx')\nb = pd.read_excel(\"/w/t.xlsx\", sheet_name='S')\n"
                   "# reads /w/t.xlsx\nc = 'it''s'\n")
    assert chart_code.chart_type_of("PieChart Generation") == "PieChart"
    assert chart_code.chart_type_of("") == ""


def test_pass_rule() -> None:
    ok = chart_code.chart_pass
    assert ok([[1.004, 2.0], [3.0]], "[[3, 1], [2.0]]", "LineChart") == (True, None)  # flatten, round, sort
    assert ok([1.0, 2.0], "[1, 2, 3]", "BarChart")[0] is False
    assert ok([1.006], "[1.0]", "BarChart")[0] is False  # 1.01 != 1.0
    # Pie: the reference becomes shares of its total, rounded to 2.
    assert ok([0.1, 0.2, 0.3, 0.4], "[10, 20, 30, 40]", "PieChart") == (True, None)
    assert ok([0.1, 0.2, 0.3, 0.4], "[0.1, 0.2, 0.3, 0.4]", "PieChart")[0] is True
    assert ok([0.25, 0.75], "[10, 20, 30, 40]", "PieChart")[0] is False
    # NaN equals NaN, wherever it sorts; text never equals a number.
    assert ok([[1.0, math.nan]], [[math.nan, 1.0]], "LineChart") == (True, None)
    assert ok([[1.0, math.nan]], [[2.0, 1.0]], "LineChart")[0] is False
    assert ok([["1.0", 2.0]], "[[1.0, 2.0]]", "LineChart")[0] is False
    # References that are not literals (the 'masked' ones, ids 566/591) can never pass.
    passed, why = ok([1.0], "[[masked, 1.0]]", "LineChart")
    assert passed is False and "not a Python literal" in why
    assert chart_code.to_value(np.float32(0.1)) == 0.1  # shortest repr, as print+literal_eval did
    assert chart_code.to_value(np.int64(3)) == 3.0 and chart_code.to_value("x") == "x"
    assert math.isnan(chart_code.to_value(np.ma.masked))


def test_xlsx_problem(tmp_path: Path, xlsx: str) -> None:
    stub = tmp_path / "stub.xlsx"
    stub.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    assert "LFS" in xlsx_problem(str(stub))
    assert "not readable" in xlsx_problem(str(tmp_path / "absent.xlsx"))
    assert xlsx_problem(xlsx) is None


# ---- executed programs ---------------------------------------------------------------------
def test_each_chart_type(xlsx: str, tmp_path: Path) -> None:
    cases = [
        ("LineChart", "plt.plot(df['Year'], df['Sales'])\nplt.plot(df['Year'], df['Share'])",
         "[[10.0, 12.5, 11.25, 14.0], [10, 20, 30, 40]]", [[10.0, 12.5, 11.25, 14.0], [10.0, 20.0, 30.0, 40.0]]),
        ("BarChart", "plt.bar(df['Label'], df['Sales'])", "[10, 12.5, 11.25, 14]", [10.0, 12.5, 11.25, 14.0]),
        ("ScatterChart", "plt.scatter(df['Year'], df['Sales'])\nplt.scatter(df['Year'], df['Share'])",
         "[[10.0, 12.5, 11.25, 14.0], [10, 20, 30, 40]]", [[10.0, 12.5, 11.25, 14.0], [10.0, 20.0, 30.0, 40.0]]),
        ("PieChart", "plt.pie(df['Share'], labels=df['Label'], autopct='%1.1f%%')", "[10, 20, 30, 40]",
         [0.1, 0.2, 0.3, 0.4]),
    ]
    for chart_type, body, reference, series in cases:
        res = score_chart(program(body), chart_type, reference, xlsx, timeout=15, artifacts_dir=str(tmp_path),
                          artifact_name=chart_type)
        assert (res["ECR"], res["Pass"], res["error"]) == (True, True, None), res
        assert res["series"] == series
        assert (tmp_path / f"{chart_type}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        saved = json.loads((tmp_path / f"{chart_type}.json").read_text())
        assert saved["series"] == series and saved["ECR"] is True


def test_nan_text_and_wrong_charts(xlsx: str) -> None:
    res = score_chart(program("plt.plot(df['Year'], df['Costs'])"), "LineChart", "[[7, 8, 9, 1]]", xlsx)
    assert res["ECR"] and not res["Pass"]
    assert math.isnan(res["series"][0][2]) and res["series"][0][:2] == [7.0, 8.0]
    assert chart_code.chart_pass(res["series"], [[7, 8, float("nan"), 9]], "LineChart") == (True, None)
    res = score_chart(program("plt.plot(df['Year'], df['Label'])"), "LineChart", "[[1, 2, 3, 4]]", xlsx)
    assert res["ECR"] and not res["Pass"] and res["series"] == [["a", "b", "c", "d"]]
    # A wrong chart: it runs (ECR) but draws the wrong values (no Pass).
    res = score_chart(program("plt.bar(df['Label'], df['Share'])"), "BarChart", "[10, 12.5, 11.25, 14]", xlsx)
    assert (res["ECR"], res["Pass"]) == (True, False)
    # The wrong kind of chart for the question: a line chart has no bar patches.
    res = score_chart(program("plt.plot(df['Sales'])"), "BarChart", "[10, 12.5, 11.25, 14]", xlsx)
    assert (res["ECR"], res["Pass"], res["series"]) == (True, False, [])


def test_indented_and_prose_wrapped_code(xlsx: str) -> None:
    indented = "\n".join(" " + line for line in program("plt.bar(df['Label'], df['Sales'])").splitlines())
    wrapped = ("Sure! Here is the chart.\n```python\n" + indented + "\n```\nThe bars compare sales.\n"
               "[Final Answer]: done")
    res = score_chart(wrapped, "BarChart Generation", "[10, 12.5, 11.25, 14]", xlsx)
    assert (res["ECR"], res["Pass"]) == (True, True)
    # Stripping every line breaks an indented block, as in the reference harness.
    res = score_chart(program("for c in ['Sales']:\n    plt.bar(df['Label'], df[c])"), "BarChart", "[1]", xlsx)
    assert res["ECR"] is False and "IndentationError" in res["error"]


def test_no_code_and_missing_table(xlsx: str, tmp_path: Path) -> None:
    res = score_chart("I cannot draw charts.", "BarChart", "[1]", xlsx)
    assert (res["ECR"], res["Pass"], res["missing_input"]) == (False, False, False)
    stub = tmp_path / "stub.xlsx"
    stub.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    res = score_chart(program("plt.bar([1], [1])"), "BarChart", "[1]", str(stub))
    assert res["missing_input"] is True and res["ECR"] is False and "LFS" in res["error"]


def test_scoping_default_vs_compat(xlsx: str) -> None:
    body = "cols = ['Sales']\nvals = [df[c].sum() for c in cols if c in df.columns]\nplt.bar(cols, vals)"
    res = score_chart(program(body), "BarChart", "[47.75]", xlsx)
    assert (res["ECR"], res["Pass"]) == (True, True)
    res = score_chart(program(body), "BarChart", "[47.75]", xlsx, compat=True)
    assert res["ECR"] is False and "NameError" in res["error"]


def _hostile_cases(marker: str) -> list[tuple[str, str, str]]:
    escape = [str(REPO / f"hb_escape_{marker}"), f"/tmp/xyz_{marker}", f"/root/xyz_{marker}"]
    return [
        ("deletes its working folder",
         "import os, shutil\nos.remove('table.xlsx')\nshutil.rmtree(os.getcwd(), ignore_errors=True)\n"
         "plt.bar([1], [1])", "ECR"),
        # Outside its folder nothing exists for the program (its own root), or may be written (Landlock).
        *[(f"writes {p}", f"open({p!r}, 'w').write('pwned')", "FileNotFoundError|PermissionError") for p in escape],
        ("spins forever", "while True: pass", "timeout"),
        ("allocates 50 GB", "x = bytearray(50 * 2**30)", "MemoryError"),
        ("fork bomb", "import os\nwhile True: os.fork()", "BlockingIOError"),
        ("sys.exit(3)", "import sys\nsys.exit(3)", "SystemExit: 3"),
        ("os._exit", "import os\nos._exit(0)", "before reporting"),
        ("kills its parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "PermissionError"),
        ("opens a socket", "import socket\nsocket.create_connection(('127.0.0.1', 9))", "PermissionError"),
    ]


def test_hostile_programs_are_contained(xlsx: str) -> None:
    marker = uuid.uuid4().hex[:8]
    before = Path(xlsx).read_bytes()
    info = sandbox_info()["sandbox"]
    for name, body, expect in _hostile_cases(marker):
        started = time.monotonic()
        res = score_chart(program(body), "BarChart", "[1]", xlsx, timeout=2)
        took = time.monotonic() - started
        if expect == "ECR":
            assert res["ECR"] is True, (name, res)
        else:
            assert res["ECR"] is False and any(e in (res["error"] or "") for e in expect.split("|")), (name, res)
        assert not res["infra_error"], (name, res)
        assert took < 10, (name, took)
    assert not (REPO / f"hb_escape_{marker}").exists()
    assert not os.path.exists(f"/root/xyz_{marker}")  # (os.path: an ordinary user may not stat /root)
    if info["landlock_abi"]:
        assert not Path(f"/tmp/xyz_{marker}").exists()  # world-writable: only Landlock stops this one
    assert Path(xlsx).read_bytes() == before  # the program only ever saw a copy
    res = score_chart(program("plt.bar(df['Label'], df['Sales'])"), "BarChart", "[10, 12.5, 11.25, 14]", xlsx)
    assert (res["ECR"], res["Pass"]) == (True, True)  # and the next program scores normally


def test_server_restarts_transparently_and_uid_sandbox(xlsx: str) -> None:
    runner = ChartRunner(max_children=2, sandbox="uid")
    try:
        body = "import os\nplt.bar(['uid'], [os.getuid()])"
        res = score_chart(program(body), "BarChart", "[0]", xlsx, runner=runner)
        assert res["ECR"] is True
        if os.geteuid() == 0:  # as root the program must not run as root
            assert res["series"][0] != 0.0
            res = score_chart(program("import os\nwhile True: os.fork()"), "BarChart", "[1]", xlsx, runner=runner)
            assert res["ECR"] is False and "BlockingIOError" in res["error"]
        os.kill(runner._proc.pid, 9)
        runner._proc.wait()
        res = score_chart(program("plt.bar(df['Label'], df['Sales'])"), "BarChart", "[10, 12.5, 11.25, 14]",
                          xlsx, runner=runner)
        assert (res["ECR"], res["Pass"]) == (True, True)
    finally:
        runner.close()


def test_throughput(xlsx: str) -> None:
    score_chart(program("plt.bar([1], [1])"), "BarChart", "[1]", xlsx)  # warm (server already started)
    bodies = [f"plt.bar(df['Label'], df['Sales'] * {i})" for i in range(20)]
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: score_chart(program(b), "BarChart", "[1]", xlsx), bodies))
    rate = len(bodies) / (time.monotonic() - started)
    print(f"\nchart throughput: {rate:.1f} programs/s")
    assert all(r["ECR"] for r in results)
    assert rate >= 3.0


# ---- real data -----------------------------------------------------------------------------
def _realhitbench() -> Path:
    shared = Path(os.environ.get("HITBENCH_SHARED") or REPO.parent / "shared")
    tool = shared / "bin" / "realhitbench"
    if not tool.exists() or not (shared / "data" / "realhitbench.tar.xz").is_file():
        pytest.skip(f"RealHiTBench shared files not found at {shared} (set HITBENCH_SHARED to the shared folder)")
    return Path(subprocess.run([str(tool)], check=True, capture_output=True, text=True).stdout.strip())


# Our own programs for real questions; flat (the scorer strips indentation), read the xlsx, look the
# rows up by their labels.
REAL_PROGRAMS = {
    17: "t = pd.read_excel('table.xlsx', header=None)\nrow = t[t[0] == 1984].iloc[0]\n"
        "plt.pie([row[6], row[7]], labels=['Agriculture', 'Nonagricultural'], autopct='%1.1f%%')",
    35: "t = pd.read_excel('table.xlsx', header=None)\n"
        "row = t[t[0].astype(str).str.startswith('Civilian noninstitutional')].iloc[0]\n"
        "plt.plot(['2022', '2023'], [row[1], row[2]], marker='o')",
    55: "t = pd.read_excel('table.xlsx', header=None).iloc[4:]\n"
        "t = t[pd.to_numeric(t[6], errors='coerce').notna()]\n"
        "plt.scatter(t[10].astype(float), t[6].astype(float))\nplt.xlabel('Women 2023')\nplt.ylabel('Men 2023')",
    71: "t = pd.read_excel('table.xlsx', header=None)\nrows = t[t[0].isin(['Men', 'Women'])]\n"
        "years = [1, 2]\nvals = [r[c] for _, r in rows.iterrows() for c in years]\n"
        "plt.bar(['Men 2022', 'Men 2023', 'Women 2022', 'Women 2023'], vals)",
    1875: "t = pd.read_excel('table.xlsx', header=None)\nt[0] = t[0].ffill()\n"
          "q = t[(t[0] == 2021) & t[1].astype(str).str.startswith('Q')]\n"
          "plt.pie(q[11].astype(float), labels=q[1], autopct='%1.1f%%')",
}


@pytest.mark.shared
def test_reference_programs_pass_on_real_questions(tmp_path: Path) -> None:
    data = _realhitbench()
    queries = {q["id"]: q for q in json.loads((data / "QA_final.json").read_text())["queries"]}
    kinds = set()
    for qid, body in REAL_PROGRAMS.items():
        q = queries[qid]
        assert q["QuestionType"] == "Visualization"
        xlsx = data / "tables" / f"{q['FileName']}.xlsx"
        assert xlsx_problem(str(xlsx)) is None
        res = score_chart(program(body), q["SubQType"], q["ProcessedAnswer"], str(xlsx), artifacts_dir=str(tmp_path),
                          artifact_name=str(qid))
        assert (res["ECR"], res["Pass"]) == (True, True), (qid, res["error"], res["series"], q["ProcessedAnswer"])
        kinds.add(chart_code.chart_type_of(q["SubQType"]))
    assert kinds == set(chart_code.CHART_TYPES)
    # id 71's comprehension reads the program's own `years` in its inner loop, which the reference
    # harness's scoping (chart_compat) could not see: a spurious NameError there.
    q = queries[71]
    res = score_chart(program(REAL_PROGRAMS[71]), q["SubQType"], q["ProcessedAnswer"],
                      str(data / "tables" / f"{q['FileName']}.xlsx"), compat=True)
    assert res["ECR"] is False and "NameError" in res["error"]


@pytest.mark.shared
def test_lfs_stub_is_missing_input() -> None:
    data = _realhitbench()
    queries = {q["id"]: q for q in json.loads((data / "QA_final.json").read_text())["queries"]}
    q = queries[2020]  # agriculture-table06.xlsx is a Git LFS pointer stub in this copy
    xlsx = data / "tables" / f"{q['FileName']}.xlsx"
    assert xlsx.read_bytes().startswith(b"version https://git-lfs.github.com/spec/v1")
    record = {"id": 2020, "question_type": q["QuestionType"], "sub_qtype": q["SubQType"], "status": "ok",
              "file_name": q["FileName"], "prediction": program("plt.bar([1], [1])"),
              "reference": q["ProcessedAnswer"]}
    out = score_record(record, xlsx_path=str(xlsx))
    assert out["score_status"] == "missing_input" and "LFS" in out["score_error"]
