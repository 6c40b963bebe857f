"""Bad input (issue 4, CPU part): each one gives a clear message and loses nothing.

Run-level problems (QA file, parameters, run folder, model folder) stop the run before any work, with a
message that names the value, what is allowed and the fix. Per-sample problems (a table or image that is
missing, empty, an LFS stub or corrupt) become ``missing_input`` records, while the other samples of the
same run are ok. Data folders are copies of the embedded sample dataset, broken file by file.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hitbench_utils.config import RunConfig
from hitbench_utils.errors import (ConfigError, DataError, FingerprintMismatch, HitbenchError, ModelLoadError,
                                   RunLogError)
from hitbench_utils.faults import FaultyBackend
from hitbench_utils.run import Job, run
from hitbench_utils.runlog import LOG_NAME, read_log, view
from hitbench_utils.status import summarize

REPO = Path(__file__).resolve().parents[1]
LFS_STUB = ("version https://git-lfs.github.com/spec/v1\n"
            "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 48213\n")


@pytest.fixture
def data(tmp_path, sample_data) -> Path:
    """A private, breakable copy of the sample dataset."""
    return Path(shutil.copytree(sample_data, tmp_path / "data"))


def cfg(data: Path, run_dir: Path, **kw) -> RunConfig:
    base = dict(data_path=str(data), run_dir=str(run_dir), format="csv", max_new_tokens=4, max_reasks=0,
                dtype="float32", device="cpu", score=False)
    base.update(kw)
    return RunConfig(**base)


def job(data: Path, run_dir: Path, backend, **kw) -> Job:
    return Job(cfg(data, run_dir, **kw), backend=backend, progress=False)


def status_cli(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hitbench_utils", "status", str(run_dir)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


# ---------------------------------------------------------------------------------------------
# the QA file and the parameters: refused before any work
# ---------------------------------------------------------------------------------------------
def test_malformed_qa_json_is_refused_naming_file_line_and_column(data, tmp_path):
    qa = data / "QA_final.json"
    text = qa.read_text()
    qa.write_text(text[: len(text) // 2])                       # cut mid-file, as a failed download would
    with pytest.raises(DataError) as e:
        job(data, tmp_path / "run", None)
    msg = str(e.value)
    assert str(qa) in msg and "not valid JSON (line " in msg and "column" in msg and "Fix:" in msg, msg
    assert not (tmp_path / "run").exists()


def test_qa_item_missing_a_field_is_refused_naming_item_and_field(data, tmp_path):
    qa = data / "QA_final.json"
    blob = json.loads(qa.read_text())
    del blob["queries"][6]["ProcessedAnswer"]                     # id 7
    qa.write_text(json.dumps(blob))
    with pytest.raises(DataError) as e:
        job(data, tmp_path / "run", None)
    msg = str(e.value)
    assert "item #6 (id=7)" in msg and "ProcessedAnswer" in msg and "every item needs id, FileName" in msg, msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("param,value,allowed", [
    ("modality", "audio", "text, image, mix"),
    ("format", "xlsx", "html, latex, csv, markdown, json"),
    ("question_type", "Trivia", "Fact Checking, Numerical Reasoning, Data Analysis, Structure Comprehending, Visualization"),
    ("qa_file", "QA_nope.json", "QA_final.json, QA_long.json, QA_structure.json"),
    ("ids", [1, 999], "ids present in the QA file (1..40)"),
])
def test_unknown_choices_name_the_allowed_values(data, tmp_path, param, value, allowed):
    params = dict(data_path=str(data), run_dir=str(tmp_path / "run"), score=False, progress=False)
    params[param] = value
    with pytest.raises(ConfigError) as e:
        run(**params)
    msg = str(e.value)
    assert f"{param}=" in msg and allowed in msg, msg
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("param,value,allowed", [
    ("dtype", "fp8", "auto, bfloat16, float16, float32"),
    ("attn_implementation", "flash", "sdpa, eager, flash_attention_2"),
])
def test_unknown_dtype_or_attention_names_the_allowed_values(data, tmp_path, param, value, allowed):
    with pytest.raises(ConfigError) as e:
        job(data, tmp_path / "run", None, limit=1, **{param: value}).execute()
    assert allowed in str(e.value)
    assert read_log(tmp_path / "run").records == []


@pytest.mark.parametrize("param,value", [("dtype", "fp8"), ("attn_implementation", "flash")])
def test_unknown_dtype_or_attention_leaves_the_run_folder_usable(data, tmp_path, tiny_backend, param, value):
    with pytest.raises(ConfigError):
        job(data, tmp_path / "run", None, limit=1, **{param: value}).execute()
    s = job(data, tmp_path / "run", tiny_backend, limit=1).execute()   # the corrected call
    assert s["verdict"] == "complete"


# ---------------------------------------------------------------------------------------------
# per-sample inputs: missing_input records, the other samples ok
# ---------------------------------------------------------------------------------------------
def test_bad_tables_become_missing_input_records_and_the_rest_is_ok(data, tmp_path, tiny_backend):
    csv = data / "csv"
    (csv / "employment-sample02.csv").unlink()                    # ids 6-10: missing
    (csv / "enrollment-sample03.csv").write_text(LFS_STUB)        # ids 11-15: a Git LFS pointer stub
    (csv / "budget-sample04.csv").write_bytes(b"")                # ids 16-19: empty
    (csv / "weather-sample05.csv").write_text(" \n\t\n")          # ids 20-23: whitespace only
    ids = [1, 6, 11, 16, 20, 24, 2, 7]
    s = job(data, tmp_path / "run", tiny_backend, ids=ids, batch_size=4, max_attempts=1).execute()
    recs = view(read_log(tmp_path / "run").records)
    assert sorted(recs) == sorted(ids)
    status = {i: r["status"] for i, r in recs.items()}
    assert status == {1: "ok", 2: "ok", 24: "ok", 6: "missing_input", 7: "missing_input", 11: "missing_input",
                      16: "missing_input", 20: "missing_input"}, status
    for i in (1, 2, 24):
        assert recs[i]["response"] is not None and recs[i]["output_tokens"] >= 1
    err = {i: recs[i]["error"] for i in (6, 11, 16, 20)}
    assert "not found" in err[6] and str(csv / "employment-sample02.csv") in err[6]
    assert "Git LFS pointer stub" in err[11] and "git lfs pull" in err[11] and "enrollment-sample03.csv" in err[11]
    assert "empty (0 bytes)" in err[16] and "Fix:" in err[16] and "budget-sample04.csv" in err[16]
    assert "only whitespace" in err[20] and "Fix:" in err[20] and "weather-sample05.csv" in err[20]
    for i in (6, 11, 16, 20):
        r = recs[i]
        assert r["error"].startswith("MissingInputError: ") and "Traceback" in r["traceback"]
        assert r["response"] is None and r["output_tokens"] is None    # never sent to the model
    assert s["errors"] == {"missing_input": 5} and s["ok"] == 3
    assert s["verdict"] == "complete with 5 permanent errors"
    out = status_cli(tmp_path / "run")
    assert out.returncode == 0 and "missing_input: ids" in out.stdout and "missing_input 5" in out.stdout, out


def test_missing_table_message_says_what_to_do(data, tmp_path, tiny_backend):
    (data / "csv" / "employment-sample02.csv").unlink()
    job(data, tmp_path / "run", tiny_backend, ids=[6], max_attempts=1).execute()
    err = view(read_log(tmp_path / "run").records)[6]["error"]
    assert "Fix:" in err, err


def test_bad_images_become_missing_input_records_and_the_rest_is_ok(data, tmp_path, tiny_backend):
    img = data / "image"
    good = (img / "energy-sample07.png").read_bytes()
    (img / "energy-sample07.png").write_bytes(good[:16] + os.urandom(400))   # ids 28-32: corrupt PNG
    half = (img / "survey-sample08.png").read_bytes()
    (img / "survey-sample08.png").write_bytes(half[: len(half) // 2])        # ids 33-35: truncated PNG
    (img / "transport-sample09.png").write_text(LFS_STUB)                    # ids 36-38: LFS stub
    (img / "hospital-sample06.png").unlink()                                 # ids 24-27: missing
    ids = [28, 33, 36, 24, 39, 1]
    s = job(data, tmp_path / "run", tiny_backend, modality="image", ids=ids, batch_size=2, max_attempts=1).execute()
    recs = view(read_log(tmp_path / "run").records)
    status = {i: r["status"] for i, r in recs.items()}
    assert status == {28: "missing_input", 33: "missing_input", 36: "missing_input", 24: "missing_input",
                      39: "ok", 1: "ok"}, status
    assert "cannot be decoded" in recs[28]["error"] and "energy-sample07.png" in recs[28]["error"]
    assert "cannot be decoded" in recs[33]["error"] and "Fix:" in recs[33]["error"]
    assert "Git LFS pointer stub" in recs[36]["error"] and "git lfs pull" in recs[36]["error"]
    assert "not found" in recs[24]["error"] and "hospital-sample06.png" in recs[24]["error"]
    for i in (39, 1):
        assert recs[i]["image_tokens"] > 0 and recs[i]["output_tokens"] >= 1
    assert s["verdict"] == "complete with 4 permanent errors"


def test_mix_modality_with_a_corrupt_image_is_missing_input(data, tmp_path, tiny_backend):
    (data / "image" / "sales-sample01.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    job(data, tmp_path / "run", tiny_backend, modality="mix", ids=[1, 6], max_attempts=1).execute()
    recs = view(read_log(tmp_path / "run").records)
    assert recs[1]["status"] == "missing_input" and "cannot be decoded" in recs[1]["error"]
    assert recs[6]["status"] == "ok"


def test_restoring_a_missing_table_then_resuming_reruns_only_those_ids(data, tmp_path, tiny_backend):
    table = data / "csv" / "employment-sample02.csv"
    keep = table.read_bytes()
    table.write_text(LFS_STUB)
    faulty = FaultyBackend(tiny_backend)
    job(data, tmp_path / "run", faulty, ids=[1, 6, 7], max_attempts=2).execute()
    before = (tmp_path / "run" / LOG_NAME).read_bytes()
    table.write_bytes(keep)                                        # git lfs pull
    calls = dict(faulty.calls)
    s = job(data, tmp_path / "run", faulty, ids=[1, 6, 7], max_attempts=2).execute()
    assert s["verdict"] == "complete" and s["ok"] == 3
    assert (tmp_path / "run" / LOG_NAME).read_bytes().startswith(before)
    assert faulty.calls[1] == calls.get(1)                         # the ok sample was not run again


# ---------------------------------------------------------------------------------------------
# chart scoring: a broken xlsx is the data's fault, not the model's
# ---------------------------------------------------------------------------------------------
def chart_record(data: Path) -> dict:
    q = next(q for q in json.loads((data / "QA_final.json").read_text())["queries"] if q["id"] == 4)
    return {"id": 4, "status": "ok", "question_type": q["QuestionType"], "sub_qtype": q["SubQType"],
            "prediction": q["FinalAnswer"], "reference": q["ProcessedAnswer"], "file_name": q["FileName"]}


def test_absent_empty_or_stub_xlsx_scores_missing_input(data, tmp_path):
    from hitbench_utils.scoring import score_record

    rec, xlsx = chart_record(data), data / "tables" / "sales-sample01.xlsx"
    ok = score_record(rec, xlsx_path=str(xlsx), chart_timeout=60)
    assert ok["score_status"] == "scored" and ok["scores"] == {"ECR": True, "Pass": True}, ok  # the program is right
    cases = {"absent": None, "empty": b"", "stub": LFS_STUB.encode()}
    for name, content in cases.items():
        path = tmp_path / f"{name}.xlsx"
        if content is not None:
            path.write_bytes(content)
        out = score_record(rec, xlsx_path=str(path), chart_timeout=60)
        assert out["score_status"] == "missing_input" and out["scores"] == {}, (name, out)
        assert str(path) in out["score_error"], (name, out)


@pytest.mark.parametrize("cut", ["half", "tail"])
def test_truncated_xlsx_scores_missing_input_not_a_model_failure(data, tmp_path, cut):
    from hitbench_utils.scoring import score_record

    raw = (data / "tables" / "sales-sample01.xlsx").read_bytes()
    path = tmp_path / "sales-sample01.xlsx"
    path.write_bytes(raw[: len(raw) // 2] if cut == "half" else raw[:-40])
    out = score_record(chart_record(data), xlsx_path=str(path), chart_timeout=60)
    assert out["score_status"] == "missing_input" and out["scores"] == {}, out
    assert str(path) in out["score_error"], out


# ---------------------------------------------------------------------------------------------
# the run folder: another configuration, garbage lines, not writable
# ---------------------------------------------------------------------------------------------
def test_run_folder_of_another_configuration_is_refused_showing_the_differences(data, tmp_path, tiny_backend):
    run_dir = tmp_path / "run"
    job(data, run_dir, tiny_backend, limit=2).execute()
    log = run_dir / LOG_NAME
    before = log.read_bytes()
    with pytest.raises(FingerprintMismatch) as e:
        job(data, run_dir, tiny_backend, limit=2, format="html", max_new_tokens=8).execute()
    msg = str(e.value)
    assert str(run_dir) in msg and "Fix:" in msg and "overwrite=True" in msg, msg
    assert "format: 'csv' -> 'html'" in msg and "generation.max_new_tokens: 4 -> 8" in msg, msg
    assert set(e.value.diff) == {"format", "generation.max_new_tokens"}, e.value.diff
    assert "temperature" not in msg and "{" not in msg.split("\n", 1)[1]     # only what differs, never whole dicts
    qa = data / "QA_final.json"                                    # the same parameters, an edited QA file
    blob = json.loads(qa.read_text())
    blob["queries"][0]["ProcessedAnswer"] = "something else"
    qa.write_text(json.dumps(blob))
    with pytest.raises(FingerprintMismatch) as e:
        job(data, run_dir, tiny_backend, limit=2).execute()
    assert set(e.value.diff) == {"data.qa_sha256"}, str(e.value)
    assert log.read_bytes() == before                              # refused: nothing written, nothing lost
    assert summarize(run_dir)["verdict"] == "complete"


def test_garbage_middle_lines_are_reported_by_number_and_resume_keeps_what_follows(data, tmp_path, tiny_backend):
    run_dir = tmp_path / "run"
    faulty = FaultyBackend(tiny_backend)
    job(data, run_dir, faulty, limit=6, batch_size=2).execute()
    log = run_dir / LOG_NAME
    lines = log.read_bytes().split(b"\n")[:-1]                     # header + 6 records
    assert len(lines) == 7
    lost = json.loads(lines[3])["id"]                              # line 4 is overwritten
    lines[3] = b"#### garbage \xff\xfe ####"
    lines.insert(5, lines[5][: len(lines[5]) // 2])                 # line 6: half a record (a torn middle line)
    log.write_bytes(b"\n".join(lines) + b"\n")
    broken = log.read_bytes()
    # status: the line numbers, the records after them kept, one id to run again
    out = status_cli(run_dir)
    assert out.returncode == 1, out
    assert "samples.jsonl line 4 skipped: not JSON" in out.stdout, out.stdout
    assert "samples.jsonl line 6 skipped: not JSON" in out.stdout, out.stdout
    assert "incomplete: 1 of 6 remaining (1 never run" in out.stdout, out.stdout
    c = read_log(run_dir)
    assert [n for n, _ in c.bad_lines] == [4, 6] and len(c.records) == 5 and lost not in view(c.records)
    # resume: the garbage stays where it is, the records after it are kept, only the lost id runs again
    calls = dict(faulty.calls)
    s = job(data, run_dir, faulty, limit=6, batch_size=2).execute()
    assert s["verdict"] == "complete" and s["ok"] == 6
    after = log.read_bytes()
    assert after.startswith(broken)                                # nothing moved, nothing deleted
    added = after[len(broken):].split(b"\n")[:-1]
    assert [json.loads(x)["id"] for x in added] == [lost]
    rerun = {i for i in range(1, 7) if faulty.calls[i] != calls.get(i)}
    assert rerun == {lost}, rerun
    assert "line 4 skipped" in (run_dir / "run.log").read_text()
    out = status_cli(run_dir)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("complete"), out.stdout
    assert "line 4 skipped" in out.stdout and "line 6 skipped" in out.stdout


def test_middle_line_that_is_json_but_not_a_record_is_reported_not_fatal(data, tmp_path, tiny_backend):
    run_dir = tmp_path / "run"
    job(data, run_dir, tiny_backend, limit=3).execute()
    log = run_dir / LOG_NAME
    lines = log.read_text().splitlines(True)
    lines.insert(2, json.dumps({"id": "abc", "status": "ok"}) + "\n")
    log.write_text("".join(lines))
    out = status_cli(run_dir)
    assert "line 3 skipped" in out.stdout, out.stdout + out.stderr
    s = job(data, run_dir, tiny_backend, limit=3).execute()
    assert s["verdict"] == "complete"


def _not_writable_cases(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("not a folder")
    cases = {"parent is a regular file": tmp_path / "a_file" / "run", "a regular file": tmp_path / "a_file"}
    if Path("/sys/kernel").is_dir():
        cases["new folder on sysfs"] = Path("/sys/kernel/hitbench-run")
        cases["existing folder on sysfs"] = Path("/sys/kernel")
    return cases


@pytest.mark.parametrize("case", ["parent is a regular file", "a regular file", "new folder on sysfs",
                                  "existing folder on sysfs"])
def test_non_writable_run_folder_gives_a_clear_message(data, tmp_path, tiny_backend, case):
    cases = _not_writable_cases(tmp_path)
    if case not in cases:
        pytest.skip("no /sys here")
    run_dir = cases[case]
    with pytest.raises(HitbenchError) as e:
        job(data, run_dir, tiny_backend, limit=1).execute()
    assert isinstance(e.value, RunLogError) and str(run_dir) in str(e.value) and "Fix:" in str(e.value), repr(e.value)


@pytest.mark.parametrize("case", ["parent is a regular file", "a regular file", "new folder on sysfs",
                                  "existing folder on sysfs"])
def test_non_writable_run_folder_stops_before_any_work(data, tmp_path, case):
    """Root ignores permission bits, so these paths are non-writable for root too."""
    cases = _not_writable_cases(tmp_path)
    if case not in cases:
        pytest.skip("no /sys here")
    faulty = FaultyBackend(object())                  # any generate call would fail loudly
    faulty.identity, faulty.info, faulty.default_max_new_tokens = {"path": "fake"}, {"dtype": "float32"}, 4
    with pytest.raises(Exception) as e:
        job(data, cases[case], faulty, limit=1).execute()
    assert str(cases[case]) in str(e.value), repr(e.value)     # at least the path is named
    assert not faulty.calls
    assert (tmp_path / "a_file").read_text() == "not a folder"


READ_ONLY_RESUME = r"""
import json, sys
from pathlib import Path
rd = Path(sys.argv[1])
snap = lambda: {p.name: p.read_bytes() for p in sorted(rd.iterdir()) if p.is_file()}
before = snap()
res = {"error": None}
try:
    from hitbench_utils.run import run
    run(data_path=sys.argv[2], run_dir=str(rd), format="csv", max_new_tokens=4, max_reasks=0, limit=3,
        dtype="float32", device="cpu", score=False, progress=False)
except Exception as e:
    res = {"error": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__], "msg": str(e)}
res["unchanged"] = snap() == before
print("RESULT " + json.dumps(res))
"""


@pytest.fixture
def read_only_resume(data, tmp_path, tiny_backend):
    """Resume a real run folder that sits on a read-only filesystem (a tmpfs remounted ro, in a private
    user+mount namespace: read-only even for root)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    try:
        ok = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs "$1" && mount -o remount,ro "$1"',
                             "sh", str(probe)], capture_output=True, timeout=30).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        pytest.skip("unshare -rm with a read-only tmpfs (user+mount namespaces) is not available here")
    src = tmp_path / "run"
    job(data, src, tiny_backend, limit=2).execute()
    mnt = tmp_path / "ro"
    mnt.mkdir()
    script = ('mount -t tmpfs tmpfs "$1" && cp -a "$2" "$1/run" && mount -o remount,ro "$1" '
              '&& exec "$3" -c "$4" "$1/run" "$5"')
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mnt), str(src), sys.executable,
                          READ_ONLY_RESUME, str(data)], capture_output=True, text=True, cwd=REPO, timeout=300)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, out.stdout + out.stderr
    assert not any(mnt.iterdir())                      # the mount was private to the namespace
    return json.loads(line[len("RESULT "):]), str(mnt / "run")


def test_read_only_run_folder_is_refused_and_left_intact(read_only_resume):
    res, _ = read_only_resume
    assert res["error"] is not None and res["unchanged"], res


def test_read_only_run_folder_message_is_clear(read_only_resume):
    res, run_dir = read_only_resume
    assert "HitbenchError" in res["mro"] and run_dir in res["msg"] and "Fix:" in res["msg"], res


# ---------------------------------------------------------------------------------------------
# the model folder
# ---------------------------------------------------------------------------------------------
def test_empty_model_folder_is_refused_before_any_work(data, tmp_path):
    model = tmp_path / "empty-model"
    model.mkdir()
    with pytest.raises(ModelLoadError) as e:
        job(data, tmp_path / "run", None, model=str(model), limit=1).execute()
    assert str(model) in str(e.value) and "no config.json" in str(e.value) and "Fix:" in str(e.value)
    assert not (tmp_path / "run").exists()


def test_model_folder_with_garbage_config_is_a_model_load_error_naming_it(data, tmp_path, tiny_backend):
    model = tmp_path / "garbage-model"
    model.mkdir()
    (model / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelLoadError) as e:
        job(data, tmp_path / "run", None, model=str(model), limit=2).execute()
    assert str(model) in str(e.value) and "Fix:" in str(e.value), str(e.value)
    assert read_log(tmp_path / "run").records == []                # no sample was attempted


def test_fixing_the_model_folder_in_place_lets_the_same_run_resume(data, tmp_path, tiny_backend):
    from hitbench_utils.backends.tiny import tiny_model_dir

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{ this is not json")
    with pytest.raises(ModelLoadError):
        job(data, tmp_path / "run", None, model=str(model), limit=1).execute()
    shutil.rmtree(model)
    shutil.copytree(tiny_model_dir(), model)                       # re-downloaded, same folder
    (model / "hitbench_tiny.json").unlink()                        # an ordinary model folder from here on
    s = job(data, tmp_path / "run", None, model=str(model), limit=1).execute()
    assert s["verdict"] == "complete"
