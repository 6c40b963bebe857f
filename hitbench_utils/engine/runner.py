"""The model runner: the text decoder's passes over a ``KVPool``, and the decode step's CUDA graphs.

- ``prefix``: the model's own forward over a group's first whole prompt (images enter only here);
- ``prefixes``: short text prefixes of several groups (each with its first question) in one packed pass;
- ``load``: a prefix's cache copied into a request's slot;
- ``prefill_group``: all of a group's further questions in one packed pass over its prefix, and its
  keys and values in its own slot;
- ``prefill``: tokens after those already in one slot (eager);
- ``step``: one decode token for every busy slot of a pool, replayed as one CUDA graph per (pool, step
  size); each live pool keeps its graphs, in a memory pool of their own, until it is dropped.

Both packed passes (``_packed``) run the projections and MLP once over all their tokens; each sequence
attends to its own earlier keys and its new tokens (one flash-attention call each). The passes use the
model's own modules (projections, norms, rotary embedding, MLP, head), so the
weights and the arithmetic are the model's; only the attention is ours (``attention``).
"""
from __future__ import annotations

import time
from itertools import accumulate
from typing import Any, Hashable

from .attention import attend, attend_after, fuse_projections, norm, rope, text_model
from .kv_pool import KVPool, KVShape, LayerKV, PrefixKV

CHUNK = 1024          # keys read by a slot prefill: whole chunks, masked past the slot's length


class ModelRunner:
    """Model execution for the shared-prefix engine; the scheduler decides what runs, this runs it."""

    def __init__(self, backend: Any, graphs: bool) -> None:
        self.backend, self.model = backend, backend.model
        tm = self.tm = text_model(self.model)
        cfg = tm.config
        self.layers = list(tm.layers)
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.groups = self.nh // self.kvh
        self.device = str(backend.device)
        self.fused = [fuse_projections(layer) for layer in self.layers]
        self.use_graphs = graphs
        self.capture_s = 0.0
        self._graphs: dict[KVPool, dict[int, tuple[Any, Any]]] = {}   # pool -> step size -> (graph, its logits)
        self._mempools: dict[KVPool, Any] = {}                         # pool -> its graphs' memory pool

    @property
    def shape(self) -> KVShape:
        return KVShape(len(self.layers), self.kvh, self.hd, self.tm.embed_tokens.weight.dtype)

    def new_pool(self, slots: int, length: int) -> KVPool:
        return KVPool(self.shape, slots, length, self.device)

    def drop_graphs(self, pool: KVPool | None = None) -> None:
        """A pool's graphs read its memory: they go with it, and so does their memory pool (graphs of
        two pools in one memory pool broke every pool after the first on an H200). No pool: all."""
        if pool is None:
            self._graphs, self._mempools = {}, {}
        else:
            self._graphs.pop(pool, None)
            self._mempools.pop(pool, None)

    def graphs_of(self, pool: KVPool) -> int:
        return len(self._graphs.get(pool, ()))

    # ---- prompts --------------------------------------------------------------------------------------
    def prefix(self, first: Any, image: Any) -> tuple[Any, int, int, Any]:
        """The model's own forward over a group's first question's whole prompt: the shared prefix's
        cache (a ``DynamicCache``), its length ``P``, the image's rope delta, and that question's
        first-token logits, in one pass."""
        import torch
        from transformers import DynamicCache

        be, model = self.backend, self.model
        if image is None:    # already tokenized by the split: no second pass through the processor
            ids = torch.tensor([first.prefix_ids + first.suffix_ids], device=self.device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
            inputs = be.processor(text=[be.chat_text(first.req.messages)], images=[image], return_tensors="pt").to(self.device)
        P = inputs["input_ids"].shape[1] - len(first.suffix_ids)
        inner = getattr(model, "model", model)
        if hasattr(inner, "rope_deltas"):
            inner.rope_deltas = None
        cache = DynamicCache()
        with torch.no_grad():
            logits = model(**inputs, **{cache_kw(model): cache}, use_cache=True, logits_to_keep=1).logits[0, -1]
        delta = 0
        if image is not None:
            rd = getattr(inner, "rope_deltas", None)
            if rd is None:
                raise RuntimeError("the model did not expose rope_deltas for an image prefix")
            delta = int(rd.reshape(-1)[0].item())
        return cache, P, delta, logits

    def prefixes(self, firsts: list[Any]) -> list[tuple[PrefixKV, int, int, Any]]:
        """What ``prefix`` gives, for several text groups at once: each first question's whole prompt
        (prefix and suffix) packed into one pass, each attending causally to itself (the scheduler packs
        short prompts only: the pass's activations grow with its total length)."""
        seqs = [f.prefix_ids + f.suffix_ids for f in firsts]
        caches = [PrefixKV(self.shape, len(s), self.device) for s in seqs]
        logits = self._packed([(c.layers, 0, ids, 0) for c, ids in zip(caches, seqs)])
        return [(c, len(f.prefix_ids), 0, logits[i]) for i, (c, f) in enumerate(zip(caches, firsts))]

    def load(self, pool: KVPool, rid: Hashable, cache: Any, n: int, position: int) -> None:
        """Copy the first ``n`` positions of a batch-1 cache (the model's own prefill) into ``rid``'s slot."""
        import torch

        slot = pool.slot(rid)
        with torch.no_grad():
            for li, layer in enumerate(cache.layers):
                pool.K[li][slot, :, :n].copy_(layer.keys[0, :, :n])
                pool.V[li][slot, :, :n].copy_(layer.values[0, :, :n])
        pool.written(rid, n, position)

    def prefill_group(self, pool: KVPool, rids: list[Hashable], cache: Any, P: int, suffixes: list[list[int]],
                      position: int) -> Any:
        """Each suffix after the ``P`` shared prefix tokens of ``cache``, packed into one sequence; request
        ``rids[i]`` gets the prefix and suffix ``i``. Returns each suffix's last-token logits [n, vocab].
        ``position`` is the rotary position of the first suffix token (P, plus the image's rope delta)."""
        import torch

        longest = P + max(map(len, suffixes))
        if longest > pool.length:
            raise ValueError(f"slot length {pool.length} < {longest} tokens")
        with torch.no_grad():
            kvs = []
            for rid in rids:
                slot = pool.slot(rid)
                kv = [LayerKV(K[slot:slot + 1], V[slot:slot + 1]) for K, V in zip(pool.K, pool.V)]
                for layer, c in zip(kv, cache.layers):
                    layer.keys[:, :, :P], layer.values[:, :, :P] = c.keys[:, :, :P], c.values[:, :, :P]
                kvs.append(kv)
            logits = self._packed([(kv, P, ids, position) for kv, ids in zip(kvs, suffixes)])
        for rid, ids in zip(rids, suffixes):
            pool.written(rid, P + len(ids), position + len(ids))
        return logits

    def _packed(self, pieces: list[tuple[list[LayerKV], int, list[int], int]]) -> Any:
        """New tokens of several sequences in one pass. A piece is (its sequence's keys and values per
        layer, with ``start`` positions already written; its new token ids; the rotary position of the
        first). Each piece's keys and values are written after its ``start``, and it attends to all of
        them causally. Returns each piece's last-token logits [pieces, vocab]."""
        import torch

        lens = [len(ids) for _, _, ids, _ in pieces]
        ends = list(accumulate(lens))
        bounds, S, dev = [(b - n, b) for b, n in zip(ends, lens)], ends[-1], self.device
        pos = torch.cat([torch.arange(p, p + n, device=dev) for (_, _, _, p), n in zip(pieces, lens)])
        with torch.no_grad():
            h = self.tm.embed_tokens(torch.tensor([[t for _, _, ids, _ in pieces for t in ids]], device=dev))
            cos, sin = self._rotary(h, pos.view(1, 1, S))
            for li, layer in enumerate(self.layers):
                a = layer.self_attn
                q, k, v = self._heads(layer, self._qkv(li, layer, norm(layer.input_layernorm, h)), 1, S, cos, sin)
                outs = []
                for (a0, a1), (kv, start, _, _) in zip(bounds, pieces):
                    K, V, n = kv[li].keys, kv[li].values, start + a1 - a0
                    K[:, :, start:n], V[:, :, start:n] = k[:, :, a0:a1], v[:, :, a0:a1]
                    outs.append(attend_after(q[:, :, a0:a1], K[:, :, :n], V[:, :, :n], a.scaling))
                o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, S, self.nh * self.hd)
                h = h + a.o_proj(o)
                h = h + self._mlp(li, layer, norm(layer.post_attention_layernorm, h))
            return self.model.lm_head(norm(self.tm.norm, h[0, [b - 1 for _, b in bounds]]))

    def prefill(self, pool: KVPool, rid: Hashable, ids: list[int], start: int, position: int) -> Any:
        """Run ``ids`` after the ``start`` tokens already in ``rid``'s slot; the last token's logits."""
        import torch

        T, n, slot = len(ids), start + len(ids), pool.slot(rid)
        if n > pool.length:
            raise ValueError(f"slot length {pool.length} < {n} tokens")
        na = min(pool.length, -(-n // CHUNK) * CHUNK)
        with torch.no_grad():
            h = self.tm.embed_tokens(torch.tensor([ids], device=self.device))
            cos, sin = self._rotary(h, torch.arange(position, position + T, device=self.device).view(1, 1, T))
            causal = pool.keys[None, :na] <= (start + torch.arange(T, device=self.device))[:, None]
            mask = causal.repeat(self.groups, 1)[None, None]                      # [1, 1, G*T, na]
            for li, layer in enumerate(self.layers):
                a = layer.self_attn
                q, k, v = self._heads(layer, self._qkv(li, layer, norm(layer.input_layernorm, h)), 1, T, cos, sin)
                pool.K[li][slot, :, start:n] = k[0]
                pool.V[li][slot, :, start:n] = v[0]
                qq = q.reshape(1, self.kvh, self.groups * T, self.hd)
                o = attend(qq, pool.K[li][slot:slot + 1, :, :na], pool.V[li][slot:slot + 1, :, :na], mask, a.scaling)
                o = o.view(1, self.kvh, self.groups, T, self.hd).permute(0, 3, 1, 2, 4).reshape(1, T, self.nh * self.hd)
                h = h + a.o_proj(o)
                h = h + self._mlp(li, layer, norm(layer.post_attention_layernorm, h))
            logits = self.model.lm_head(norm(self.tm.norm, h[:, -1:]))[0, -1]
        pool.written(rid, n, position + T)
        return logits

    # ---- decoding -------------------------------------------------------------------------------------
    def step(self, pool: KVPool) -> Any:
        """Logits [span, vocab] of the next token of slots 0..span-1 (rows of idle slots are junk); active
        slots advance by one position. A graph replay on CUDA, captured at a size's first use."""
        import torch

        size = pool.span()
        if not self.use_graphs:
            with torch.no_grad():
                return self._step(pool, size)
        graph, out = self._graphs.get(pool, {}).get(size) or self._capture(pool, size)
        graph.replay()
        return out

    def _step(self, pool: KVPool, S: int) -> Any:
        G = self.groups
        tok, pos, wr, rows = pool.tok[:S], pool.pos[:S], pool.wr[:S], pool.rows[:S]
        h = self.tm.embed_tokens(tok)[:, None, :]                               # [S, 1, H]
        cos, sin = self._rotary(h, pos.view(1, S, 1))
        mask = (pool.keys[None, :] <= wr[:, None])[:, None, None, :]            # [S, 1, 1, L]
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self._heads(layer, self._qkv(li, layer, norm(layer.input_layernorm, h)), S, 1, cos, sin)
            K, V = pool.K[li][:S], pool.V[li][:S]
            K[rows, :, wr] = k[:, :, 0]
            V[rows, :, wr] = v[:, :, 0]
            o = attend(q.reshape(S, self.kvh, G, self.hd), K, V, mask, a.scaling)
            h = h + a.o_proj(o.reshape(S, 1, self.nh * self.hd))
            h = h + self._mlp(li, layer, norm(layer.post_attention_layernorm, h))
        logits = self.model.lm_head(norm(self.tm.norm, h))[:, 0]
        live = pool.active[:S].long()
        wr.add_(live)
        pos.add_(live)
        return logits

    def _capture(self, pool: KVPool, size: int) -> tuple[Any, Any]:
        """The step over the first ``size`` slots as a CUDA graph. Warm-up steps run with every slot
        inactive, so no position advances; they write each slot's current key and value, which the real
        step writes again. A pool's graphs share one memory pool: they never run at once."""
        import torch

        t0 = time.perf_counter()
        if pool not in self._mempools:
            self._mempools[pool] = torch.cuda.graph_pool_handle()
        mempool = self._mempools[pool]
        saved = pool.active.clone()
        pool.active.zero_()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):       # allocator and kernel selection happen outside the graph
                    self._step(pool, size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                out = self._step(pool, size)
        pool.active.copy_(saved)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
        self._graphs.setdefault(pool, {})[size] = (graph, out)
        return graph, out

    # ---- pieces of a layer ----------------------------------------------------------------------------
    def _qkv(self, li: int, layer: Any, x: Any) -> tuple[Any, Any, Any]:
        import torch.nn.functional as F

        a = layer.self_attn
        if self.fused[li] is None:
            return a.q_proj(x), a.k_proj(x), a.v_proj(x)
        nq, nk = self.nh * self.hd, self.kvh * self.hd
        return F.linear(x, self.fused[li][0]).split((nq, nk, nk), dim=-1)

    def _mlp(self, li: int, layer: Any, x: Any) -> Any:
        import torch.nn.functional as F

        mlp = layer.mlp
        if self.fused[li] is None:
            return mlp(x)
        gate, up = F.linear(x, self.fused[li][1]).chunk(2, dim=-1)
        return mlp.down_proj(mlp.act_fn(gate) * up)

    def _heads(self, layer: Any, qkv: tuple[Any, Any, Any], B: int, T: int, cos: Any, sin: Any
               ) -> tuple[Any, Any, Any]:
        """q [B, nh, T, hd], k/v [B, kvh, T, hd]: the model's q/k norms, then its rotary embedding."""
        a = layer.self_attn
        q, k, v = qkv
        q = norm(a.q_norm, q.view(B, T, self.nh, self.hd)).transpose(1, 2)
        k = norm(a.k_norm, k.view(B, T, self.kvh, self.hd)).transpose(1, 2)
        v = v.view(B, T, self.kvh, self.hd).transpose(1, 2)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def _rotary(self, h: Any, positions: Any) -> tuple[Any, Any]:
        cos, sin = self.tm.rotary_emb(h, positions)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def cache_kw(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both spellings."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
