"""End to end through Job with the tiny model on the sample dataset (CPU)."""
import json

import pytest

from hitbench_utils.config import RunConfig
from hitbench_utils.errors import ConfigError, FingerprintMismatch, RunExistsError
from hitbench_utils.faults import FaultyBackend
from hitbench_utils.run import Job
from hitbench_utils.runlog import read_log, view
from hitbench_utils.status import summarize


def job(tmp_path, backend, sample_data, **kw):
    kw.setdefault("run_dir", str(tmp_path / "run"))
    cfg = RunConfig(data_path=str(sample_data), dtype="float32", device="cpu", score=False, **kw)
    return Job(cfg, backend=backend, progress=False)


@pytest.mark.parametrize("modality,fmt", [("text", "html"), ("text", "latex"), ("text", "csv"), ("text", "markdown"),
                                          ("text", "json"), ("image", "html"), ("mix", "csv")])
def test_every_modality_and_format_runs_ok(tmp_path, tiny_backend, sample_data, modality, fmt):
    s = job(tmp_path, tiny_backend, sample_data, modality=modality, format=fmt, limit=6, max_reasks=0).execute()
    assert s["ok"] == 6 and s["verdict"] == "complete", s
    recs = view(read_log(tmp_path / "run").records).values()
    for r in recs:
        assert r["input_tokens_sent"] > 0 and r["output_tokens"] >= 1 and r["response"] is not None
        if modality != "text":
            assert r["image_tokens"] > 0 and r["image_size"]


def test_resume_retries_only_failed_ids_and_view_has_one_record_each(tmp_path, tiny_backend, sample_data):
    fails = {3: "exception", 5: "oom"}
    faulty = FaultyBackend(tiny_backend, fails)
    s1 = job(tmp_path, faulty, sample_data, limit=8, batch_size=4, max_reasks=0).execute()
    assert s1["ok"] == 6 and s1["errors"] == {"exception": 1, "oom": 1}
    first_calls = dict(faulty.calls)
    faulty.faults = {}      # the faults are gone: a resume should now succeed
    assert all(first_calls[i] >= 1 for i in range(1, 9))
    s2 = job(tmp_path, faulty, sample_data, limit=8, batch_size=4, max_reasks=0).execute()
    second = {i: faulty.calls[i] - first_calls.get(i, 0) for i in range(1, 9)}
    assert {i for i, n in second.items() if n} == {3, 5}   # only the failed ids were called again
    assert s2["verdict"] == "complete"
    recs = read_log(tmp_path / "run").records
    assert len(recs) == 10 and len(view(recs)) == 8
    assert [r["attempt"] for r in recs if r["id"] == 3] == [1, 2]
    before = (tmp_path / "run" / "samples.jsonl").read_bytes()
    job(tmp_path, faulty, sample_data, limit=8, max_reasks=0).execute()
    assert (tmp_path / "run" / "samples.jsonl").read_bytes() == before   # a finished run appends nothing


def test_one_bad_sample_does_not_fail_its_batch(tmp_path, tiny_backend, sample_data):
    faulty = FaultyBackend(tiny_backend, {2: "exception"})
    s = job(tmp_path, faulty, sample_data, limit=4, batch_size=4, max_reasks=0, max_attempts=1).execute()
    assert s["ok"] == 3 and s["permanent_errors"] == [2]
    r = view(read_log(tmp_path / "run").records)[2]
    assert r["status"] == "exception" and "injected failure" in r["error"] and "Traceback" in r["traceback"]


def test_oom_in_a_batch_splits_it_and_records_the_steps(tmp_path, tiny_backend, sample_data):
    faulty = FaultyBackend(tiny_backend, {1: "oom"}, times=1)
    job(tmp_path, faulty, sample_data, limit=4, batch_size=4, max_reasks=0, share_prefix=False).execute()
    recs = view(read_log(tmp_path / "run").records)
    assert all(r["status"] == "ok" for r in recs.values())
    splits = [d for r in recs.values() for d in r["degraded"] if d["kind"] == "batch_split"]
    assert splits and splits[0]["detail"] == "after OOM" and splits[0]["before"] == 4


def test_reasks_are_counted_and_a_missing_final_answer_is_not_an_error(tmp_path, tiny_backend, sample_data):
    s = job(tmp_path, tiny_backend, sample_data, limit=3, max_reasks=1).execute()
    recs = view(read_log(tmp_path / "run").records).values()
    assert s["verdict"] == "complete"
    for r in recs:   # random weights never write the marker
        assert r["status"] == "ok" and r["answer_format_ok"] is False and r["reasks"] == 1
        assert r["prediction"] == [ln.strip() for ln in r["response"].splitlines() if ln.strip()][-1] or r["prediction"] == ""


def test_fingerprint_mismatch_and_resume_false_are_refused(tmp_path, tiny_backend, sample_data):
    job(tmp_path, tiny_backend, sample_data, limit=2, max_reasks=0).execute()
    with pytest.raises(FingerprintMismatch, match="max_input_tokens"):
        job(tmp_path, tiny_backend, sample_data, limit=2, max_reasks=0, max_input_tokens=5000).execute()
    with pytest.raises(RunExistsError):
        job(tmp_path, tiny_backend, sample_data, limit=2, max_reasks=0, resume=False).execute()
    # batch_size and limit are not part of the fingerprint
    s = job(tmp_path, tiny_backend, sample_data, limit=3, max_reasks=0, batch_size=1).execute()
    assert s["ok"] == 3


def test_truncation_is_recorded(tmp_path, tiny_backend, sample_data):
    s = job(tmp_path, tiny_backend, sample_data, limit=4, max_reasks=0, max_input_tokens=450, format="csv").execute()
    recs = view(read_log(tmp_path / "run").records).values()
    assert s["truncated"] >= 1
    for r in recs:
        if r["status"] == "ok":
            assert r["input_tokens_sent"] <= 450
        if r["truncated"]:
            assert r["rows_dropped"] > 0 and r["input_tokens_original"] > r["input_tokens_sent"]
    log_text = (tmp_path / "run" / "run.log").read_text()
    assert "TRUNCATED" in log_text


def test_bad_parameters_fail_before_work(tmp_path, tiny_backend, sample_data):
    with pytest.raises(ConfigError, match="html, latex, csv, markdown, json"):
        job(tmp_path, tiny_backend, sample_data, format="xlsx")
    with pytest.raises(ConfigError, match="text, image, mix"):
        job(tmp_path, tiny_backend, sample_data, modality="audio")


def test_results_json_and_default_run_dir(tmp_path, tiny_backend, sample_data):
    cfg = RunConfig(model="tiny", modality="mix", format="csv", qa_file="QA_long.json")
    assert str(cfg.default_run_dir("runs")) == "runs/tiny_mix_csv_QA_long_sample"
    assert str(RunConfig(modality="image").default_run_dir("runs")) == "runs/tiny_image_sample"
    job(tmp_path, tiny_backend, sample_data, limit=2, max_reasks=0).execute()
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["summary"]["ok"] == 2 and res["time"]["total_s"] > 0


def test_oom_ladder_halves_tokens_then_gives_an_oom_record(tmp_path, tiny_backend, sample_data):
    job(tmp_path, tiny_backend, sample_data, run_dir=str(tmp_path / "probe"), limit=2, max_reasks=0, format="html",
        max_new_tokens=1).execute()
    sizes = [r["input_tokens_sent"] for r in view(read_log(tmp_path / "probe").records).values()]
    bound = int(min(sizes) * 0.6)        # the tokenizer differs with and without the shared files
    faulty = FaultyBackend(tiny_backend, oom_above_tokens=bound)
    s = job(tmp_path, faulty, sample_data, limit=2, batch_size=2, max_reasks=0, format="html",
            oom_floor_tokens=256, max_attempts=1, share_prefix=False).execute()
    recs = view(read_log(tmp_path / "run").records)
    for r in recs.values():
        assert r["status"] == "ok", r["error"]
        assert r["input_tokens_sent"] <= bound and r["truncated"]
        assert any(d["kind"] == "token_budget" and d["after"] < d["before"] for d in r["degraded"])
        assert any(d["kind"] == "batch_split" and d["before"] == 2 and d["after"] == [1, 1] for d in r["degraded"])
    faulty = FaultyBackend(tiny_backend, oom_above_tokens=100)        # nothing fits above the floor
    s = job(tmp_path, faulty, sample_data, run_dir=str(tmp_path / "r2"), limit=1, max_reasks=0, format="html",
            oom_floor_tokens=1024, max_attempts=1).execute()
    r = next(iter(view(read_log(tmp_path / "r2").records).values()))
    assert r["status"] == "oom" and [d["kind"] for d in r["tried"]][-1] == "failed"
    assert any(d["kind"] == "token_budget" for d in r["tried"]) and r["tried"][-1]["detail"].startswith("OutOfMemoryError")
    assert s["verdict"] == "complete with 1 permanent errors"


def test_oom_ladder_halves_image_pixels(tmp_path, tiny_backend, sample_data):
    faulty = FaultyBackend(tiny_backend, oom_above_pixels=200 * 200)
    job(tmp_path, faulty, sample_data, limit=2, modality="image", max_reasks=0, oom_floor_pixels=64 * 64).execute()
    for r in view(read_log(tmp_path / "run").records).values():
        assert r["status"] == "ok"
        w, h = r["image_size_sent"]
        assert w * h <= 200 * 200 < r["image_size"][0] * r["image_size"][1]
        assert any(d["kind"] == "image_halved" and d["detail"] == "after OOM" for d in r["degraded"])


def test_timeout_becomes_a_timeout_record_and_the_run_goes_on(tmp_path, tiny_backend, sample_data):
    s = job(tmp_path, tiny_backend, sample_data, limit=2, batch_size=1, max_reasks=0, max_new_tokens=4000,
            max_time_per_sample=0.2, max_attempts=1).execute()
    recs = view(read_log(tmp_path / "run").records)
    assert [r["status"] for r in recs.values()] == ["timeout", "timeout"]
    assert all("max_time_per_sample" in r["error"] and r["response"] for r in recs.values())
    assert s["errors"] == {"timeout": 2}
