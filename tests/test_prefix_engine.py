"""The shared-prefix engine gives exactly the tokens of a plain batch-1 generate (tiny model, float32, CPU)."""
import pytest

from hitbench_utils import data as D
from hitbench_utils.backends.base import GenRequest, GenSettings
from hitbench_utils.config import RunConfig
from hitbench_utils.errors import SampleOOM
from hitbench_utils.prefix_engine import PrefixEngine
from hitbench_utils.prompts import build_prompt, load_templates
from hitbench_utils.run import Job, make_engine
from hitbench_utils.runlog import read_log, view


def requests(sample_data, modality, fmt, n):
    t = load_templates()
    out = []
    for q in D.load_queries(sample_data / "QA_final.json")[:n]:
        p = build_prompt(t, q, modality, fmt, D.read_table(sample_data, fmt, q.file_name))
        img = D.load_image(sample_data / "image", q.file_name) if modality != "text" else None
        out.append(GenRequest(q.id, p.messages(), img, None, share_from=p.suffix))
    return out


@pytest.mark.parametrize("modality,fmt,n", [("text", "csv", 40), ("mix", "markdown", 12), ("text", "html", 8)])
def test_prefix_engine_matches_plain_generate_token_for_token(tiny_backend, sample_data, modality, fmt, n):
    reqs = requests(sample_data, modality, fmt, n)
    settings = GenSettings(max_new_tokens=32)
    plain = {r.key: tiny_backend.generate([r], settings)[0] for r in reqs}
    engine = PrefixEngine(tiny_backend, batch_size=4)
    groups, unsplit = engine._group(reqs)
    assert not unsplit and len(groups) < len(reqs)          # questions on one table share a prefix
    got = {r.key: res for r, res, steps in engine.run(reqs, settings)}
    assert set(got) == set(plain)
    for k in plain:
        assert got[k].text == plain[k].text and got[k].output_tokens == plain[k].output_tokens, k


def test_per_request_cap_and_a_failing_group_falls_back(tiny_backend, sample_data, monkeypatch):
    reqs = requests(sample_data, "text", "csv", 6)
    for r in reqs:
        r.max_new_tokens = 3
    engine = PrefixEngine(tiny_backend, batch_size=4)
    assert all(res.output_tokens <= 3 for _, res, _ in engine.run(reqs, GenSettings(max_new_tokens=32)))

    def boom(*a, **k):
        raise SampleOOM("injected OOM in a shared-prefix batch")

    monkeypatch.setattr(engine, "_generate_group", boom)
    out = list(engine.run(reqs, GenSettings(max_new_tokens=4)))
    assert len(out) == 6 and all(not isinstance(res, BaseException) for _, res, _ in out)
    assert all(steps[0] == "prefix sharing off after SampleOOM" for _, _, steps in out)


def test_job_uses_the_prefix_engine_for_hf_backends(tmp_path, tiny_backend, sample_data):
    cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "run"), limit=6, max_reasks=1,
                    device="cpu", score=False, format="csv")
    assert isinstance(make_engine(tiny_backend, cfg), PrefixEngine)
    s = Job(cfg, backend=tiny_backend, progress=False).execute()
    assert s["verdict"] == "complete"
    recs = view(read_log(tmp_path / "run").records)
    assert all(r["reasks"] == 1 and r["output_tokens"] == 32 for r in recs.values())
