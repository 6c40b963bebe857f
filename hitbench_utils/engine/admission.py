"""Admission: a pull's groups from their prefixes into the decode pools (``PrefixEngine``'s prefill side).

Each question is admitted by the backend (one it refuses falls back alone). Prefixes are computed once a
group, its first question riding along: neighbouring short text prefixes share one packed pass
(``packs``, ``runner.prefixes``), any other runs alone through the model's own forward. A group's further
questions then go in packed passes over its prefix (``runner.prefill_group``), as many as the pool has
free slots, and each question starts decoding with its first token. A failure sends only the questions
it touched to the plain engine; an OOM in a prefix is retried once after the memory is freed.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

from ..backends.base import GenRequest, GenResult, GenSettings
from ..errors import status_of
from ..records import Degradation
from .batching import free_memory, release_frames, sync
from .kv_pool import KVPool
from .prefixes import _Group, _Row, _Split, _cap, split
from .pools import prefix_pass_bytes
from .sampling import pick

log = logging.getLogger("hitbench")

Outcomes = Iterator[tuple[GenRequest, GenResult | BaseException, list[Degradation]]]

SUFFIX_TOKENS = 4096       # suffix tokens packed into one pass (its MLP activations: 4096 x 24576 on the 8B)
PACK_TOKENS = 16384        # prompt tokens of short prefixes packed into one prefill pass


class Admission:
    """The prefill side of ``PrefixEngine`` (a mixin: the pools, decode steps and fallbacks are its)."""

    def _run_groups(self, groups: list["_Group"], settings: GenSettings) -> Outcomes:
        """A pull's groups: each question admitted by the backend (one it refuses falls back alone), then
        the prefixes, packed where short (``packs``), then each group's questions into the pools."""
        for g in groups:
            admitted = []
            for m in g.members:
                try:
                    self.backend.admit([m.req])
                    admitted.append(m)
                except Exception as e:  # noqa: BLE001
                    yield from self._fallback([m], e, settings)
            g.members = admitted
        groups = [g for g in groups if g.members]
        self._pull_tokens = max(map(prompt_tokens, groups), default=0)
        for pack in packs(groups, self.pack_tokens):
            yield from self._prefix_room(pack, settings)
            t0 = time.perf_counter()
            done = self._packed_prefixes(pack)
            for g in pack:          # each cache goes once its group is in (popped, not kept by the list)
                yield from self._run_group(g, settings, done.pop(0), t0)

    def _prefix_room(self, pack: list["_Group"], settings: GenSettings) -> Outcomes:
        """Pools freed (idle ones first, then the largest drained) until the device holds the pack's
        prefill pass: pools sized beside a shorter prefix can leave too little for a longer one, and an
        out-of-memory error there costs every pool's drain, or a fallback."""
        per_tok = self.runner.shape.bytes_per_token()
        need = prefix_pass_bytes(sum(map(prompt_tokens, pack)), per_tok)
        while self.pools:
            free = self._free_bytes()
            if free is None or free >= need:
                return
            self.stats["prefix_room_frees"] += 1
            yield from self._free_a_pool(settings)

    def _packed_prefixes(self, pack: list["_Group"]) -> list[Any]:
        """The pack's prefixes in one pass; a pack that fails gets Nones: each group then computes its
        own, with a single prefix's failure handling (a pool drop on OOM, else the plain engine)."""
        if len(pack) < 2:
            return [None] * len(pack)
        try:
            return self._prefix(pack)
        except Exception as e:  # noqa: BLE001
            release_frames(e)
            free_memory()
            log.info("packed prefill of %d prefixes failed (%s: %s): each runs alone", len(pack),
                     type(e).__name__, str(e)[:200])
            return [None] * len(pack)

    def _run_group(self, g: "_Group", settings: GenSettings, pre: Any = None, t_group: float | None = None
                   ) -> Outcomes:
        """One group: its prefix (``pre``, computed with others, or now), then each question in a pool."""
        t_group = time.perf_counter() if t_group is None else t_group
        try:
            cache, P, delta, first_logits = pre or self._prefix([g])[0]
            pre = None
        except Exception as e:  # noqa: BLE001
            if status_of(e) != "oom":
                yield from self._fallback(g.members, e, settings)
                return
            release_frames(e)
            self.stats["prefix_retries"] += 1
            log.info("a %d-token prefix ran out of memory%s: retried alone", g.prefix_len, self._memory_note())
            if self.pools:
                yield from self._drop_all(settings)     # the pools' memory is what the prefix lacked
            free_memory()               # a failed pass's tensors can outlive it in reference cycles
            try:
                cache, P, delta, first_logits = self._prefix([g])[0]
            except Exception as e2:  # noqa: BLE001
                yield from self._fallback(g.members, e2, settings)
                return
        g.prefix_len = P          # an image prefix: the processor's count is the real one
        need, first, rest = g.need(settings), g.members[0], g.members[1:]
        try:
            pool = yield from self._pool_with_room(need, P, None, settings)
        except Exception as e:  # noqa: BLE001 - e.g. no memory for even one slot of this length
            del cache
            yield from self._fallback(g.members, e, settings)
            return
        rid = self._add(pool)          # the first question's suffix rode along in the prefix forward
        n = P + len(first.suffix_ids)
        self.runner.load(pool, rid, cache, n, n + delta)
        yield from self._start(pool, [first], [rid], pick(first_logits[None].float(), settings, self._gen).tolist(), t_group)
        while rest:
            try:
                pool = yield from self._pool_with_room(need, P, pool, settings)
            except Exception as e:  # noqa: BLE001
                yield from self._fallback(rest, e, settings)
                break
            k, tokens = 0, 0
            while k < min(len(rest), pool.room) and (k == 0 or tokens + len(rest[k].suffix_ids) <= SUFFIX_TOKENS):
                tokens += len(rest[k].suffix_ids)
                k += 1
            batch, rest = rest[:k], rest[k:]
            yield from self._suffixes(pool, batch, cache, P, delta, settings)
        del cache

    def _suffixes(self, pool: KVPool, batch: list[_Split], cache: Any, P: int, delta: int, settings: GenSettings
                  ) -> Outcomes:
        """Further questions of a group in one packed pass over its prefix; a failed pass of several
        retries them one by one, so only a question that fails alone falls back to plain batches."""
        rids = [self._add(pool) for _ in batch]
        t0 = time.perf_counter()
        try:
            logits = self.runner.prefill_group(pool, rids, cache, P, [m.suffix_ids for m in batch], P + delta)
            toks = pick(logits.float(), settings, self._gen).tolist()
            sync(self.backend.device)
        except Exception as e:  # noqa: BLE001
            for rid in rids:
                if rid in self.pools.home:
                    self.pools.release(rid)
            if len(batch) == 1:
                yield from self._fallback(batch, e, settings)
                return
            release_frames(e)
            free_memory()
            for m in batch:
                if pool not in self.pools:
                    yield from self._plain([m], settings)
                else:
                    yield from self._suffixes(pool, [m], cache, P, delta, settings)
            return
        dt = time.perf_counter() - t0
        st = self.stats
        st["suffix_passes"] += 1
        st["suffix_rows"] += len(batch)
        st["suffix_tokens"] += sum(len(m.suffix_ids) for m in batch)
        st["suffix_s"] += dt
        st["suffix_times"].append((P, len(batch), round(dt, 4)))
        yield from self._start(pool, batch, rids, toks, t0)

    def _add(self, pool: KVPool) -> int:
        """A new request handle, holding a slot of ``pool``."""
        rid, self._next_rid = self._next_rid, self._next_rid + 1
        self.pools.admit(pool, rid)
        return rid

    def _start(self, pool: KVPool, batch: list[_Split], rids: list[int], toks: list[int], t0: float) -> Outcomes:
        """Rows for questions whose prompt is in ``pool``, each with its first token."""
        for m, rid, tok in zip(batch, rids, toks):
            row = _Row(m, pool.length_of(rid), _cap(m, self._settings), t0, self._settings.max_time)
            self.rows[rid] = row
            if row.add(tok, self.backend.eos_ids):
                yield self._finish(rid)
            else:
                pool.start(rid, tok)

    def _prefix(self, groups: list["_Group"]) -> list[tuple[Any, int, int, Any]]:
        """Each group's prefix cache, its length, rope delta and first question's logits, in one pass: a
        group alone by the model's own forward, a pack of short text prefixes by the runner's packed pass."""
        t0 = time.perf_counter()
        if len(groups) == 1:
            out = [self.runner.prefix(groups[0].members[0], groups[0].image)]
        else:
            out = self.runner.prefixes([g.members[0] for g in groups])
        sync(self.backend.device)
        dt, lengths = time.perf_counter() - t0, [P for _, P, _, _ in out]
        for k, v in (("groups", len(groups)), ("prefix_passes", 1), ("prefix_tokens", sum(lengths)), ("prefill_s", dt)):
            self.stats[k] += v
        self.stats["prefix_times"].append((lengths, round(dt, 4)))
        return out

    def _group(self, requests: list[GenRequest]) -> tuple[dict[str, _Group], list[GenRequest]]:
        groups: dict[str, _Group] = {}
        plain: list[GenRequest] = []
        for r in requests:
            s = split(self.backend, r, self._tokenized)
            if s is None:
                plain.append(r)
                continue
            g = groups.setdefault(s.key, _Group(r.image, s.prefix_len))
            g.members.append(s)
        return groups, plain


def prompt_tokens(g: "_Group") -> int:
    """Tokens of a group's first whole prompt (its prefix pass)."""
    return len(g.members[0].prefix_ids) + len(g.members[0].suffix_ids)


def packs(groups: list["_Group"], pack_tokens: int) -> list[list["_Group"]]:
    """Neighbouring text groups whose first prompts together fit ``pack_tokens`` share one prefill pass;
    an image group, or a longer prompt, runs alone."""
    out: list[list[_Group]] = []
    total = 0
    for g in groups:
        n = prompt_tokens(g)
        if g.image is None and out and out[-1][0].image is None and total + n <= pack_tokens:
            out[-1].append(g)
            total += n
        else:
            out.append([g])
            total = n
    return out
