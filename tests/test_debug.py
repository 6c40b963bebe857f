"""Debugging a run: listing its error and degraded ids, re-running one id, committing only on request.

The demo run is text/csv with the tiny model and injected errors; each test works on its own copy.
"""
import dataclasses
import json
import shutil
from pathlib import Path

import papermill as pm
import pytest

from hitbench_utils import debug
from hitbench_utils.config import RunConfig
from hitbench_utils.faults import FaultyBackend
from hitbench_utils.run import Job
from hitbench_utils.runlog import attempts, read_log, view
from hitbench_utils.status import summarize

NB = Path(__file__).resolve().parents[1] / "notebooks" / "debug_errors.ipynb"
FAULTS = {2: "oom", 5: "exception"}
# FaultyBackend wraps generate(); the shared-prefix engine drives the model directly, so it is turned off here.
NO_PREFIX = {"share_prefix": False} if "share_prefix" in {f.name for f in dataclasses.fields(RunConfig)} else {}


@pytest.fixture(scope="module")
def errored_run(tmp_path_factory, tiny_backend, sample_data):
    run_dir = tmp_path_factory.mktemp("debug") / "tiny_text_csv"
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(run_dir), format="csv", limit=6, max_reasks=0,
                    max_new_tokens=4, max_input_tokens=520, token_budget=100_000, dtype="float32", device="cpu",
                    **NO_PREFIX)
    Job(cfg, backend=FaultyBackend(tiny_backend, FAULTS), progress=False).execute()
    return run_dir


@pytest.fixture
def run(errored_run, tmp_path):
    return Path(shutil.copytree(errored_run, tmp_path / errored_run.name))


def snapshot(run_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "run.log"}


def test_problems_lists_the_error_and_degraded_ids_from_the_log(run):
    records = read_log(run).records
    latest, tries = view(records), attempts(records)
    found = debug.problems(run)
    want = {i for i, r in latest.items() if r["status"] != "ok" or r["degraded"]}
    assert set(found["id"]) == want and {2, 5} <= want
    assert list(found["status"][:2]) == ["oom", "exception"]        # errors first
    for _, row in found.iterrows():
        r = latest[row["id"]]
        assert row["status"] == r["status"] and row["attempts"] == tries[row["id"]]
        assert row["input_tokens_original"] == r["input_tokens_original"] and row["truncated"] == r["truncated"]
        if r["status"] != "ok":
            assert row["error"] == r["error"] and "Traceback" in row["traceback"]
    assert "out of memory" in found.set_index("id").loc[2, "error"]


def test_rerun_without_commit_changes_nothing(run, tiny_backend):
    before = snapshot(run)
    res = debug.rerun(run, 2, overrides={"max_input_tokens": 5000, "max_pixels": 10**6, "batch_size": None},
                      backend=tiny_backend)
    assert snapshot(run) == before
    assert res.record["status"] == "ok" and res.previous["status"] == "oom" and not res.committed
    assert res.record["truncated"] is False and res.record["input_tokens_sent"] == res.record["input_tokens_original"]
    assert "max_input_tokens" in res.fingerprint_diff and res.overrides["max_input_tokens"] == 5000
    if not hasattr(RunConfig(), "max_pixels"):
        assert any("max_pixels" in n for n in res.notes)
    assert res.seconds > 0 and res.peak_memory_bytes >= 0 and res.memory_kind.startswith("CPU")
    assert "not written to the run" in res.summary()
    table = res.table()
    assert table.loc["status", "before"] == "oom" and table.loc["status", "re-run"] == "ok"


def test_commit_is_refused_when_overrides_change_the_fingerprint(run, tiny_backend):
    before = snapshot(run)
    with pytest.raises(debug.CommitRefused, match="max_input_tokens"):
        debug.rerun(run, 2, overrides={"max_input_tokens": 5000}, commit=True, backend=tiny_backend)
    with pytest.raises(debug.CommitRefused, match="max_new_tokens"):
        debug.rerun(run, 2, overrides={"max_new_tokens": 8}, commit=True, backend=tiny_backend)
    assert snapshot(run) == before


def test_commit_appends_the_next_attempt_through_the_log(run, tiny_backend):
    n_before = len(read_log(run).records)
    ok_before = summarize(run)["ok"]
    res = debug.rerun(run, 5, overrides={"batch_size": 1}, commit=True, backend=tiny_backend)
    records = read_log(run).records
    assert len(records) == n_before + 1 and res.committed
    new = records[-1]
    assert new["id"] == 5 and new["attempt"] == 2 and new["status"] == "ok"
    assert new["debug_overrides"] == {"batch_size": 1} and new == res.record
    s = summarize(run)
    assert s["ok"] == ok_before + 1 and 5 not in s["error_ids"].get("exception", [])
    assert json.loads((run / "results.json").read_text())["summary"]["ok"] == ok_before + 1


def test_bad_requests_are_refused(run, tiny_backend):
    with pytest.raises(ValueError, match="no record"):
        debug.rerun(run, 999, backend=tiny_backend)
    with pytest.raises(ValueError, match="not allowed"):
        debug.rerun(run, 2, overrides={"temperature": 0.7}, backend=tiny_backend)


@pytest.mark.slow
def test_debug_notebook_under_papermill_commits_one_new_attempt(run, tmp_path):
    n_before = len(read_log(run).records)
    pm.execute_notebook(str(NB), str(tmp_path / "debug.ipynb"), progress_bar=False,
                        parameters=dict(run_dir=str(run), id=2, batch_size=1, commit=True))
    records = read_log(run).records
    assert len(records) == n_before + 1
    new = records[-1]
    assert (new["id"], new["attempt"], new["status"], new["debug_overrides"]) == (2, 2, "ok", {"batch_size": 1})
    assert summarize(run)["errors"] == {"exception": 1}
