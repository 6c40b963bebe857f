"""Inputs that cannot pass for data (issue 14 §3), and the judge/paper-table fields (§4).

Escaping FileNames, non-UTF-8 tables, damaged run files, float/bool ids and unknown QuestionTypes each give
an error record or a clear error naming the file (and line or byte offset); the rest of the run is kept.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hitbench_utils import data as D
from hitbench_utils.config import RunConfig
from hitbench_utils.errors import ConfigError, DataError, RunLogError
from hitbench_utils.run import Job
from hitbench_utils.runlog import LOG_NAME, read_log, view
from hitbench_utils.scoring import aggregate
from hitbench_utils.scoring.judge_table import JudgeTables, cut_for_judge
from hitbench_utils.status import summarize

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data(tmp_path, sample_data) -> Path:
    return Path(shutil.copytree(sample_data, tmp_path / "data"))


def _edit_qa(data: Path, fn) -> None:
    qa = data / "QA_final.json"
    blob = json.loads(qa.read_text())
    fn(blob["queries"])
    qa.write_text(json.dumps(blob))


def _run(data: Path, run_dir: Path, backend, **kw) -> dict:
    base = dict(data_path=str(data), run_dir=str(run_dir), format="csv", max_new_tokens=4, max_reasks=0,
                dtype="float32", device="cpu", score=False, max_attempts=1)
    base.update(kw)
    return Job(RunConfig(**base), backend=backend, progress=False).execute()


def _status_cli(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hitbench_utils", "status", str(run_dir)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


# ---- paths ------------------------------------------------------------------------------------------
def test_filenames_outside_data_path_are_missing_input_and_never_opened(data, tmp_path, tiny_backend):
    secret = tmp_path / "secret.csv"
    secret.write_text("answer,42\n")
    (data / "csv" / "link.csv").symlink_to(secret)
    names = {1: "../../secret", 2: str(tmp_path / "secret"), 3: "link"}
    _edit_qa(data, lambda qs: [q.update(FileName=names[q["id"]]) for q in qs if q["id"] in names])
    s = _run(data, tmp_path / "run", tiny_backend, ids=[1, 2, 3, 4])
    recs = view(read_log(tmp_path / "run").records)
    for i, name in names.items():
        r = recs[i]
        assert r["status"] == "missing_input", r
        assert "outside its folder" in r["error"] and repr(name) in r["error"] and "was not opened" in r["error"]
        assert r["response"] is None and r["input_tokens_sent"] is None
    assert recs[4]["status"] == "ok" and s["errors"] == {"missing_input": 3}


# ---- encodings ----------------------------------------------------------------------------------------
def test_non_utf8_table_is_an_error_record_naming_file_and_offset(data, tmp_path, tiny_backend):
    path = data / "csv" / "sales-sample01.csv"            # ids 1-5
    text = path.read_text(encoding="utf-8")
    path.write_bytes(text.replace("Region", "R\u00e9gion", 1).encode("latin-1"))
    offset = text.encode("utf-8").index(b"Region") + 1
    _run(data, tmp_path / "run", tiny_backend, ids=[1, 6])
    recs = view(read_log(tmp_path / "run").records)
    r = recs[1]
    assert r["status"] == "missing_input" and r["error"].startswith("InputDecodeError: ")
    assert str(path) in r["error"] and f"byte offset {offset}" in r["error"] and "table_encoding" in r["error"]
    assert recs[6]["status"] == "ok"
    # opt-in: the known encoding decodes it, and the record says so
    _run(data, tmp_path / "run2", tiny_backend, ids=[1], table_encoding="latin-1")
    r = view(read_log(tmp_path / "run2").records)[1]
    assert r["status"] == "ok" and any(d["kind"] == "table_encoding" and "decoded as iso8859-1" in d["detail"]
                                       for d in r["degraded"])
    with pytest.raises(ConfigError, match="table_encoding='klingon'"):
        RunConfig(table_encoding="klingon").validate()


def test_real_gbk_latex_tables_need_table_encoding(real_data):
    bad = []
    for fmt, ext in D.FORMAT_EXT.items():
        for p in sorted((real_data / fmt).glob(f"*.{ext}")):
            try:
                p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                bad.append(p)
                p.read_bytes().decode("gb18030")                     # all of them are GB18030
    assert len(bad) == 13 and {p.parent.name for p in bad} == {"latex"}     # the README's count
    with pytest.raises(D.MissingInputError, match=r"labor-table54.txt is not valid UTF-8 at byte offset 277"):
        D.read_table(real_data, "latex", "labor-table54")
    notes: list[str] = []
    text = D.read_table(real_data, "latex", "labor-table54", "gb18030", notes)
    assert "1979\u20132016" in text and notes and "gb18030" in notes[0]


def test_non_utf8_qa_file_names_file_and_line(data, tmp_path):
    qa = data / "QA_final.json"
    raw = qa.read_bytes()
    at = raw.index(b"\n", 100) + 1
    qa.write_bytes(raw[:at] + b"\xff" + raw[at:])
    with pytest.raises(DataError) as e:
        D.load_queries(qa)
    line = raw[:at].count(b"\n") + 1
    assert str(qa) in str(e.value) and f"line {line}" in str(e.value) and f"byte offset {at}" in str(e.value)


# ---- damaged run files ----------------------------------------------------------------------------------
def test_corrupt_plan_is_a_clear_error_in_status_and_on_resume(data, tmp_path, tiny_backend):
    _run(data, tmp_path / "run", tiny_backend, ids=[1])
    plan = tmp_path / "run" / "plan.json"
    plan.write_text('{"ids": [1,\n "max_attempts": 3')
    out = _status_cli(tmp_path / "run")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out
    assert str(plan) in out.stderr and "not valid JSON (line 2" in out.stderr and "Fix: delete" in out.stderr
    with pytest.raises(RunLogError, match=r"plan.json is not valid JSON \(line 2"):
        _run(data, tmp_path / "run", tiny_backend, ids=[1, 2])
    plan.write_text('{"ids": ["one"], "max_attempts": 3}')
    with pytest.raises(RunLogError, match="is not a plan"):
        summarize(tmp_path / "run")


def test_log_record_with_a_wrong_field_type_is_named_by_line_and_skipped(data, tmp_path, tiny_backend):
    _run(data, tmp_path / "run", tiny_backend, ids=[1, 2])
    log = tmp_path / "run" / LOG_NAME
    lines = log.read_text().splitlines()
    rec = json.loads(lines[2])
    rec["attempt"] = "two"
    lines[2] = json.dumps(rec)
    log.write_text("\n".join(lines) + "\n")
    out = _status_cli(tmp_path / "run")
    assert "Traceback" not in out.stderr and "line 3 skipped" in out.stdout, out
    assert "field 'attempt' is 'two' (str); a record needs int" in out.stdout
    s = _run(data, tmp_path / "run", tiny_backend, ids=[1, 2])      # resume: the damaged id runs again
    assert s["ok"] == 2 and s["bad_lines"] and s["bad_lines"][0][0] == 3
    assert len(log.read_text().splitlines()) == 4                   # nothing lost: the bad line stays


# ---- ids and unknown values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [3.0, True, 2.5])
def test_float_and_bool_ids_are_refused_by_name(data, bad):
    _edit_qa(data, lambda qs: qs[2].update(id=bad))
    with pytest.raises(DataError) as e:
        D.load_queries(data / "QA_final.json")
    assert f"id={bad!r}" in str(e.value) and type(bad).__name__ in str(e.value)
    with pytest.raises(ConfigError, match="float or boolean id"):
        D.parse_ids([1, bad])
    with pytest.raises(ConfigError, match="float or boolean id"):
        D.parse_ids(json.dumps([bad]))


def test_unknown_question_type_warns_gets_default_prompt_and_is_kept_apart(data, tmp_path, tiny_backend, caplog):
    _edit_qa(data, lambda qs: qs[0].update(QuestionType="Table Trivia"))
    with caplog.at_level("WARNING", logger="hitbench"):
        qs = D.load_queries(data / "QA_final.json")
    assert [m for m in caplog.messages if "unknown QuestionType 'Table Trivia'" in m and "ids 1" in m]
    from hitbench_utils.prompts import build_prompt, load_templates

    t = load_templates()
    default = t.data["instruction"]["default"]                   # the default wording, for an unknown type
    assert build_prompt(t, qs[0], "text", "csv", "x").messages()[-1]["content"][-1]["text"].count(default) == 1
    _run(data, tmp_path / "run", tiny_backend, ids=[1, 2], score=True)
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    agg = res["aggregates"]
    assert "Table Trivia" not in agg["by_type"] and agg["unknown_question_types"]["Table Trivia"]["n"] == 1
    assert sum(v["n"] for v in agg["by_type"].values()) == 1 and agg["n"] == 2


# ---- the judge's table and the paper-table keys -------------------------------------------------------------
def test_judge_table_is_cut_to_its_budget_at_row_boundaries(sample_data):
    table = D.read_table(sample_data, "html", "sales-sample01")
    whole, info = cut_for_judge(table, "html", 10**6)
    assert whole == table and not info["truncated"]
    cut, info = cut_for_judge(table, "html", 200)
    assert info["truncated"] and info["rows_dropped"] > 0 and info["tokens"] <= 200
    assert "rows omitted" in cut and cut.rstrip().endswith("</table>") or "</table>" in cut
    tables = JudgeTables(sample_data, "html", 200)
    text, detail = tables({"file_name": "sales-sample01"})
    assert text == cut and detail["judge_table"]["budget"] == 200 and detail["judge_table"]["file"] == "html/sales-sample01"
    none, detail = JudgeTables(sample_data, "html", 0)({"file_name": "sales-sample01"})
    assert none is None and detail == {"judge_table": None}


def test_judge_table_cut_is_token_exact_with_a_tokenizer(real_data, qwen_tokenizer):
    from hitbench_utils.truncation import count_tokens

    table = D.read_table(real_data, "html", "economy-table14_swap")
    text, info = cut_for_judge(table, "html", 16_000, qwen_tokenizer)
    assert info["truncated"] and info["tokens_original"] > 16_000 and info["counted"] == "tokenizer"
    assert count_tokens(qwen_tokenizer, text) == info["tokens"] <= 16_000 and "rows omitted" in text


def test_judge_prompt_includes_the_table(sample_data):
    from hitbench_utils.scoring import Judge, score_record

    seen = []

    class Probe(Judge):
        def _complete(self, messages):
            seen.append(messages[-1]["content"])
            return "fine\n[Score]: 80/100"

    judge = Probe("http://127.0.0.1:9", "probe", api_key_env=None, tables=JudgeTables(sample_data, "csv", 5000))
    rec = {"id": 1, "status": "ok", "question_type": "Data Analysis", "sub_qtype": "Summary Analysis",
           "file_name": "sales-sample01", "question": "Summarise", "prediction": "up", "reference": "up"}
    out = score_record(rec, xlsx_path=None, judge=judge)
    assert out["scores"] == {"judge": 80.0} and out["score_detail"]["judge_table"]["truncated"] is False
    assert "Table:\n" in seen[0] and D.read_table(sample_data, "csv", "sales-sample01").strip() in seen[0]
    assert judge.describe()["table"]["max_tokens"] == 5000


def test_results_carry_run_key_and_paper_cells(data, tmp_path, tiny_backend):
    _run(data, tmp_path / "runA", tiny_backend, ids=[1, 2], score=True)
    _run(data, tmp_path / "runB", tiny_backend, limit=3, question_type="Fact Checking", score=True)
    a = json.loads((tmp_path / "runA" / "results.json").read_text())
    b = json.loads((tmp_path / "runB" / "results.json").read_text())
    assert a["run_key"]["run"] == "runA" and a["run_key"]["qa_file"] == "QA_final.json"
    assert a["run_key"]["subset"] == {"ids": [1, 2]}
    assert b["run_key"]["subset"] == {"limit": 3, "question_type": "Fact Checking"}
    assert a["run_key"]["label"] != b["run_key"]["label"] and "limit=3" in b["run_key"]["label"]
    cells = a["aggregates"]["paper"]
    assert "DA GPT" in cells and cells["DA GPT"] is None and cells["FC F1"] == a["aggregates"]["by_type"]["Fact Checking"]["F1"]
    agg = aggregate([{"question_type": "Data Analysis", "sub_qtype": "Summary Analysis", "status": "ok",
                      "score_status": "scored", "scores": {"judge": 70.0}}])
    from hitbench_utils.scoring.aggregates import paper_cells

    assert paper_cells(agg)["DA GPT"] == 70.0
