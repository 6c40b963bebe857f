"""Data parallel on the CPU with the tiny model: dynamic claims, the merged view, resume with another
number of processes, and a rank killed mid-run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hitbench_utils.parallel import Claims
from hitbench_utils.backends.registry import backend_identity
from hitbench_utils.run import Job, run
from hitbench_utils.config import RunConfig
from hitbench_utils.runlog import RunLog, read_log, view
from hitbench_utils.status import summarize

BASE = dict(format="csv", max_new_tokens=4, max_reasks=0, score=False, device="cpu", progress=False, batch_size=2)


def one_record_per_id(run_dir: Path, n: int) -> list[dict]:
    recs = read_log(run_dir).records
    assert sorted(view(recs)) == sorted({r["id"] for r in recs}) and len(view(recs)) == n
    ok = [r["id"] for r in recs if r["status"] == "ok"]
    assert len(ok) == len(set(ok)) == n, "an id was answered twice"
    return recs


def test_claims_are_disjoint_shrink_and_a_dead_ranks_claims_are_taken_over(tmp_path):
    """A claim is at most n ids and at most half of what is left (per rank): big early, small late."""
    a, b = Claims(tmp_path, 0, start_wait=0), Claims(tmp_path, 1, start_wait=0)
    ids = list(range(1, 11))
    assert a.next(ids, 3, 3)[0] == [1, 2, 3]
    assert b.next(ids, 3, 3)[0] == [4, 5, 6]          # a's live claim is skipped
    assert a.next(ids, 3, 3)[0] == [7, 8]             # a finished early: it takes more (2 of the 4 left)
    assert a.next(ids, 3, 3)[0] == [9]
    a.close()                                          # a dies with 1-3 and 7-9 unfinished
    assert b.next(ids, 4, 3)[0] == [1, 2, 3]          # b takes them over (its own 4-6 stay its own)
    # done ids (ok in any log) are never claimed again
    log = RunLog.open(tmp_path, {"type": "header", "fingerprint": {}}, name="samples.rank1.jsonl")
    log.append({"id": 10, "status": "ok"})
    log.close()
    assert b.next(ids, 5, 3)[0] == [7]
    b.close()
    c = Claims(tmp_path, 0)                            # a later run, with any number of ranks
    assert c.next(ids, 20, 3, world=1)[0] == [1, 2, 3, 4]
    c.close()


def test_claims_sized_by_cost_give_the_heaviest_work_out_one_piece_at_a_time(tmp_path):
    """Largest first: the first claims are single heavy ids, later ones bundle many light ids."""
    cost = {1: 50.0, 2: 30.0, **{i: 1.0 for i in range(3, 23)}}          # total 100
    a, b = Claims(tmp_path, 0, start_wait=0), Claims(tmp_path, 1, start_wait=0)
    ids = list(range(1, 23))
    assert a.next(ids, 512, 3, world=2, cost=cost)[0] == [1]             # 50 > 100/4, but a claim takes one
    assert b.next(ids, 512, 3, world=2, cost=cost)[0] == [2]             # 30 > 50/4
    got = b.next(ids, 512, 3, world=2, cost=cost)[0]
    assert got == [3, 4, 5, 6, 7]                                          # 5 of the 20 light ones (20/4)
    # a claim does not end inside a prefix group: 8-11 share one, so the claim runs on to 11
    groups = {i: ("t", i) for i in ids} | {i: ("t", "g") for i in (8, 9, 10, 11)}
    assert b.next(ids, 512, 3, world=2, cost=cost, groups=groups)[0] == [8, 9, 10, 11]      # 15/4: 3, then 11
    assert b.next(ids, 512, 3, world=2, cost=cost)[0] == [12, 13]                          # without groups
    a.close()
    b.close()


def test_ranks_wait_for_each_other_to_be_ready_but_not_for_a_dead_one(tmp_path):
    """A rank that loads its model first would claim a large share alone: it waits for the others, at
    most ``start_wait``; a rank that died is not counted as ready."""
    a, b, c = Claims(tmp_path, 0), Claims(tmp_path, 1), Claims(tmp_path, 2)
    t0 = time.monotonic()
    assert a.wait_for_peers(2, timeout=0.5) == 1 and time.monotonic() - t0 >= 0.5       # b not ready yet
    b.ready_path.touch()
    t0 = time.monotonic()
    assert a.wait_for_peers(2, timeout=30) == 2 and time.monotonic() - t0 < 5
    c.ready_path.touch()
    c.close()                                           # ready, then died: not waited for
    assert not c.ready_path.exists() and a.wait_for_peers(3, timeout=0.3) == 2
    a.close()
    b.close()


def test_claim_order_puts_large_tables_first_and_charges_a_prefix_once(tmp_path, sample_data):
    """Each prefix group's questions are adjacent, largest table first, and only a group's first
    question carries the prefill: a table's further questions are cheap (its prefix is shared)."""
    from hitbench_utils.parallel import claim_order, question_cost

    job = Job(RunConfig(data_path=str(sample_data), run_dir=str(tmp_path / "r"),
                        **{k: v for k, v in BASE.items() if k != "progress"}))
    ids, cost, group = claim_order(job.queries, job.data_path, "csv", job.templates, job.config.max_input_tokens)
    assert sorted(ids) == sorted(q.id for q in job.queries) and set(cost) == set(ids)
    by_id = {q.id: q for q in job.queries}
    groups = [(by_id[i].file_name, job.templates.system(by_id[i])) for i in ids]
    assert groups == [group[i] for i in ids]
    runs = [g for k, g in enumerate(groups) if k == 0 or groups[k - 1] != g]
    assert len(runs) == len(set(groups)), "a prefix group is split in the claim order"
    sizes = [(sample_data / "csv" / f"{by_id[i].file_name}.csv").stat().st_size for i in ids]
    assert sizes == sorted(sizes, reverse=True)
    for k, i in enumerate(ids):
        first = k == 0 or groups[k - 1] != groups[k]
        assert cost[i] == question_cost(min(sizes[k] / 3.0, job.config.max_input_tokens), first)
    assert any(cost[ids[k]] < cost[ids[k - 1]] for k in range(1, len(ids)) if groups[k] == groups[k - 1])
    # the shape of the cost: more than linear in the prefix (attention), a further question far below a first
    base = question_cost(0, True)
    assert question_cost(100_000, True) - base > 2 * (question_cost(50_000, True) - base)
    assert question_cost(100_000, False) < question_cost(100_000, True) / 10


@pytest.mark.slow
def test_two_processes_merge_to_one_record_per_id_then_resume_with_one(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    s = run(data_path=str(sample_data), run_dir=str(run_dir), limit=16, num_processes=2, **BASE)
    assert s["verdict"] == "complete" and [r["returncode"] for r in s["ranks"]] == [0, 0], s
    logs = {p.name: [json.loads(x) for x in p.read_text().splitlines()[1:]] for p in run_dir.glob("samples.rank*.jsonl")}
    assert set(logs) == {"samples.rank0.jsonl", "samples.rank1.jsonl"} and all(logs.values())   # both ranks worked
    claims = [json.loads(x) for x in (run_dir / "claims.jsonl").read_text().splitlines()]
    claimed = [i for c in claims for i in c["ids"]]
    assert sorted(claimed) == sorted(set(claimed)) and len(claims) > 2   # shrinking claims, never overlapping
    one_record_per_id(run_dir, 16)
    # resume with one process over a bigger plan: only the 8 new ids run, into samples.jsonl
    s1 = run(data_path=str(sample_data), run_dir=str(run_dir), limit=24, **BASE)
    assert s1["verdict"] == "complete" and s1["total"] == 24
    assert len((run_dir / "samples.jsonl").read_text().splitlines()) == 1 + 8
    one_record_per_id(run_dir, 24)
    # and with two again: nothing left, nothing appended
    before = {p.name: p.stat().st_size for p in run_dir.glob("samples*.jsonl")}
    s2 = run(data_path=str(sample_data), run_dir=str(run_dir), limit=24, num_processes=2, **BASE)
    assert s2["verdict"] == "complete"
    assert {p.name: p.stat().st_size for p in run_dir.glob("samples*.jsonl")} == before


@pytest.mark.slow
def test_a_killed_rank_loses_only_its_in_flight_samples(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = run_dir / "launch.json"
    spec.write_text(json.dumps(dict(BASE, data_path=str(sample_data), run_dir=str(run_dir), limit=40, max_new_tokens=16)))
    procs = {}
    for r in (0, 1):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r))
        procs[r] = subprocess.Popen([sys.executable, "-m", "hitbench_utils", "worker", str(spec)], env=env,
                                    stdout=open(tmp_path / f"rank{r}.out", "w"), stderr=subprocess.STDOUT)
    log1 = run_dir / "samples.rank1.jsonl"
    t0 = time.monotonic()
    while not (log1.exists() and log1.read_text().count("\n") >= 2):      # header + one record
        assert procs[1].poll() is None and time.monotonic() - t0 < 300, (tmp_path / "rank1.out").read_text()[-2000:]
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGKILL)
    assert procs[1].wait() == -signal.SIGKILL
    assert procs[0].wait(timeout=600) == 0, (tmp_path / "rank0.out").read_text()[-2000:]
    claims = [json.loads(x) for x in (run_dir / "claims.jsonl").read_text().splitlines()]
    rank1_claimed = {i for c in claims if c["rank"] == 1 for i in c["ids"]}
    s = summarize(run_dir)
    # what is missing can only be work rank 1 held when it died (rank 0 takes over orphans it sees)
    assert set(s["missing_ids"]) <= rank1_claimed, (s["missing_ids"], rank1_claimed)
    done_by_1 = {json.loads(x)["id"] for x in log1.read_text().splitlines()[1:] if x.strip()}
    assert done_by_1 and not (done_by_1 & set(s["missing_ids"]))          # rank 1's finished work is kept
    from hitbench_utils.status import format_status
    assert all(str(i) in format_status(s) for i in s["missing_ids"][:20])  # status names what is missing
    # a resume with one process finishes the run; every id answered exactly once
    s2 = run(data_path=str(sample_data), run_dir=str(run_dir), limit=40, **dict(BASE, max_new_tokens=16))
    assert s2["verdict"] == "complete", s2
    one_record_per_id(run_dir, 40)


@pytest.mark.slow
@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import accelerate"]).returncode != 0, reason="accelerate is not installed")
def test_accelerate_launch_runs_the_same_workers(tmp_path, sample_data):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = run_dir / "launch.json"
    spec.write_text(json.dumps(dict(BASE, data_path=str(sample_data), run_dir=str(run_dir), limit=12)))
    # on a machine without GPUs, --multi_gpu still starts the processes (torchrun); the ranks need no GPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hitbench_utils", "worker", str(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert {x.name for x in run_dir.glob("samples.rank*.jsonl")} == {"samples.rank0.jsonl", "samples.rank1.jsonl"}
    assert summarize(run_dir)["verdict"] == "complete"
    one_record_per_id(run_dir, 12)


def test_num_processes_is_validated():
    from hitbench_utils.errors import ConfigError

    with pytest.raises(ConfigError, match="num_processes"):
        RunConfig(num_processes=0).validate()


def test_a_fleet_of_servers_gives_each_worker_its_own_url():
    from hitbench_utils.errors import ConfigError
    from hitbench_utils.parallel import worker_config

    fleet = "http://h1:8000/v1,http://h2:8000/v1"
    with pytest.raises(ConfigError, match="num_processes"):
        RunConfig(model="openai:m", base_url=fleet).validate()
    cfg = worker_config({"model": "openai:m", "base_url": fleet, "num_processes": 2}, 1, 1)
    assert cfg.base_url == "http://h2:8000/v1" and cfg.extra["base_url_fleet"] == fleet
    cfg.validate()
    # every worker's fingerprint is what the whole fleet serves (not its URL), so their logs stay one run
    from fake_openai import FakeOpenAI

    with FakeOpenAI(model="m") as a, FakeOpenAI(model="m") as b:
        fleet = f"{a.url},{b.url}"
        idents = [backend_identity(None, worker_config({"model": "openai:m", "base_url": fleet, "num_processes": 2},
                                                       r, 1))[0] for r in (0, 1)]
    assert idents[0] == idents[1] and idents[0]["served"]["id"] == "m" and "base_url" not in idents[0]
