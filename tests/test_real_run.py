"""Issue 2's check on the real data: the tiny model, markdown, ids 1464 (1.07M tokens), 2016 (an LFS
stub) and 1 (ordinary), run exactly as a user would, through papermill with the default parameters."""
from pathlib import Path

import papermill as pm
import pytest

from hitbench_utils.runlog import read_log, view
from hitbench_utils.status import summarize

NB = Path(__file__).resolve().parents[1] / "notebooks" / "infer.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_truncated_normal_and_lfs_stub_records(tmp_path, real_data):
    run_dir = tmp_path / "run"
    pm.execute_notebook(str(NB), str(tmp_path / "out.ipynb"), progress_bar=False,
                        parameters=dict(data_path=str(real_data), format="markdown", ids="[1464, 2016, 1]",
                                        run_dir=str(run_dir), max_error_share=0.5))   # a third of this pick is a stub
    recs = view(read_log(run_dir).records)
    big, stub, normal = recs[1464], recs[2016], recs[1]
    assert big["status"] == "ok" and big["truncated"] and big["input_tokens_sent"] <= 100_000
    assert big["input_tokens_original"] > 1_000_000 and big["rows_dropped"] > 0
    assert normal["status"] == "ok" and not normal["truncated"]
    assert stub["status"] == "missing_input" and "Git LFS pointer stub" in stub["error"] and "git lfs pull" in stub["error"]
    assert "TRUNCATED id=1464" in (run_dir / "run.log").read_text()
    s = summarize(run_dir)
    assert s["ok"] == 2 and s["errors"] == {"missing_input": 1} and s["truncated"] == 1
