"""Structure Comprehending (issue 14 §1): the _swap tables, the pairs, both references on the record.

Real-data tests read the dataset through the ``real_data`` fixture (skipped when the shared files are
absent). Run tests use the sample dataset, whose SC tables have ``_swap`` copies, and an oracle backend.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hitbench_utils import data as D
from hitbench_utils.config import RunConfig
from hitbench_utils.faults import OracleBackend
from hitbench_utils.pairing import StructureTracker, plan_structure
from hitbench_utils.rescore import rescore_run
from hitbench_utils.run import Job
from hitbench_utils.runlog import read_log, view
from hitbench_utils.scoring import aggregate
from hitbench_utils.scoring.structure import score_structure

SC = "Structure Comprehending"


# ---- the real dataset: 396 pairs, 393 _swap tables, 3 missing ---------------------------------------
def test_real_sc_questions_all_pair_and_gold_is_the_originals_final_answer(real_data):
    plan = plan_structure(real_data / "QA_final.json")
    qs = {q.id: q for q in D.load_queries(real_data / "QA_final.json")}
    sc = [q for q in qs.values() if q.question_type == SC]
    assert len(sc) == 396 and {q.id for q in sc} == set(range(2676, 3072))
    assert set(plan.pairs) == {q.id for q in sc}
    assert all(p.original_id is not None and p.why is None for p in plan.pairs.values())
    assert (plan.pairs[2676].original_id, plan.pairs[2900].original_id, plan.pairs[3071].original_id) == (31, 1591, 2640)
    assert plan.pairs[2676].gold == "164287"
    assert plan.pairs[2743].gold == qs[374].raw["FinalAnswer"] == "1297800"      # FinalAnswer, not ProcessedAnswer
    # a repeated (FileName, Question) key pairs one to one, in file order
    assert (plan.pairs[2805].original_id, plan.pairs[2809].original_id) == (916, 920)
    for q in sc:
        o = qs[plan.pairs[q.id].original_id]
        assert (o.file_name, o.question) == (q.file_name, q.question) and o.question_type != SC
    assert sum(bool(p.gold.strip()) for p in plan.pairs.values()) == 396


def test_real_swap_tables_393_exist_3_are_missing_input_naming_the_file(real_data):
    plan = plan_structure(real_data / "QA_final.json")
    sc = [q for q in D.load_queries(real_data / "QA_final.json") if q.question_type == SC]
    ok, missing = [], []
    for q in sc:
        name = plan.input_name(q)
        assert name == q.file_name + "_swap"
        try:
            D.read_table(real_data, "html", name)
            ok.append(q.id)
        except D.MissingInputError as e:
            missing.append(q.id)
            assert f"{q.file_name}_swap.html" in str(e)
    assert (len(ok), sorted(missing)) == (393, [2960, 2961, 2962])
    assert all(plan.pairs[i].gold.strip() for i in ok)           # a non-empty gold reference for all 393
    original = plan_structure(real_data / "QA_final.json", tables="original")
    assert original.input_name(sc[0]) == sc[0].file_name


def test_qa_structure_pairs_through_qa_final_beside_it(real_data, tmp_path):
    plan = plan_structure(real_data / "QA_structure.json")
    qs = D.load_queries(real_data / "QA_structure.json")
    assert len(qs) == 396 and len(plan.pairs) == 396
    assert all(p.original_id is not None and p.pair_qa_file == "QA_final.json" for p in plan.pairs.values())
    assert plan.pairs[1].original_id == 31 and plan.pairs[1].gold == "164287"
    # pairs through QA_final, not into its own id space: consistency cannot come from this run
    st = plan.describe(qs[0])
    assert st["pair_in_run"] is False and st["table_file"] == "employment-table05_swap"
    # elsewhere, with no QA_final beside it, the parameter names it
    lone = tmp_path / "QA_structure.json"
    lone.write_bytes((real_data / "QA_structure.json").read_bytes())
    assert all(p.original_id is None for p in plan_structure(lone).pairs.values())
    given = plan_structure(lone, pair_qa_file=str(real_data / "QA_final.json"))
    assert given.pairs[1].original_id == 31


def test_qa_long_sc_questions_pair_within_their_own_file(real_data):
    plan = plan_structure(real_data / "QA_long.json")
    qs = {q.id: q for q in D.load_queries(real_data / "QA_long.json")}
    sc = [q for q in qs.values() if q.question_type == SC]
    assert len(sc) == 34 and all(plan.pairs[q.id].pair_qa_file == "QA_long.json" for q in sc)
    for q in sc:
        o = qs[plan.pairs[q.id].original_id]
        assert (o.file_name, o.question) == (q.file_name, q.question) and o.question_type != SC
        assert plan.describe(q)["pair_in_run"] is True
    assert sum(D.table_path(real_data, "html", plan.input_name(q)).is_file() for q in sc) == 10


# ---- pure scoring: both protocols on the record ---------------------------------------------------
def _sc_record(**kw) -> dict:
    st = {"protocol": "gold", "tables": "swap", "table_file": "t_swap", "pair_id": 5, "pair_qa_file": "QA_final.json",
          "pair_in_run": True, "gold": {"reference": "42"}, "consistency": {"reference": None}}
    rec = {"id": 9, "question_type": SC, "sub_qtype": SC, "status": "ok", "prediction": "41", "structure": st}
    rec.update(kw)
    return rec


def test_score_structure_gold_scored_consistency_unscored_until_the_original_exists():
    out = score_structure(_sc_record(), None)
    st = out["structure"]
    assert st["gold"]["score_status"] == "scored" and st["gold"]["scores"]["EM"] == 0.0
    assert st["consistency"]["score_status"] == "unscored"
    assert "id 5" in st["consistency"]["score_error"] and "no record" in st["consistency"]["score_error"]
    assert out["reference"] == "42" and out["scores"] == st["gold"]["scores"]
    failed = score_structure(_sc_record(), {"id": 5, "status": "oom"})
    assert "failed (oom)" in failed["structure"]["consistency"]["score_error"]
    done = score_structure(_sc_record(), {"id": 5, "status": "ok", "prediction": "41", "attempt": 2}, "consistency")
    c = done["structure"]["consistency"]
    assert c["score_status"] == "scored" and c["scores"]["EM"] == 100.0 and c["reference_attempt"] == 2
    assert done["structure"]["protocol"] == "consistency" and done["scores"]["EM"] == 100.0
    assert done["structure"]["gold"]["scores"]["EM"] == 0.0          # both kept
    err = score_structure(_sc_record(status="timeout"), None)
    assert err["score_status"] == "not_run" and err["structure"]["consistency"]["score_status"] == "not_run"


def test_tracker_fills_waiting_sc_records_when_the_original_is_logged():
    sc = dict(_sc_record(), **score_structure(_sc_record(), None))
    tracker = StructureTracker([sc])
    out = tracker.observe({"id": 5, "question_type": "Fact Checking", "status": "ok", "prediction": "41"})
    assert [r["id"] for r in out] == [5, 9]
    assert out[1]["structure"]["consistency"]["scores"]["EM"] == 100.0 and out[1]["scores"]["EM"] == 0.0
    assert tracker.pending() == []                                     # nothing left to fill


def test_aggregate_shows_sc_under_the_chosen_protocol_and_the_other():
    a = dict(_sc_record(), **score_structure(_sc_record(), {"id": 5, "status": "ok", "prediction": "41"}))
    b = dict(_sc_record(id=10), **score_structure(_sc_record(id=10), None))
    agg = aggregate([a, b])
    s = agg["structure"]
    assert s["protocol"] == "gold" and agg["by_type"][SC]["protocol"] == "gold"
    assert s["gold"]["EM"] == 0.0 and s["gold"]["scored"] == 2
    assert s["consistency"]["EM"] == 100.0 and (s["consistency"]["scored"], s["consistency"]["unscored"]) == (1, 1)


# ---- a run on the sample: _swap tables, consistency filled in, rescore both ways ---------------------
def _pair_sample(data: Path) -> dict[int, int]:
    """Make each sample SC question repeat an original of its table (as the real set does): SC id -> original."""
    qa = data / "QA_final.json"
    blob = json.loads(qa.read_text())
    pairs = {}
    for q in blob["queries"]:
        if q["QuestionType"] == SC:
            o = next(x for x in blob["queries"] if x["FileName"] == q["FileName"] and x["QuestionType"] == "Fact Checking")
            q["Question"], q["FinalAnswer"], q["ProcessedAnswer"] = o["Question"], "", ""
            pairs[q["id"]] = o["id"]
    qa.write_text(json.dumps(blob))
    return pairs


@pytest.fixture
def paired(tmp_path, sample_data):
    import shutil

    data = Path(shutil.copytree(sample_data, tmp_path / "data"))
    return data, _pair_sample(data)


def test_run_reads_swap_tables_and_fills_consistency_when_the_original_finishes(paired, tmp_path, tiny_backend):
    data, pairs = paired
    oracle = OracleBackend(tiny_backend, D.load_queries(data / "QA_final.json"))
    for sc, orig in pairs.items():              # a model that answers the swapped table as the original
        oracle.answers[sc] = oracle.answers[orig]
    sc_ids, orig_ids = sorted(pairs), sorted(set(pairs.values()))
    cfg = RunConfig(data_path=str(data), run_dir=str(tmp_path / "run"), format="csv", device="cpu",
                    ids=sc_ids, max_reasks=0)
    Job(cfg, backend=oracle, progress=False).execute()
    latest = view(read_log(tmp_path / "run").records)
    for i in sc_ids:
        r = latest[i]
        assert r["status"] == "ok" and r["table_file"].endswith("_swap")
        assert r["structure"]["gold"]["score_status"] == "scored" and r["reference"]
        assert r["structure"]["gold"]["scores"]["EM"] == 100.0 and r["structure"]["pair_id"] == pairs[i]
        assert r["structure"]["consistency"]["score_status"] == "unscored"
    # resume with the originals added: their predictions become the SC records' consistency references
    cfg2 = RunConfig(data_path=str(data), run_dir=str(tmp_path / "run"), format="csv", device="cpu",
                     ids=sc_ids + orig_ids, max_reasks=0)
    Job(cfg2, backend=oracle, progress=False).execute()
    latest = view(read_log(tmp_path / "run").records)
    for i in sc_ids:
        c = latest[i]["structure"]["consistency"]
        assert c["score_status"] == "scored" and c["reference"] == latest[pairs[i]]["prediction"]
        assert c["scores"]["EM"] == 100.0       # the oracle answers both the same
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    s = res["aggregates"]["structure"]
    assert s["protocol"] == "gold" and s["consistency"]["scored"] == len(sc_ids) and s["gold"]["scored"] == len(sc_ids)
    assert res["aggregates"]["by_type"][SC]["protocol"] == "gold"
    # rescore switches the chosen protocol and recomputes both
    rescore_run(tmp_path / "run", structure_reference="consistency")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["aggregates"]["structure"]["protocol"] == "consistency"
    assert res["aggregates"]["by_type"][SC]["EM"] == 100.0 and res["aggregates"]["paper"]["SC protocol"] == "consistency"
    latest = view(read_log(tmp_path / "run").records)
    assert all(latest[i]["structure"]["gold"]["score_status"] == "scored" for i in sc_ids)
    from hitbench_utils.__main__ import main

    assert main(["rescore", str(tmp_path / "run"), "--structure-reference", "gold"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["aggregates"]["structure"]["protocol"] == "gold" == res["aggregates"]["by_type"][SC]["protocol"]


def test_missing_swap_table_is_missing_input_naming_it(paired, tmp_path, tiny_backend):
    data, pairs = paired
    sc = min(pairs)
    name = next(q.file_name for q in D.load_queries(data / "QA_final.json") if q.id == sc)
    (data / "csv" / f"{name}_swap.csv").unlink()
    cfg = RunConfig(data_path=str(data), run_dir=str(tmp_path / "run"), format="csv", device="cpu", ids=[sc],
                    max_reasks=0, max_new_tokens=4)
    Job(cfg, backend=tiny_backend, progress=False).execute()
    r = view(read_log(tmp_path / "run").records)[sc]
    assert r["status"] == "missing_input" and f"{name}_swap.csv" in r["error"]
    # the ablation reads the original table
    cfg = RunConfig(data_path=str(data), run_dir=str(tmp_path / "run2"), format="csv", device="cpu", ids=[sc],
                    max_reasks=0, max_new_tokens=4, structure_tables="original")
    Job(cfg, backend=tiny_backend, progress=False).execute()
    r = view(read_log(tmp_path / "run2").records)[sc]
    assert r["status"] == "ok" and r["table_file"] == name and r["structure"]["tables"] == "original"


def test_rescore_gives_old_runs_sc_records_both_protocols(paired, tmp_path, tiny_backend):
    """A run folder from before SC pairing: no structure field, SC asked on the original tables."""
    data, pairs = paired
    oracle = OracleBackend(tiny_backend, D.load_queries(data / "QA_final.json"))
    for sc, orig in pairs.items():
        oracle.answers[sc] = oracle.answers[orig]
    ids = sorted(pairs) + sorted(set(pairs.values()))
    cfg = RunConfig(data_path=str(data), run_dir=str(tmp_path / "run"), format="csv", device="cpu", ids=ids,
                    max_reasks=0, structure_tables="original")
    Job(cfg, backend=oracle, progress=False).execute()
    log = tmp_path / "run" / "samples.jsonl"
    old = []
    for n, line in enumerate(log.read_text().splitlines()):
        obj = json.loads(line)
        if n == 0:
            obj["fingerprint"].pop("structure_tables", None)
        elif obj["question_type"] == SC:
            obj.pop("structure"), obj.pop("table_file")
            obj.update(reference="", scores={}, score_status="unscored", score_error="the reference answer is empty")
        old.append(json.dumps(obj))
    log.write_text("\n".join(old) + "\n")
    rescore_run(tmp_path / "run")
    latest = view(read_log(tmp_path / "run").records)
    for sc, orig in pairs.items():
        st = latest[sc]["structure"]
        assert st["tables"] == "original" and st["pair_id"] == orig
        assert st["gold"]["scores"]["EM"] == 100.0 and st["consistency"]["scores"]["EM"] == 100.0
        assert latest[sc]["score_status"] == "scored" and latest[sc]["reference"] == st["gold"]["reference"]
