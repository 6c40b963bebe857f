"""Splitting prompts into a shareable prefix and each question's own suffix, and the state of a question
being decoded.

Questions on one table share every token up to ``share_from`` (the prompt's suffix: everything after
the table), so a prompt is cut at the last token boundary before it, checked to tokenize identically on
its own. The key of the prefix text (and image) groups the questions that share it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import GenRequest, GenSettings


@dataclass
class Cut:
    """Where a prompt splits: its shareable prefix (``key`` names it, with its image) and its own tokens.
    Computed by ``cut`` in a preparation worker, so the GPU's thread does not tokenize whole tables."""

    key: str
    prefix_ids: list[int]
    suffix_ids: list[int]
    prefix_len: int          # prefix tokens, image tokens included


@dataclass
class _Split:
    req: GenRequest
    cut: Cut

    @property
    def key(self) -> str:
        return self.cut.key

    @property
    def prefix_ids(self) -> list[int]:
        return self.cut.prefix_ids

    @property
    def suffix_ids(self) -> list[int]:
        return self.cut.suffix_ids

    @property
    def prefix_len(self) -> int:
        return self.cut.prefix_len


@dataclass
class _Group:
    image: Any
    prefix_len: int
    members: list[_Split] = field(default_factory=list)

    def need(self, settings: GenSettings) -> int:
        """KV positions the longest question of the group can reach: prefix, suffix, answer."""
        return self.prefix_len + max(len(m.suffix_ids) + _cap(m, settings) for m in self.members) + 1


def split(be: Any, r: GenRequest, cache: dict[bytes, list[int]]) -> _Split | None:
    """The request and its cut: the one its preparation computed, else computed now."""
    c = r.cut if r.cut is not None else cut(be, r, cache)
    return None if c is None else _Split(r, c)


def cut(be: Any, r: GenRequest, cache: dict[bytes, list[int]]) -> Cut | None:
    """Cut a request at the last token boundary before ``share_from`` that tokenizes the same on its
    own; None when there is none (the request then runs plain). ``cache`` keeps recent prefixes'
    tokenizations (a table's further questions cut at the same text)."""
    if not r.share_from:
        return None
    text = be.chat_text(r.messages)
    cut = text.rfind(r.share_from)
    if cut <= 0:
        return None
    enc = be.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    k = next((i for i, (_, end) in enumerate(offs) if end > cut), len(ids))
    for _ in range(4):  # the cut must tokenize the same on its own
        if k <= 0:
            return None
        prefix_text = text[:offs[k - 1][1]]
        if _prefix_ids(be, prefix_text, cache) == ids[:k]:
            img = b"" if r.image is None else hashlib.sha1(r.image.tobytes()).digest() + repr(r.image.size).encode()
            key = hashlib.sha1(prefix_text.encode() + b"\0" + img).hexdigest()
            extra = max(0, (r.input_tokens or 0) - len(ids)) if r.image is not None else 0  # image tokens
            return Cut(key, ids[:k], ids[k:], k + extra)
        k -= 1
    return None


def _prefix_ids(be: Any, prefix_text: str, cache: dict[bytes, list[int]]) -> list[int]:
    """The prefix text's own tokenization. A table's further questions cut at the same text, so the
    last few are kept: the check then costs a comparison, not a second tokenization of the table."""
    h = hashlib.sha1(prefix_text.encode()).digest()
    ids = cache.pop(h, None)
    if ids is None:
        ids = be.tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    cache[h] = ids
    while len(cache) > 16:
        cache.pop(next(iter(cache)))
    return ids


@dataclass
class _Row:
    split: _Split
    n_input: int
    cap: int
    t0: float
    max_time: float | None
    tokens: list[int] = field(default_factory=list)
    timed_out: bool = False

    def add(self, tok: int, eos: Any, now: float | None = None) -> bool:
        """Take one sampled token; True when the row is finished."""
        if tok in eos:
            return True
        self.tokens.append(tok)
        if len(self.tokens) >= self.cap:
            return True
        if self.max_time and now is not None and now - self.t0 > self.max_time:
            self.timed_out = True
            return True
        return False


def _cap(m: _Split, settings: GenSettings) -> int:
    return min(settings.max_new_tokens, m.req.max_new_tokens or settings.max_new_tokens)
