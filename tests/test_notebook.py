"""The infer notebook under papermill, as users run it (tiny model, sample dataset)."""
import json
from pathlib import Path

import nbformat
import papermill as pm
import pytest

from hitbench_utils.runlog import read_log, view
from hitbench_utils.status import summarize

NB = Path(__file__).resolve().parents[1] / "notebooks" / "infer.ipynb"


def test_committed_notebook_is_stripped_and_has_parameters_tag():
    nb = nbformat.read(NB, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any("parameters" in c.metadata.get("tags", []) for c in code)
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_no_parameters_run_is_complete_and_rerun_appends_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    pm.execute_notebook(str(NB), "runs/out.ipynb", progress_bar=False)
    run_dir = tmp_path / "runs" / "tiny_text_html_sample"
    s = summarize(run_dir)
    assert s["verdict"] == "complete" and s["ok"] == s["total"] >= 30, s
    before = (run_dir / "samples.jsonl").read_bytes()
    pm.execute_notebook(str(NB), "runs/out2.ipynb", progress_bar=False)
    assert (run_dir / "samples.jsonl").read_bytes() == before
    assert (run_dir / "run.log").read_text().count("40 already done, 0 to run") == 1


@pytest.mark.slow
@pytest.mark.parametrize("modality,fmt", [("text", "latex"), ("text", "csv"), ("text", "markdown"), ("text", "json"),
                                          ("image", "html"), ("mix", "html")])
def test_each_modality_and_format(tmp_path, modality, fmt):
    run_dir = tmp_path / "run"
    pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), progress_bar=False,
                        parameters=dict(modality=modality, format=fmt, run_dir=str(run_dir), limit=8, max_reasks=0))
    recs = view(read_log(run_dir).records)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs.values())
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert any("complete" in "".join(o.get("text", "")) for c in out.cells for o in c.get("outputs", []))


def test_failed_cell_still_writes_the_output_notebook(tmp_path):
    with pytest.raises(pm.PapermillExecutionError):
        pm.execute_notebook(str(NB), str(tmp_path / "bad.ipynb"), progress_bar=False,
                            parameters=dict(format="xlsx", run_dir=str(tmp_path / "r")))
    text = (tmp_path / "bad.ipynb").read_text()
    assert "RunFailed" in text and "format='xlsx' is not allowed" in text and "html, latex, csv, markdown, json" in text


def test_every_config_field_is_a_parameter_and_papermill_parses_every_line(caplog):
    """Parameters are written once, in the parameters cell: RunConfig.from_params reads them all."""
    import logging
    from dataclasses import fields

    from papermill.inspection import display_notebook_help  # noqa: F401 - the same parser papermill uses
    from papermill.translators import PythonTranslator

    from hitbench_utils.config import RunConfig

    nb = nbformat.read(NB, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    with caplog.at_level(logging.WARNING):
        inferred = {p.name for p in PythonTranslator.inspect(cell)}
    assert not [r for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert inferred == {f.name for f in fields(RunConfig)} - {"extra"}


def test_a_run_with_errors_left_to_retry_fails_the_papermill_command(tmp_path):
    """The exit status a script can trust: max_attempts left on an error record means 'resume', not done."""
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), progress_bar=False,
                            parameters=dict(run_dir=str(tmp_path / "r"), limit=4, max_reasks=0, max_new_tokens=8,
                                            max_time_per_sample=1e-9))
    assert e.value.ename == "RunFailed" and "no sample succeeded (0 of 4 ok, 4 remaining" in e.value.evalue
