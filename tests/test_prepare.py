"""Preparation beside the engine, and the refusals made before any work starts."""
from __future__ import annotations

import shutil
import time
from types import SimpleNamespace

import pytest

from hitbench_utils import data as D
from hitbench_utils.config import RunConfig
from hitbench_utils.errors import ConfigError
from hitbench_utils.engine import PrefixEngine
from hitbench_utils.prepare import Preparer, look_ahead, prepare_stream
from hitbench_utils.prompts import load_templates
from hitbench_utils.run import Job


def preparer(sample_data, tiny_backend, **kw) -> tuple[Preparer, list]:
    cfg = RunConfig(data_path=str(sample_data), **kw).validate()
    queries = D.load_queries(sample_data / "QA_final.json")
    return Preparer(cfg, tiny_backend, load_templates(None), sample_data, sample_data / "image"), queries


def test_forked_workers_prepare_exactly_what_the_run_process_prepares(sample_data, tiny_backend):
    prep, queries = preparer(sample_data, tiny_backend, format="csv", max_input_tokens=450)   # truncation happens
    groups = [[(q, 1) for q in queries[i:i + 5]] for i in range(0, len(queries), 5)]
    here = [p for g in prepare_stream(prep, groups, workers=0) for p in g]
    forked = [p for g in prepare_stream(prep, groups, workers=2, ahead=3) for p in g]
    assert [p.record.id for p in forked] == [q.id for q in queries]              # in order
    assert any(p.record.truncated for p in here)
    for a, b in zip(here, forked):
        assert (a.request is None) == (b.request is None)
        if a.request is not None:
            assert a.request.messages == b.request.messages and a.request.input_tokens == b.request.input_tokens
        ra, rb = a.record.to_dict(), b.record.to_dict()
        for k in ("started_at", "prepare_s"):
            ra.pop(k), rb.pop(k)
        assert ra == rb


class SlowPreparer:
    """A stand-in taking ``seconds`` a question (sleeping: the test needs no free cores)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def prepare(self, q: int, attempt: int) -> SimpleNamespace:
        time.sleep(self.seconds)
        return SimpleNamespace(id=q)


def pull_waits(ahead: int, per_pull: int, pulls: int, work_s: float, prepare_s: float) -> list[float]:
    """What an engine taking ``per_pull`` groups a pull, and working ``work_s`` on each, waits at each pull
    for prepared groups (the pipeline's ``Flow.source`` times the same ``next`` calls)."""
    stream = prepare_stream(SlowPreparer(prepare_s), [[(i, 1)] for i in range(pulls * per_pull)], workers=2,
                            ahead=ahead)
    waits, got = [], []
    for _ in range(pulls):
        t0 = time.perf_counter()
        got += [p.id for _ in range(per_pull) for p in next(stream)]
        waits.append(time.perf_counter() - t0)
        time.sleep(work_s)
    assert got == list(range(pulls * per_pull)) and next(stream, None) is None
    return waits


def test_after_its_first_pull_the_engine_never_waits_for_prepared_prompts():
    """The run prepares ``look_ahead(groups_per_pull)`` groups ahead: while the engine works on a pull, the
    next pull's groups are prepared. Two workers prepare a pull of 4 in 0.5 s; the engine works 0.7 s."""
    per_pull = 4
    waits = pull_waits(look_ahead(per_pull), per_pull, pulls=4, work_s=0.7, prepare_s=0.25)
    assert max(waits[1:]) < 0.12, waits
    # the control: a window of one pull leaves each pull's last group to be prepared while the engine waits
    one_pull = pull_waits(per_pull, per_pull, pulls=4, work_s=0.7, prepare_s=0.25)
    assert min(one_pull[1:]) > 0.2, one_pull
    assert look_ahead(PrefixEngine.groups_per_pull) >= 2 * PrefixEngine.groups_per_pull


def test_a_limit_that_no_instructions_fit_is_refused_before_any_work(tmp_path, sample_data, tiny_backend):
    job = Job(RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "r"), max_input_tokens=10),
              backend=tiny_backend, progress=False)
    with pytest.raises(ConfigError, match=r"max_input_tokens=10 is not allowed; allowed: at least [\d,]+") as e:
        job.execute()
    assert "image" not in str(e.value) and "raise max_input_tokens" in str(e.value)
    assert not (tmp_path / "r" / "samples.jsonl").exists() or (tmp_path / "r" / "samples.jsonl").read_text().count("\n") <= 1


def test_an_image_run_without_images_is_refused_naming_the_render_command(tmp_path, sample_data, tiny_backend):
    data = tmp_path / "data"
    shutil.copytree(sample_data, data, ignore=shutil.ignore_patterns("image"))
    job = Job(RunConfig(data_path=str(data), modality="mix", run_dir=str(tmp_path / "r")), backend=tiny_backend,
              progress=False)
    with pytest.raises(ConfigError, match="python -m hitbench_utils render --data .* --out images/.*-p image_dir images/"):
        job.execute()
    assert not (tmp_path / "r").exists()          # refused before the run folder was made


def test_a_data_path_that_does_not_exist_says_so_without_dev_helpers(tmp_path):
    with pytest.raises(ConfigError, match="does not exist") as e:
        Job(RunConfig(data_path=str(tmp_path / "nope")), progress=False)
    assert "shared" not in str(e.value) and "realhitbench" not in str(e.value)


def test_the_default_run_folder_names_the_data(tmp_path, sample_data):
    assert RunConfig().default_run_dir("runs").name == "tiny_text_html_sample"
    other = tmp_path / "RealHiTBench"
    other.mkdir()
    assert RunConfig(data_path=str(other), qa_file="QA_long.json").default_run_dir("runs").name == \
        "tiny_text_html_QA_long_RealHiTBench"


def test_the_prefix_split_is_made_in_the_workers_and_is_the_engines_own(tmp_path, sample_data, tiny_backend, monkeypatch):
    """Preparation cuts each prompt into shared prefix + suffix (a whole-prompt tokenization), so the
    engine's thread does not; the cut is the one the engine would make, and the run's answers are those
    of a run whose engine cuts them itself."""
    from hitbench_utils.engine import prefixes
    from hitbench_utils.runlog import read_log, view

    prep, queries = preparer(sample_data, tiny_backend, format="csv")
    groups = [[(q, 1) for q in queries[i:i + 4]] for i in range(0, 12, 4)]
    made = [p for g in prepare_stream(prep, groups, workers=2) for p in g]
    assert all(p.request.cut is not None for p in made)
    for p in made:
        own = prefixes.cut(tiny_backend, p.request, {})
        assert (own.key, own.prefix_ids, own.suffix_ids, own.prefix_len) == (
            p.request.cut.key, p.request.cut.prefix_ids, p.request.cut.suffix_ids, p.request.cut.prefix_len)

    calls = []
    real = prefixes.cut
    monkeypatch.setattr(prefixes, "cut", lambda *a, **k: calls.append(1) or real(*a, **k))
    answers = {}
    for name, workers in (("workers", 2), ("here", 0)):
        cfg = RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / name), format="csv", limit=8, max_reasks=0,
                        max_new_tokens=6, device="cpu", score=False, prepare_workers=workers)
        calls.clear()
        assert Job(cfg, backend=tiny_backend, progress=False).execute()["verdict"] == "complete"
        if workers:
            assert not calls, "with workers, this process never cuts a prompt"
        answers[name] = {i: r["response"] for i, r in view(read_log(tmp_path / name).records).items()}
    assert answers["workers"] == answers["here"] and len(answers["here"]) == 8
