"""Progress bars that count items as they finish: rescore (records) and grid (combinations)."""
import nbformat

from hitbench_utils.config import RunConfig
from hitbench_utils.grid import run_grid
from hitbench_utils.rescore import rescore_run
from hitbench_utils.run import Job
from hitbench_utils.scoring.records import rescore_records


def test_rescore_records_reports_each_record_as_it_finishes(tmp_path):
    recs = [{"id": i, "status": "ok", "question_type": "Fact Checking", "sub_qtype": "Multi-hop Fact Checking",
             "prediction": "Yes" if i % 2 else "No", "reference": "Yes"} for i in range(5)]
    seen: list[int] = []
    out = rescore_records(recs, data_path=tmp_path, on_done=lambda r: seen.append(r["id"]))
    assert sorted(seen) == [0, 1, 2, 3, 4] and [r["id"] for r in out] == [0, 1, 2, 3, 4]
    assert [r["scores"]["EM"] for r in out] == [0.0, 100.0, 0.0, 100.0, 0.0]


def test_rescore_bar_counts_the_records(tmp_path, tiny_backend, sample_data, capsys):
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), limit=6, max_reasks=0,
                    device="cpu", score=False, max_new_tokens=4)
    Job(cfg, backend=tiny_backend, progress=False).execute()
    capsys.readouterr()
    assert rescore_run(tmp_path / "run", progress=True, write=False)["records"] == 6
    err = capsys.readouterr().err
    assert "rescore: 100%" in err and "6/6" in err


def test_grid_bar_counts_the_combinations(tmp_path, capsys):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                            "language": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("modality = 'text'\nformat = 'html'\nrun_dir = ''", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(modality, format, run_dir)")]
    nbformat.write(nb, tmp_path / "nb.ipynb")
    rows = run_grid(["text", "image"], ["csv", "json"], notebook=tmp_path / "nb.ipynb", runs_root=tmp_path / "runs")
    assert [(r["modality"], r["format"], r["outcome"]) for r in rows] == [
        ("text", "csv", "ran"), ("text", "json", "ran"), ("image", "-", "ran")]
    err = capsys.readouterr().err
    assert "grid: 100%" in err and "3/3" in err and "image/-: ran" in err
