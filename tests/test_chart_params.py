"""The chart parameters of a run: chart_compat scores in-run charts (not only rescore), and
``rescore --dry-run`` writes nothing at all (sample dataset, oracle answers, CPU)."""
from __future__ import annotations

import json
from pathlib import Path

from hitbench_utils.__main__ import main
from hitbench_utils.config import RunConfig
from hitbench_utils.data import load_queries
from hitbench_utils.faults import OracleBackend
from hitbench_utils.run import Job
from hitbench_utils.runlog import read_log, view

CHARTS = "[4, 11, 20, 28]"  # the sample dataset's Visualization questions, plus two QA ones
IDS = "[1, 4, 11, 20, 28, 2]"


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_chart_compat_is_honoured_in_run(tmp_path: Path, tiny_backend, sample_data: Path) -> None:
    queries = load_queries(sample_data / "QA_final.json")
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), format="csv", device="cpu",
                    ids=IDS, chart_compat=True)
    assert Job(cfg, backend=OracleBackend(tiny_backend, queries), progress=False).execute()["verdict"] == "complete"
    charts = [r for r in view(read_log(tmp_path / "run").records).values() if r["question_type"] == "Visualization"]
    assert len(charts) == 4
    assert all(r["score_detail"]["chart_compat"] is True for r in charts), [r["score_detail"] for r in charts]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["scoring"]["chart_mode"] == "chart_compat"


def test_rescore_dry_run_writes_nothing(tmp_path: Path, tiny_backend, sample_data: Path, capsys) -> None:
    queries = load_queries(sample_data / "QA_final.json")
    run = tmp_path / "run"
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(run), format="csv", device="cpu", ids=IDS, score=False)
    Job(cfg, backend=OracleBackend(tiny_backend, queries), progress=False).execute()
    before = _snapshot(run)
    assert main(["rescore", str(run), "--dry-run"]) == 0
    assert "6 changed" in capsys.readouterr().out  # a real rescore would write all six...
    assert _snapshot(run) == before  # ...the dry run changed no byte, no mtime, and added no file
    assert not (run / "charts").exists()
    assert main(["rescore", str(run)]) == 0  # and the real one does write (the test can fail)
    assert _snapshot(run) != before and (run / "charts").is_dir()
