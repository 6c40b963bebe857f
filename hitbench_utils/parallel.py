"""Data parallel over processes (one per GPU): ranks claim work as they go, each appends to its own log.

- **Claims.** A rank takes the next chunk of runnable ids under a kernel lock on ``claims.lock`` and
  appends the claim to ``claims.jsonl``. An id is skipped while a *live* rank holds it; a rank's liveness
  is a lock it holds on its own file for as long as it runs. So a rank that finishes early simply claims
  more, and the unfinished claims of a rank that died are taken by the others. Claims are sized by an
  estimated cost and never split a prefix group (``claim_order``), and ranks start claiming together
  (``wait_for_peers``).
- **Logs.** Rank r appends to ``samples.rank<r>.jsonl``; ``runlog.read_log`` merges every
  ``samples*.jsonl``, and the view keeps one record per id. Resume works with any number of processes,
  one included: claims only hold while their owner lives, and what is done is read from the logs.
- **Launching.** ``num_processes=N`` starts N independent workers (``python -m hitbench_utils worker``)
  and waits for them; a worker that dies does not stop the others. ``accelerate launch -m
  hitbench_utils worker SPEC`` (several nodes, an accelerate config) works the same way, reading RANK,
  WORLD_SIZE and LOCAL_RANK; there, torchrun stops the whole group when one rank fails, and a rerun
  resumes.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import data as D
from .errors import ConfigError
from .runfolder import CLAIMS, SPEC, RunFolder
from .runlog import RunLock, attempts, read_log, runnable

log = logging.getLogger("hitbench")

START_WAIT_S = 120.0      # how long a ready rank waits for the others to load their models
POLL_S = 0.2             # how often a waiting rank looks for the others


# Relative cost of a question, in seconds of the 8B on an H100 (bench/results/throughput-*.json fits):
# a group's first question pays its prefix's prefill (quadratic: attention), a further one its suffix;
# each pays its decode. Only the ratios matter: they size the claims.
PREFILL = (0.022, 2.93e-5, 5.25e-10)
SUFFIX = (0.017, 3.57e-6)
DECODE_S = 0.115
BYTES_PER_TOKEN = 3.0          # html measured 2.8-3.3 bytes a token with the Qwen BPE


def question_cost(table_tokens: float, first_of_group: bool) -> float:
    """Why not the table's size per question: a table's further questions reuse its prefix, so ten
    questions on a 100K table cost a little more than one, not ten times as much."""
    p = max(0.0, table_tokens)
    if first_of_group:
        return PREFILL[0] + PREFILL[1] * p + PREFILL[2] * p * p + DECODE_S
    return SUFFIX[0] + SUFFIX[1] * p + DECODE_S


def claim_order(queries: list[Any], data_path: Path, fmt: str | None, templates: Any, max_input_tokens: int
                ) -> tuple[list[int], dict[int, float], dict[int, tuple[str, str]]]:
    """Ids largest table first, each prefix group's questions together, with a cost and a group per id.
    Claims sized by cost, largest first, let ranks finish close together; claims sized by count did not
    (an H100 pair: 1.34x, one rank holding the 17 largest questions). A group kept in one claim keeps
    its shared prefix in one rank; only its first question pays the prefill (``question_cost``)."""
    sizes: dict[str, int] = {}
    for q in queries:
        if q.file_name not in sizes:
            try:
                sizes[q.file_name] = D.table_path(data_path, fmt, q.file_name).stat().st_size
            except (OSError, TypeError, ValueError):
                sizes[q.file_name] = 0

    def system(q: Any) -> str:
        try:
            return templates.share_key(q)    # the system prompt and whatever precedes the table
        except ConfigError:          # the query's own record says so when it runs
            return ""

    group = {q.id: (q.file_name, system(q)) for q in queries}
    order = sorted(queries, key=lambda q: (-sizes[q.file_name], group[q.id], q.id))
    cost: dict[int, float] = {}
    seen: set[tuple[str, str]] = set()
    for q in order:
        tokens = min(sizes[q.file_name] / BYTES_PER_TOKEN, max_input_tokens)
        cost[q.id] = question_cost(tokens, group[q.id] not in seen)
        seen.add(group[q.id])
    return [q.id for q in order], cost, group


def split_groups(ids: list[int], groups: dict[int, Any]) -> list[list[int]]:
    """``ids`` (in claim order) cut into runs of one prefix group each: the unit the engine takes."""
    out: list[list[int]] = []
    for i in ids:
        if out and groups.get(i) == groups.get(out[-1][-1]):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def ranked_world() -> int:
    r = rank_from_env()
    return r[1] if r else 1


def rank_from_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as accelerate launch / torchrun / our launcher set them."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Claims:
    """One rank's view of the shared work list."""

    def __init__(self, run_dir: str | os.PathLike, rank: int, start_wait: float = START_WAIT_S) -> None:
        self.run_dir, self.rank, self.start_wait = Path(run_dir), rank, start_wait
        self.token = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        alive = RunFolder(self.run_dir).ranks
        alive.mkdir(exist_ok=True)
        self.alive_path = alive / f"{self.token}.alive"
        self._alive = os.open(self.alive_path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._alive, fcntl.LOCK_EX)         # held until this process ends, however it ends
        self.ready_path = alive / f"{self.token}.ready"
        self._started = False

    def wait_for_peers(self, world: int, timeout: float) -> int:
        """Mark this rank ready (its model loaded) and wait, at most ``timeout``, until ``world`` live ranks
        are: a rank that loads first would otherwise claim a large share before the others start. A rank
        that never gets ready (it died loading) is waited for no longer than that. Returns the ranks ready."""
        self.ready_path.touch()
        deadline = time.monotonic() + timeout
        while True:
            live: dict[str, bool] = {}
            marks = [p for p in RunFolder(self.run_dir).ranks.glob("*.ready") if self._live(p.name[:-len(".ready")], live)]
            ready = len(marks)
            if ready >= world or time.monotonic() >= deadline:
                break
            time.sleep(POLL_S)
        if ready >= world:       # start together: the last rank ready would otherwise lead by up to a poll
            last = max((m.stat().st_mtime for m in marks if m.exists()), default=time.time())
            time.sleep(min(max(0.0, last + 1.5 * POLL_S - time.time()), 2 * POLL_S))
        if ready < world:
            log.warning("rank %d: %d of %d ranks ready after %.0f s; starting without the rest", self.rank, ready,
                        world, timeout)
        return ready

    def close(self) -> None:
        if self._alive is not None:
            self.ready_path.unlink(missing_ok=True)
            self.alive_path.unlink(missing_ok=True)
            os.close(self._alive)
            self._alive = None

    def _live(self, token: str, cache: dict[str, bool]) -> bool:
        if token == self.token:
            return True
        if token not in cache:
            try:
                fd = os.open(RunFolder(self.run_dir).ranks / f"{token}.alive", os.O_RDWR)
            except FileNotFoundError:
                cache[token] = False
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    cache[token] = False                  # nobody holds it: its owner is gone
                except BlockingIOError:
                    cache[token] = True
                finally:
                    os.close(fd)
        return cache[token]

    def held(self) -> set[int]:
        """Ids claimed by ranks that are still running (this one included)."""
        out: set[int] = set()
        live: dict[str, bool] = {}
        path = self.run_dir / CLAIMS
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    c = json.loads(line)
                except json.JSONDecodeError:
                    continue                                # a torn claim line: its owner died writing it
                if self._live(c.get("owner", ""), live):
                    out.update(int(i) for i in c.get("ids", []))
        return out

    def next(self, ids: list[int], n: int, max_attempts: int, world: int = 1,
             cost: dict[int, float] | None = None, groups: dict[int, Any] | None = None
             ) -> tuple[list[int], dict[int, int]]:
        """Claim runnable ids, in ``ids`` order, that no live rank holds: at most ``n``, and at most
        1/(2·world) of the work left, counted in ``cost`` (or in ids), so claims shrink as the run
        ends (guided self-scheduling) and ranks finish close together. A claim does not end inside a
        group (ids sharing a prefix): split, both ranks would compute the prefix. Also return attempts."""
        if not self._started:
            self._started = True
            if world > 1:
                self.wait_for_peers(world, self.start_wait)
        with self.exclusive():
            records = read_log(self.run_dir).records
            taken = self.held()
            free = [i for i in runnable(ids, records, max_attempts) if i not in taken]
            weight = (lambda i: cost.get(i, 1.0)) if cost else (lambda i: 1.0)
            share = sum(weight(i) for i in free) / (2 * world)
            pick: list[int] = []
            acc = 0.0
            for i in free[:n]:
                same = groups is not None and bool(pick) and groups.get(i) == groups.get(pick[-1])
                if pick and acc + weight(i) > share and not same:
                    break
                pick.append(i)
                acc += weight(i)
            if pick:
                line = json.dumps({"owner": self.token, "rank": self.rank, "ids": pick, "t": time.time()})
                with open(self.run_dir / CLAIMS, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            return pick, attempts(records)

    def chunks(self, ids: list[int], n: int, max_attempts: int, world: int = 1, cost: dict[int, float] | None = None,
               groups: dict[int, Any] | None = None) -> Iterator[tuple[list[int], dict[int, int]]]:
        while True:
            pick, tries = self.next(ids, n, max_attempts, world, cost, groups)
            if not pick:
                return
            yield pick, tries

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """For writes every rank makes (plan.json, results.json)."""
        with _flock(RunFolder(self.run_dir).claims_lock):
            yield


def launch(job: Any) -> dict:
    """Start ``num_processes`` workers on this machine, wait for all, and summarise the merged run."""
    from .status import summarize

    cfg, run_dir = job.config, Path(job.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(cfg.to_dict(), run_dir=str(run_dir), data_path=str(job.data_path), num_processes=1)
    (run_dir / SPEC).write_text(json.dumps(spec, indent=1, default=str))
    n = cfg.num_processes
    t0 = time.time()
    with RunLock(run_dir):                # no single-process run of this folder meanwhile
        procs = []
        for r in range(n):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r))
            out = open(RunFolder(run_dir).rank_output(r), "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "hitbench_utils", "worker", str(run_dir / SPEC)],
                                           env=env, stdout=out, stderr=subprocess.STDOUT), out))
            log.info("rank %d: pid %d, output %s", r, procs[-1][0].pid, RunFolder(run_dir).rank_output(r))
        codes = []
        for p, out in procs:
            codes.append(p.wait())
            out.close()
    for r, rc in enumerate(codes):
        if rc != 0:
            log.warning("rank %d exited with %s (see %s); the other ranks finished its unclaimed and orphaned "
                        "work; resume to retry anything still missing", r, rc, RunFolder(run_dir).rank_output(r))
    summary = summarize(run_dir)
    summary["ranks"] = [{"rank": r, "returncode": rc, "output": str(RunFolder(run_dir).rank_output(r))} for r, rc in enumerate(codes)]
    summary["wall_s"] = round(time.time() - t0, 1)
    if summary.get("missing_ids"):
        log.warning("missing ids after all ranks ended: %s", summary["missing_ids"][:50])
    return summary


def worker_config(spec: dict, rank: int, local_rank: int) -> Any:
    """The run's config (``launch.json``'s parameters) for one rank: its own GPU when there are several,
    its own server when ``base_url`` names a fleet."""
    from .config import RunConfig

    cfg = RunConfig(**{k: v for k, v in spec.items() if k in RunConfig.__dataclass_fields__})
    cfg.num_processes, cfg.resume, cfg.overwrite = 1, True, False
    if cfg.base_url and "," in cfg.base_url:      # one server per worker: worker r takes the r-th URL
        urls = [u.strip() for u in cfg.base_url.split(",") if u.strip()]
        cfg.extra = dict(cfg.extra, base_url_fleet=cfg.base_url)   # the fingerprint names the whole fleet
        cfg.base_url = urls[rank % len(urls)]
    if cfg.device in ("auto", "cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                cfg.device = f"cuda:{local_rank % torch.cuda.device_count()}"
        except ImportError:  # pragma: no cover
            pass
    return cfg
