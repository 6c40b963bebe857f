"""Structure Comprehending (SC) questions on the run side: the table they are asked on, the original
question each one repeats, and the hooks that keep their two references filled in (DESIGN.md §2).

An SC question is asked on the *swapped* table ``<FileName>_swap.<ext>`` (and its ``_swap`` image), unless
``structure_tables="original"`` (ablations). It pairs with one original question of QA_final by
(FileName, Question text); when a key repeats, the k-th SC question takes the k-th original. The gold
reference is that original's FinalAnswer; the consistency reference is the model's own prediction on it in
the same run, which the hooks below fill in as the original finishes (also on resume and at the run's end).
No torch here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .data import QA_FILES, Query, check_choice, load_queries
from .errors import ConfigError
from .scoring.structure import (SC_TYPE, STRUCTURE_REFERENCES, STRUCTURE_TABLES, gold_answer, score_structure,
                                structure_changed)

SWAP_SUFFIX = "_swap"
PAIR_QA_FILE = QA_FILES[0]     # QA_final.json: where every original question lives


@dataclass(frozen=True)
class Pair:
    """One SC question's partner: ``original_id`` in ``pair_qa_file``'s id space (None: no partner)."""

    original_id: int | None
    gold: str
    pair_qa_file: str
    why: str | None = None


def is_structure(q: Query) -> bool:
    return q.question_type == SC_TYPE


def pair_questions(sc: Iterable[Query], originals: Iterable[Query], pair_qa_file: str) -> dict[int, Pair]:
    """SC id -> Pair, by (FileName, Question); a key's k-th SC question pairs with its k-th original (the
    last one when the originals run out)."""
    by_key: dict[tuple[str, str], list[Query]] = {}
    for o in originals:
        if not is_structure(o):
            by_key.setdefault((o.file_name, o.question), []).append(o)
    used: dict[tuple[str, str], int] = {}
    out: dict[int, Pair] = {}
    for q in sc:
        key = (q.file_name, q.question)
        cands = by_key.get(key)
        if not cands:   # a stand-alone SC question (the sample's) is scored against its own answer, if any
            own = gold_answer(q.raw, q.reference)
            out[q.id] = Pair(None, own, pair_qa_file, f"no question of another type in {pair_qa_file} has this "
                             f"FileName ({q.file_name!r}) and Question text"
                             + ("; gold is its own answer" if own.strip() else ""))
            continue
        k = used.get(key, 0)
        used[key] = k + 1
        o = cands[min(k, len(cands) - 1)]
        out[q.id] = Pair(o.id, gold_answer(o.raw, o.reference), pair_qa_file)
    return out


def find_pair_file(qa_path: Path, pair_qa_file: str | os.PathLike | None, data_path: Path | None = None) -> Path | None:
    """The QA file the originals come from: ``pair_qa_file`` when given, else the run's own QA file when it is
    QA_final.json, else QA_final.json beside it (None when there is none)."""
    if pair_qa_file:
        p = Path(pair_qa_file)
        cands = [p] if p.is_absolute() else [p, qa_path.parent / p] + ([data_path / p] if data_path else [])
        for c in cands:
            if c.is_file():
                return c
        raise ConfigError("pair_qa_file", str(pair_qa_file), f"a QA file holding the original questions (e.g. "
                          f"{PAIR_QA_FILE} beside {qa_path})", "check the path, or leave it out to use QA_final.json")
    if qa_path.name == PAIR_QA_FILE:
        return qa_path
    beside = qa_path.parent / PAIR_QA_FILE
    return beside if beside.is_file() else None


@dataclass
class StructurePlan:
    """What a run needs to know about its SC questions (built once per run from its QA file)."""

    tables: str = "swap"
    reference: str = "gold"
    pairs: dict[int, Pair] | None = None
    run_qa_file: str = PAIR_QA_FILE

    def input_name(self, q: Query) -> str:
        """The file stem to read for ``q``'s table, image (and xlsx): ``<FileName>_swap`` for SC questions."""
        return q.file_name + SWAP_SUFFIX if self.tables == "swap" and is_structure(q) else q.file_name

    def describe(self, q: Query) -> dict | None:
        """The ``structure`` field a new SC record starts with (None for other questions)."""
        if not is_structure(q):
            return None
        pair = (self.pairs or {}).get(q.id) or Pair(None, "", PAIR_QA_FILE, "no QA_final.json to pair it through "
                                                    "(pass pair_qa_file)")
        return {"protocol": self.reference, "tables": self.tables, "table_file": self.input_name(q),
                "pair_id": pair.original_id, "pair_qa_file": pair.pair_qa_file,
                "pair_in_run": pair.original_id is not None and pair.pair_qa_file == self.run_qa_file,
                "pair_error": pair.why, "gold": {"reference": pair.gold}, "consistency": {"reference": None}}

    def start(self, rec, q: Query) -> None:
        """Hook for a new SampleRecord of ``q``: its table file and, for SC, its structure field and the gold
        reference (the consistency one is filled in by StructureTracker)."""
        rec.table_file = self.input_name(q)
        rec.structure = self.describe(q)
        if rec.structure is not None and self.reference == "gold":
            rec.reference = rec.structure["gold"]["reference"]


def plan_structure(qa_path: str | os.PathLike, *, tables: str = "swap", reference: str = "gold",
                   pair_qa_file: str | os.PathLike | None = None, data_path: str | os.PathLike | None = None
                   ) -> StructurePlan:
    """Pair every SC question of ``qa_path`` (the whole file, not the selection) with its original: within
    the file itself first (QA_long.json's SC questions repeat its own questions, so the consistency reference
    comes from the same run), then through ``pair_qa_file`` or QA_final.json beside it (QA_structure.json's).
    An explicit ``pair_qa_file`` is used for every SC question."""
    check_choice("structure_tables", tables, STRUCTURE_TABLES)
    check_choice("structure_reference", reference, STRUCTURE_REFERENCES)
    qa_path = Path(qa_path)
    own = load_queries(qa_path, warn=False)
    sc = [q for q in own if is_structure(q)]
    plan = StructurePlan(tables, reference, {}, qa_path.name)
    if not sc:
        return plan
    plan.pairs = {} if pair_qa_file else pair_questions(sc, own, qa_path.name)
    rest = [q for q in sc if q.id not in plan.pairs or plan.pairs[q.id].original_id is None]
    src = find_pair_file(qa_path, pair_qa_file, Path(data_path) if data_path else None) if rest else None
    if src is not None and (pair_qa_file or src.resolve() != qa_path.resolve()):
        other = pair_questions(rest, load_queries(src, warn=False), src.name)
        plan.pairs.update({i: p for i, p in other.items() if p.original_id is not None or i not in plan.pairs})
    elif rest and src is None:
        why = (f"no question of another type in {qa_path.name} repeats it, and there is no {PAIR_QA_FILE} "
               "beside it; pass pair_qa_file")
        plan.pairs.update({q.id: Pair(None, gold_answer(q.raw, q.reference), qa_path.name, why) for q in rest})
    return plan


class StructureTracker:
    """Run-loop hook: ``observe(record)`` returns the records to append, the record itself (its consistency
    reference filled in when its original is already logged) and then every logged SC record that was waiting
    on it, rescored. Built once from the records the log already holds (so resume fills old ones too)."""

    def __init__(self, records: Iterable[dict], protocol: str | None = None, score: bool = True) -> None:
        self.protocol, self.score = protocol, score
        self.latest: dict[int, dict] = {}
        self.waiting: dict[int, set[int]] = {}
        for r in records:
            self._remember(r)

    def _remember(self, r: dict) -> None:
        self.latest[int(r["id"])] = r
        st = r.get("structure")
        if isinstance(st, dict) and st.get("pair_in_run") and st.get("pair_id") is not None:
            self.waiting.setdefault(int(st["pair_id"]), set()).add(int(r["id"]))

    def original_of(self, r: dict) -> dict | None:
        st = r.get("structure") or {}
        return self.latest.get(int(st["pair_id"])) if st.get("pair_in_run") and st.get("pair_id") is not None else None

    def observe(self, record: dict) -> list[dict]:
        if self.score and record.get("structure"):
            record.update(score_structure(record, self.original_of(record), self.protocol))
        self._remember(record)
        out = [record]
        for sc_id in sorted(self.waiting.get(int(record["id"]), ())):
            old = self.latest.get(sc_id)
            if old is None or not self.score or not old.get("structure"):
                continue
            new = dict(old, **score_structure(old, record, self.protocol))
            if structure_changed(old, new):
                out.append(new)
                self.latest[sc_id] = new
        return out

    def pending(self) -> list[dict]:
        """Every SC record whose stored scores differ from what its original (as logged now) gives: what a
        run's end (or a resume with nothing to run) appends."""
        out = []
        for sc_id, old in sorted(self.latest.items()):
            if self.score and old.get("structure"):
                new = dict(old, **score_structure(old, self.original_of(old), self.protocol))
                if structure_changed(old, new):
                    out.append(new)
                    self.latest[sc_id] = new
        return out


def fill_structure(runlog, protocol: str | None = None) -> int:
    """Run-end hook: re-read every log of the run folder (all ranks), and append the SC records whose
    consistency (or protocol) changed to ``runlog``; returns how many. Call it before ``runlog.close()``."""
    from .runlog import read_log

    tracker = StructureTracker(read_log(runlog.run_dir).records, protocol)
    updates = tracker.pending()
    for r in updates:
        runlog.append(r)
    return len(updates)
