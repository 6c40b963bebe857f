"""Scoring inside runs, and rescore reproducing the stored scores (sample dataset, CPU)."""
import json

from hitbench_utils.__main__ import main
from hitbench_utils.config import RunConfig
from hitbench_utils.data import load_queries
from hitbench_utils.rescore import rescore_run
from hitbench_utils.faults import OracleBackend
from hitbench_utils.run import Job
from hitbench_utils.runlog import read_log, view


def test_oracle_run_scores_full_marks_and_rescore_reproduces(tmp_path, tiny_backend, sample_data, capsys):
    queries = load_queries(sample_data / "QA_final.json")
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), format="csv", device="cpu")
    s = Job(cfg, backend=OracleBackend(tiny_backend, queries), progress=False).execute()
    assert s["verdict"] == "complete"
    recs = view(read_log(tmp_path / "run").records)
    for r in recs.values():
        if r["question_type"] == "Visualization":
            assert r["scores"] == {"ECR": True, "Pass": True}, (r["id"], r.get("score_detail"))
        elif r["sub_qtype"] in ("Summary Analysis", "Anomaly Analysis"):
            assert r["score_status"] == "unscored"
        else:
            assert r["score_status"] == "scored" and r["scores"]["EM"] == 100.0, r
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["aggregates"]["by_type"]["Fact Checking"]["EM"] == 100.0
    assert res["scoring"]["chart_mode"] == "default"
    before = (tmp_path / "run" / "samples.jsonl").read_bytes()
    report = rescore_run(tmp_path / "run")
    assert report["changed"] == 0 and report["records"] == len(recs)
    assert (tmp_path / "run" / "samples.jsonl").read_bytes() == before
    assert main(["rescore", str(tmp_path / "run"), "--dry-run"]) == 0
    assert "0 changed" in capsys.readouterr().out


def test_rescore_updates_changed_scores_without_inflating_attempts(tmp_path, tiny_backend, sample_data):
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), limit=6, max_reasks=0,
                    device="cpu", score=False)
    Job(cfg, backend=tiny_backend, progress=False).execute()
    assert all(r["score_status"] is None for r in read_log(tmp_path / "run").records)
    report = rescore_run(tmp_path / "run")
    assert report["changed"] == 6
    recs = read_log(tmp_path / "run").records
    assert len(recs) == 12 and all(r["attempt"] == 1 for r in recs)
    assert all(r["score_status"] in ("scored", "unscored") for r in view(recs).values())
    assert rescore_run(tmp_path / "run")["changed"] == 0
