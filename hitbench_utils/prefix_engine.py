"""Shared-prefix KV reuse: compute each (task prompt + table [+ image]) prefix once, then decode all of
its questions together from copies of that cache.

Questions on one table share every token up to the question (DESIGN.md §3), so the prefix is cut at the
last token boundary before the question text, checked to tokenize identically on its own. Requests whose
prefix cannot be split cleanly, or whose group fails, fall back to the plain batched engine, so the
guarantees of ``Engine`` (failure isolation, the OOM split) still hold.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from .backends.base import GenRequest, GenResult, GenSettings
from .engine import Engine, free_memory, release_frames

log = logging.getLogger("hitbench")


def _cache_kw(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both spellings."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class _Split:
    req: GenRequest
    prefix_text: str
    suffix_ids: list[int]
    key: str


@dataclass
class _Group:
    prefix_text: str
    image: Any
    members: list[_Split] = field(default_factory=list)


class PrefixEngine(Engine):
    """An ``Engine`` for local HF models that shares prefix KV caches across questions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stats = {"groups": 0, "batches": 0, "prefix_tokens": 0, "prefill_s": 0.0, "suffix_tokens": 0,
                      "decode_steps": 0, "decode_rows": 0, "decode_s": 0.0}

    def run(self, requests: list[GenRequest], settings: GenSettings
            ) -> Iterator[tuple[GenRequest, GenResult | BaseException, list[str]]]:
        groups, plain = self._group(requests)
        if plain:
            yield from super().run(plain, settings)
        for g in sorted(groups.values(), key=lambda g: -len(g.prefix_text)):
            step = self._suffix_batch(g)
            for i in range(0, len(g.members), step):
                batch = g.members[i:i + step]
                try:
                    results = self._generate_group(g, batch, settings)
                except Exception as e:  # noqa: BLE001 - fall back to the plain engine, which isolates failures
                    release_frames(e)
                    free_memory()
                    log.warning("shared-prefix batch of %d failed (%s): falling back to plain batches",
                                len(batch), type(e).__name__)
                    for r, res, steps in super().run([m.req for m in batch], settings):
                        yield r, res, ["prefix sharing off after " + type(e).__name__] + steps
                    continue
                for m, res in zip(batch, results):
                    yield m.req, res, []

    def _suffix_batch(self, g: _Group) -> int:
        """Questions decoded together from one prefix: batch_size, fewer when their caches get large."""
        tokens = max(1, len(g.prefix_text) // 3)
        return max(1, min(self.batch_size, self.token_budget // tokens if self.token_budget else self.batch_size))

    # ---- splitting prompts into prefix + suffix ------------------------------------------------------
    def _group(self, requests: list[GenRequest]) -> tuple[dict[str, _Group], list[GenRequest]]:
        groups: dict[str, _Group] = {}
        plain: list[GenRequest] = []
        for r in requests:
            s = self._split(r)
            if s is None:
                plain.append(r)
                continue
            g = groups.setdefault(s.key, _Group(s.prefix_text, r.image))
            g.members.append(s)
        return groups, plain

    def _split(self, r: GenRequest) -> _Split | None:
        if not r.share_from:
            return None
        be = self.backend
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
            if be.tokenizer(prefix_text, add_special_tokens=False)["input_ids"] == ids[:k]:
                img = b"" if r.image is None else hashlib.sha1(r.image.tobytes()).digest() + repr(r.image.size).encode()
                key = hashlib.sha1(prefix_text.encode() + b"\0" + img).hexdigest()
                return _Split(r, prefix_text, ids[k:], key)
            k -= 1
        return None

    # ---- one prefix, several questions ---------------------------------------------------------------
    def _generate_group(self, g: _Group, batch: list[_Split], settings: GenSettings) -> list[GenResult]:
        import torch
        from transformers import DynamicCache

        be, model = self.backend, self.backend.model
        dev = be.device
        t0 = time.perf_counter()
        inputs = be.processor(text=[g.prefix_text], images=[g.image] if g.image is not None else None,
                              return_tensors="pt").to(dev)
        P = inputs["input_ids"].shape[1]
        inner = getattr(model, "model", model)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None
        with torch.inference_mode():
            prefix_cache = DynamicCache()
            model(**inputs, **{_cache_kw(model): prefix_cache}, use_cache=True, logits_to_keep=1)
            _sync(dev)
            self.stats["groups"] += 1
            self.stats["prefix_tokens"] += P
            self.stats["prefill_s"] += time.perf_counter() - t0
            delta = 0
            if g.image is not None:
                rd = getattr(inner, "rope_deltas", None)
                if rd is None:
                    raise RuntimeError("the model did not expose rope_deltas for an image prefix")
                delta = int(rd.reshape(-1)[0].item())
            results = self._decode(prefix_cache, P, delta, batch, settings)
        dt = time.perf_counter() - t0
        for res in results:
            res.seconds = dt / len(batch)
        return results

    def _decode(self, prefix_cache: Any, P: int, delta: int, batch: list[_Split], settings: GenSettings
                ) -> list[GenResult]:
        import torch
        from transformers import DynamicCache

        be, model, dev = self.backend, self.backend.model, self.backend.device
        B = len(batch)
        S = max(len(m.suffix_ids) for m in batch)
        pad = be.pad_id if be.pad_id is not None else 0
        ids = torch.full((B, S), pad, dtype=torch.long, device=dev)
        smask = torch.zeros((B, S), dtype=torch.long, device=dev)
        for i, m in enumerate(batch):   # left-pad: the pads sit between the prefix and each suffix, masked
            ids[i, S - len(m.suffix_ids):] = torch.tensor(m.suffix_ids, device=dev)
            smask[i, S - len(m.suffix_ids):] = 1
        ck = _cache_kw(model)
        cache = DynamicCache()
        for li, layer in enumerate(prefix_cache.layers):
            cache.update(layer.keys.repeat_interleave(B, 0), layer.values.repeat_interleave(B, 0), li)
        amask = torch.cat([torch.ones((B, P), dtype=torch.long, device=dev), smask], dim=1)
        pos = P + delta + (smask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=amask, position_ids=pos.unsqueeze(0).expand(3, B, S),
                    **{ck: cache}, cache_position=torch.arange(P, P + S, device=dev), use_cache=True,
                    logits_to_keep=1)
        nxt = pos[:, -1] + 1
        _sync(dev)
        t_dec = time.perf_counter()
        self.stats["batches"] += 1
        self.stats["suffix_tokens"] += int(smask.sum())
        caps = [min(settings.max_new_tokens, m.req.max_new_tokens or settings.max_new_tokens) for m in batch]
        eos = torch.tensor(sorted(be.eos_ids), device=dev)
        gen = torch.Generator(device=dev).manual_seed(settings.seed) if not settings.greedy else None
        tokens: list[list[int]] = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        deadline = time.perf_counter() + settings.max_time if settings.max_time else None
        timed_out = False
        for t in range(max(caps)):
            tok = _pick(out.logits[:, -1, :].float(), settings, gen)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            hit_eos = torch.isin(tok, eos)
            for i, v in enumerate(tok.tolist()):
                if not done[i] and not hit_eos[i]:
                    tokens[i].append(v)
            done = done | hit_eos | torch.tensor([len(tokens[i]) >= caps[i] for i in range(B)], device=dev)
            if bool(done.all()):
                break
            if deadline and time.perf_counter() > deadline:
                timed_out = True
                break
            amask = torch.cat([amask, torch.ones((B, 1), dtype=torch.long, device=dev)], dim=1)
            out = model(input_ids=tok[:, None], attention_mask=amask, position_ids=nxt.view(1, B, 1).expand(3, B, 1),
                        **{ck: cache}, cache_position=torch.tensor([P + S + t], device=dev), use_cache=True)
            nxt = nxt + 1
        _sync(dev)
        self.stats["decode_s"] += time.perf_counter() - t_dec
        self.stats["decode_steps"] += t + 1
        self.stats["decode_rows"] += B * (t + 1)
        results = []
        for i, m in enumerate(batch):
            text = be.tokenizer.decode(tokens[i], skip_special_tokens=True)
            results.append(GenResult(text=text, output_tokens=len(tokens[i]), input_tokens=P + len(m.suffix_ids),
                                     timed_out=timed_out and not bool(done[i])))
        return results


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _pick(logits: Any, settings: GenSettings, gen: Any) -> Any:
    """Greedy argmax, or temperature / top-k / top-p sampling (the old scripts' settings)."""
    import torch

    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k and settings.top_k > 0:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p and settings.top_p < 1:
        srt, idx = logits.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) > settings.top_p
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
