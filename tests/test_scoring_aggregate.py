"""Aggregation rules (DESIGN.md §8.7, §8.9), the paper table, and record-level scoring end to end."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hitbench_utils.scoring import aggregate, paper_table, rescore_records, score_record

QA = ("F1", "EM", "ROUGE-L", "SacreBLEU")


def rec(qtype: str, sub: str, status: str = "ok", score_status: str | None = "scored", **scores: float) -> dict:
    return {"question_type": qtype, "sub_qtype": sub, "status": status,
            "score_status": score_status if status == "ok" else "not_run", "scores": scores}


def qa(f1: float, em: float, rl: float, bleu: float) -> dict:
    return {"F1": f1, "EM": em, "ROUGE-L": rl, "SacreBLEU": bleu}


RECORDS = [
    rec("Fact Checking", "Value-Matching", **qa(100, 100, 100, 100)),
    rec("Fact Checking", "", **qa(50, 0, 40, 10)),  # odd sub-type: still Fact Checking
    rec("Fact Checking", "Non-adverse, Adverse, Cancelled", status="oom"),  # error: 0 everywhere
    rec("Structure Comprehending", "Structure Comprehending", **qa(30, 0, 20, 5)),
    rec("Data Analysis", "Rudimentary Analysis", **qa(80, 100, 70, 60)),
    rec("Data Analysis", "Exploratory Analysis", **qa(40, 0, 50, 20)),
    rec("Data Analysis", "Predictive Analysis", status="timeout"),
    rec("Data Analysis", "Summary Analysis", score_status="unscored"),  # no judge: left out
    rec("Data Analysis", "Anomaly Analysis", judge=70.0),
    rec("Data Analysis", "Summary Analysis", status="exception"),  # 0 for the judge, not for F1
    rec("Visualization", "LineChart Generation", ECR=True, Pass=True),
    rec("Visualization", "BarChart Generation", ECR=True, Pass=False),
    rec("Visualization", "PieChart Generation", score_status="missing_input"),
    rec("Visualization", "ScatterChart Generation", status="oom"),
    rec("Visualization", "BarChart Generation", score_status="error"),
]


def test_aggregate_rules() -> None:
    agg = aggregate(RECORDS)
    assert agg["n"] == 15 and agg["errors"] == 4
    fc = agg["by_type"]["Fact Checking"]
    assert (fc["n"], fc["errors"], fc["scored"]) == (3, 1, 2)
    assert fc["F1"] == pytest.approx(50.0) and fc["EM"] == pytest.approx(100 / 3)
    assert fc["ROUGE-L"] == pytest.approx(140 / 3) and fc["SacreBLEU"] == pytest.approx(110 / 3)
    assert fc["error_statuses"] == {"oom": 1} and "ECR" not in fc
    da = agg["by_type"]["Data Analysis"]
    # F1/EM/ROUGE-L over Rudimentary, Exploratory, Predictive only (the Predictive error counts 0).
    assert da["F1"] == pytest.approx(40.0) and da["EM"] == pytest.approx(100 / 3)
    assert da["ROUGE-L"] == pytest.approx(40.0) and da["n_F1"] == 3
    assert da["judge"] == pytest.approx(35.0) and da["n_judge"] == 2  # 70 and the Summary error's 0
    assert (da["unscored"], da["errors"]) == (1, 2)
    vis = agg["by_type"]["Visualization"]
    assert vis["ECR"] == pytest.approx(40.0) and vis["Pass"] == pytest.approx(20.0)  # of ALL 5 queries
    assert (vis["missing_input"], vis["score_errors"], vis["errors"]) == (1, 1, 1)
    assert list(agg["by_type"]) == ["Fact Checking", "Structure Comprehending", "Data Analysis", "Visualization"]
    sub = agg["by_subtype"]["Data Analysis"]
    assert sub["Summary Analysis"]["unscored"] == 1 and sub["Summary Analysis"]["F1"] is None
    assert sub["Rudimentary Analysis"]["F1"] == 80.0
    assert agg["by_subtype"]["Fact Checking"][""]["F1"] == 50.0


def test_unscored_only_gives_no_value() -> None:
    agg = aggregate([rec("Data Analysis", "Summary Analysis", score_status="unscored")])
    da = agg["by_type"]["Data Analysis"]
    assert da["F1"] is None and da["judge"] is None and da["unscored"] == 1


def test_paper_table() -> None:
    agg = aggregate(RECORDS)
    rows = [{"modality": "text", "format": "html", "aggregates": agg},
            {"modality": "image", "format": None, "aggregates": aggregate(RECORDS[:3])}]
    md = paper_table(rows)
    lines = md.splitlines()
    assert lines[0] == ("| Modality | Format | FC F1 | FC EM | NR F1 | NR EM | SC F1 | SC EM | DA ROUGE-L | "
                        "DA F1 | DA EM | Vis ECR | Vis Pass |")
    assert lines[2] == "| text | html | 50.00 | 33.33 | – | – | 30.00 | 0.00 | 40.00 | 40.00 | 33.33 | 40.00 | 20.00 |"
    assert lines[3].startswith("| image | – | 50.00 | 33.33 | – |")
    tex = paper_table([dict(rows[0], model="qwen3_vl_8b")], fmt="latex")
    assert r"\multicolumn{2}{c}{Fact Checking}" in tex and r"\multicolumn{3}{c}{Data Analysis}" in tex
    assert r"qwen3\_vl\_8b & text & html & 50.00 & 33.33 & -- & -- & 30.00" in tex
    assert tex.startswith(r"\begin{tabular}{lll" + "r" * 11 + "}") and tex.rstrip().endswith(r"\end{tabular}")
    with pytest.raises(ValueError):
        paper_table(rows, fmt="html")


def test_score_record_kinds() -> None:
    base = {"id": 1, "status": "ok", "file_name": "x", "question": "q", "response": "r"}
    fc = score_record(dict(base, question_type="Fact Checking", sub_qtype="", prediction="Yes", reference="yes"),
                      xlsx_path=None)
    assert fc["score_status"] == "scored" and fc["scores"]["EM"] == 100.0 and fc["score_error"] is None
    odd = score_record(dict(base, question_type="Fact Checking", sub_qtype="Non-adverse, Adverse, Cancelled",
                            prediction="2016", reference="2016"), xlsx_path=None)
    assert odd["scores"]["F1"] == 100.0
    failed = score_record(dict(base, status="oom", question_type="Fact Checking", sub_qtype=""), xlsx_path=None)
    assert failed == {"scores": {}, "score_status": "not_run", "score_error": None}
    # A scoring failure never raises.
    broken = score_record({"id": 2, "status": "ok", "question_type": "Visualization", "sub_qtype": "BarChart",
                           "prediction": object()}, xlsx_path=None)
    assert broken["score_status"] in ("error", "scored")
    weird = score_record(dict(base, question_type="Visualization", sub_qtype="", prediction="no code",
                              reference="[1]"), xlsx_path=None)
    assert weird["score_status"] == "scored" and weird["scores"] == {"ECR": False, "Pass": False}


def test_rescore_records_end_to_end(tmp_path: Path) -> None:
    (tmp_path / "tables").mkdir()
    pd.DataFrame({"k": ["a", "b"], "v": [3, 5]}).to_excel(tmp_path / "tables" / "t1.xlsx", index=False)
    code = ("```python\nimport pandas as pd\nimport matplotlib.pyplot as plt\ndf = pd.read_excel('table.xlsx')\n"
            "plt.bar(df['k'], df['v'])\nplt.show()\n```")
    records = [
        {"id": 1, "question_type": "Fact Checking", "sub_qtype": "Value-Matching", "status": "ok",
         "file_name": "t1", "prediction": "the answer", "reference": "answer"},
        {"id": 2, "question_type": "Visualization", "sub_qtype": "BarChart Generation", "status": "ok",
         "file_name": "t1", "prediction": code, "reference": "[3, 5]", "scores": {"stale": 1}},
        {"id": 3, "question_type": "Visualization", "sub_qtype": "PieChart Generation", "status": "ok",
         "file_name": "t1", "prediction": code.replace("plt.bar(df['k'], ", "plt.pie("), "reference": "[3, 5]"},
        {"id": 4, "question_type": "Visualization", "sub_qtype": "LineChart Generation", "status": "ok",
         "file_name": "absent", "prediction": code, "reference": "[3, 5]"},
        {"id": 5, "question_type": "Numerical Reasoning", "sub_qtype": "Counting", "status": "truncation",
         "file_name": "t1"},
        {"id": 6, "question_type": "Data Analysis", "sub_qtype": "Summary Analysis", "status": "ok",
         "file_name": "t1", "prediction": "up", "reference": "up"},
    ]
    out = rescore_records(records, data_path=tmp_path, artifacts_dir=str(tmp_path / "charts"), workers=2)
    assert [r["id"] for r in out] == [1, 2, 3, 4, 5, 6]
    assert out[0]["scores"]["EM"] == 100.0
    assert out[1]["scores"] == {"ECR": True, "Pass": True} and (tmp_path / "charts" / "2.png").exists()
    assert out[2]["scores"] == {"ECR": True, "Pass": True}  # pie shares 0.38/0.62 of [3, 5]
    assert out[3]["score_status"] == "missing_input"
    assert out[4]["score_status"] == "not_run" and out[5]["score_status"] == "unscored"
    assert "stale" not in out[1]["scores"] and records[1]["scores"] == {"stale": 1}  # inputs untouched
    agg = aggregate(out)
    assert agg["by_type"]["Visualization"]["ECR"] == pytest.approx(200 / 3)
    assert agg["by_type"]["Numerical Reasoning"]["F1"] == 0.0 and agg["by_type"]["Numerical Reasoning"]["errors"] == 1


def test_scoring_provenance_and_lazy_package() -> None:
    import subprocess
    import sys

    from hitbench_utils.scoring import scoring_provenance

    info = scoring_provenance(chart_compat=True)
    assert info["chart_mode"] == "chart_compat" and info["judge"] is None
    assert {"pandas", "matplotlib", "numpy"} <= set(info["library_versions"])
    # Importing the package imports no metric or plotting library and starts nothing.
    code = ("import sys, hitbench_utils.scoring as s; heavy = [m for m in ('pandas', 'matplotlib', 'sacrebleu', "
            "'rouge_score') if m in sys.modules]; assert not heavy, heavy; print(len(s.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
