"""Static per-slot KV memory and a decode step that is replayed as one CUDA graph.

Each running question owns a slot: a fixed stretch of KV memory in every layer. Questions on different
tables decode together, and a finished question frees its slot for the next (continuous batching). The
number of decode steps then follows the total output, not the longest answer per table, and one step
costs a graph replay instead of ~1,000 eager kernel launches (70 ms at batch 1 on an H100, eager).

The step is written against the model's own modules (projections, norms, rotary embedding, MLP, head),
so the weights and the arithmetic are the model's. Only the text decoder runs here: images enter through
the prefix, which the model's own forward computes. Keys are read through a boolean mask per slot, and
the query heads that share a KV head are folded into the query length, so no KV is ever repeated.

A step reads every slot's KV up to the slot length, so it runs over the first ``S`` slots only, ``S`` the
power of two (or the pool size) past the last busy slot, one graph per ``S``, captured when first needed.
When questions finish, the busy slots are moved down (``compact``), so the last long answers of a run
step at the cost of one slot, not of the whole pool (a 32x8192 pool: ~30 ms a step, one slot: ~10 ms).
"""
from __future__ import annotations

import time
from typing import Any

MIN_LENGTH = 1024
STEP_LENGTH = 16384


def bucket_length(n: int) -> int:
    """Slot lengths: powers of two up to 16K, then multiples of 16K. Few distinct graph shapes, and a
    long prompt's slot wastes at most 16K positions (a 90K prompt gets 96K, not 128K)."""
    if n > STEP_LENGTH:
        return -(-n // STEP_LENGTH) * STEP_LENGTH
    length = MIN_LENGTH
    while length < n:
        length *= 2
    return length


def text_model(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def kv_bytes_per_token(model: Any) -> int:
    cfg = text_model(model).config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = text_model(model).embed_tokens.weight.element_size()
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * d * elem


def _norm(mod: Any, x: Any) -> Any:
    """The model's RMSNorm (float32 statistics, weight applied in the input dtype) in one fused call."""
    import torch.nn.functional as F

    return mod.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=mod.variance_epsilon).to(x.dtype)


def fuse_projections(layer: Any) -> tuple[Any, Any] | None:
    """One matmul for q/k/v and one for gate/up: their weights become views of one tensor each, so the
    model's own forward sees the same values and no memory is added."""
    import torch

    a, mlp = layer.self_attn, layer.mlp
    if getattr(layer, "_hitbench_fused", None) is not None:
        return layer._hitbench_fused
    if any(getattr(m, "bias", None) is not None for m in (a.q_proj, a.k_proj, a.v_proj, mlp.gate_proj, mlp.up_proj)):
        return None
    with torch.no_grad():
        fused = []
        for mods in ((a.q_proj, a.k_proj, a.v_proj), (mlp.gate_proj, mlp.up_proj)):
            w = torch.cat([m.weight for m in mods])
            i = 0
            for m in mods:
                n = m.weight.shape[0]
                m.weight.data = w[i:i + n]
                i += n
            fused.append(w)
    layer._hitbench_fused = (fused[0], fused[1])
    return layer._hitbench_fused


def attend(q: Any, K: Any, V: Any, mask: Any, scale: float) -> Any:
    """Attention of a few queries over long keys, split along the keys (flash-decoding's idea).

    q [B, kvh, M, D] (the query heads of one KV head folded into M), K/V [B, kvh, L, D], mask [B, 1, M|1, L].
    Fused SDPA kernels spread work over batch x heads x query blocks: at decode that is 8 blocks for a
    96K-token slot, and an H100 step took 86 ms. Here the scores come from one batched matmul and the
    value sum runs over key chunks in parallel, so a step reads the KV at memory speed.
    """
    import torch

    B, H, M, D = q.shape
    L = K.shape[2]
    if M > 1 and B * H * M * L > 2**26:      # bound the float32 scores (256 MB) on long prompts
        h = M // 2
        return torch.cat([attend(q[:, :, :h], K, V, mask[:, :, :h] if mask.shape[2] > 1 else mask, scale),
                          attend(q[:, :, h:], K, V, mask[:, :, h:] if mask.shape[2] > 1 else mask, scale)], dim=2)
    s = torch.matmul(q, K.transpose(-1, -2)).float() * scale                 # [B, H, M, L]
    p = s.masked_fill(~mask, float("-inf")).softmax(-1).to(V.dtype)
    chunks = 1
    while B * H * chunks < 1024 and L % (chunks * 2) == 0 and L // (chunks * 2) >= 256:
        chunks *= 2
    pc = p.view(B, H, M, chunks, L // chunks).transpose(2, 3)                # [B, H, C, M, L/C]
    return torch.matmul(pc, V.view(B, H, chunks, L // chunks, D)).float().sum(2).to(V.dtype)


def _rope(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class SlotPool:
    """``slots`` rows of ``length`` KV positions each; ``step`` advances every active row by one token."""

    def __init__(self, model: Any, slots: int, length: int, device: str, graphs: bool) -> None:
        import torch

        tm = text_model(model)
        cfg = tm.config
        self.model, self.tm, self.layers = model, tm, list(tm.layers)
        self.nh, self.kvh = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.nh
        self.groups = self.nh // self.kvh
        self.slots, self.length, self.device = slots, length, device
        dtype = tm.embed_tokens.weight.dtype
        shape = (slots, self.kvh, length, self.hd)
        self.fused = [fuse_projections(layer) for layer in self.layers]
        self.K = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.V = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layers]
        self.tok = torch.zeros(slots, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, dtype=torch.long, device=device)   # rotary position of ``tok``
        self.wr = torch.zeros(slots, dtype=torch.long, device=device)    # KV index ``tok`` is written to
        self.active = torch.zeros(slots, dtype=torch.bool, device=device)
        self._rows = torch.arange(slots, device=device)
        self._keys = torch.arange(length, device=device)
        self.free = list(range(slots))
        self.n = [0] * slots             # host copy of ``wr``: a slot's KV length, for moving it
        self.on: set[int] = set()        # host copy of ``active``
        self.sizes = sorted({min(slots, 2 ** k) for k in range(slots.bit_length() + 1)})
        self.use_graphs = graphs
        self.graphs: dict[int, tuple[Any, Any]] = {}      # step size -> (graph, its logits)
        self._mempool: Any = None
        self.capture_s = 0.0

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

    # ---- filling a slot -----------------------------------------------------------------------------
    def take(self) -> int:
        """The lowest free slot, so that busy slots stay packed at the front (the eager step skips the rest)."""
        slot = min(self.free)
        self.free.remove(slot)
        return slot

    def release(self, slot: int) -> None:
        self.active[slot] = False
        self.wr[slot] = 0
        self.n[slot] = 0
        self.on.discard(slot)
        self.free.append(slot)

    def size_for(self, hi: int) -> int:
        """The step size (a captured graph's row count) that covers slots 0..hi-1."""
        return next(x for x in self.sizes if x >= hi)

    def compact(self) -> dict[int, int]:
        """Move busy slots above the first ``len(busy)`` into the free ones below, when that lets the step
        run over fewer slots; return {old slot: new slot}. A move copies the slot's KV (its length only)."""
        busy = sorted(set(range(self.slots)) - set(self.free))
        if not busy or self.size_for(len(busy)) >= self.size_for(busy[-1] + 1):
            return {}
        import torch

        moves: dict[int, int] = {}
        with torch.no_grad():
            for src in reversed(busy):
                if src < len(busy):
                    break
                dst = min(self.free)
                n = self.n[src]
                for K, V in zip(self.K, self.V):
                    K[dst, :, :n].copy_(K[src, :, :n])
                    V[dst, :, :n].copy_(V[src, :, :n])
                for t in (self.tok, self.pos, self.wr, self.active):
                    t[dst] = t[src]
                self.free.remove(dst)
                self.n[dst] = n
                if src in self.on:
                    self.on.add(dst)
                self.release(src)
                moves[src] = dst
        return moves

    def load_prefix(self, slot: int, cache: Any, n: int) -> None:
        """Copy a batch-1 prefix cache (the model's own prefill) into a slot."""
        import torch

        with torch.no_grad():
            self._load(slot, cache, n)

    def _load(self, slot: int, cache: Any, n: int) -> None:
        for li, layer in enumerate(cache.layers):
            self.K[li][slot, :, :n].copy_(layer.keys[0, :, :n])
            self.V[li][slot, :, :n].copy_(layer.values[0, :, :n])

    def prefill(self, slot: int, ids: list[int], start: int, position: int) -> Any:
        """Run ``ids`` after the ``start`` tokens already in ``slot`` (eager); return the last logits."""
        import torch

        with torch.no_grad():
            return self._prefill(slot, ids, start, position)

    def _prefill(self, slot: int, ids: list[int], start: int, position: int) -> Any:
        import torch

        T, n = len(ids), start + len(ids)
        if n > self.length:
            raise ValueError(f"slot length {self.length} < {n} tokens")
        na = min(self.length, -(-n // MIN_LENGTH) * MIN_LENGTH)     # keys read: whole chunks, masked past n
        h = self.tm.embed_tokens(torch.tensor([ids], device=self.device))
        cos, sin = self.tm.rotary_emb(h, torch.arange(position, position + T, device=self.device).view(1, 1, T))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        causal = self._keys[None, :na] <= (start + torch.arange(T, device=self.device))[:, None]
        mask = causal.repeat(self.groups, 1)[None, None]                      # [1, 1, G*T, n]
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self._qkv(li, layer, _norm(layer.input_layernorm, h))
            q = _norm(a.q_norm, q.view(1, T, self.nh, self.hd)).transpose(1, 2)
            k = _norm(a.k_norm, k.view(1, T, self.kvh, self.hd)).transpose(1, 2)
            v = v.view(1, T, self.kvh, self.hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            self.K[li][slot, :, start:n] = k[0]
            self.V[li][slot, :, start:n] = v[0]
            qq = q.reshape(1, self.kvh, self.groups * T, self.hd)
            o = attend(qq, self.K[li][slot:slot + 1, :, :na], self.V[li][slot:slot + 1, :, :na], mask, a.scaling)
            o = o.view(1, self.kvh, self.groups, T, self.hd).permute(0, 3, 1, 2, 4).reshape(1, T, self.nh * self.hd)
            h = h + a.o_proj(o)
            h = h + self._mlp(li, layer, _norm(layer.post_attention_layernorm, h))
        logits = self.model.lm_head(_norm(self.tm.norm, h[:, -1:]))[0, -1]
        self.wr[slot], self.pos[slot] = n, position + T
        self.n[slot] = n
        return logits

    def place(self, slot: int, n: int, position: int) -> None:
        """A slot whose ``n`` tokens were all loaded from a cache: the next token goes at ``position``."""
        self.wr[slot], self.pos[slot] = n, position
        self.n[slot] = n

    def start(self, slot: int, token: int) -> None:
        self.tok[slot] = token
        self.active[slot] = True
        self.on.add(slot)

    # ---- one decode step over every slot ------------------------------------------------------------
    def _step(self, hi: int | None = None) -> Any:
        S, G = hi or self.slots, self.groups
        tok, pos, wr, rows = self.tok[:S], self.pos[:S], self.wr[:S], self._rows[:S]
        h = self.tm.embed_tokens(tok)[:, None, :]                               # [S, 1, H]
        cos, sin = self.tm.rotary_emb(h, pos.view(1, S, 1))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = (self._keys[None, :] <= wr[:, None])[:, None, None, :]           # [S, 1, 1, L]
        for li, layer in enumerate(self.layers):
            a = layer.self_attn
            q, k, v = self._qkv(li, layer, _norm(layer.input_layernorm, h))
            q = _norm(a.q_norm, q.view(S, 1, self.nh, self.hd)).transpose(1, 2)
            k = _norm(a.k_norm, k.view(S, 1, self.kvh, self.hd)).transpose(1, 2)
            v = v.view(S, 1, self.kvh, self.hd).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            K, V = self.K[li][:S], self.V[li][:S]
            K[rows, :, wr] = k[:, :, 0]
            V[rows, :, wr] = v[:, :, 0]
            o = attend(q.reshape(S, self.kvh, G, self.hd), K, V, mask, a.scaling)
            h = h + a.o_proj(o.reshape(S, 1, self.nh * self.hd))
            h = h + self._mlp(li, layer, _norm(layer.post_attention_layernorm, h))
        logits = self.model.lm_head(_norm(self.tm.norm, h))[:, 0]
        step = self.active[:S].long()
        wr.add_(step)
        pos.add_(step)
        return logits

    def _capture(self, size: int) -> tuple[Any, Any]:
        """The step over the first ``size`` slots as a CUDA graph. Warm-up steps run with every slot
        inactive, so no position advances; they write each slot's current key and value, which the real
        step writes again. All of a pool's graphs share one memory pool: they never run at once."""
        import torch

        t0 = time.perf_counter()
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        saved = self.active.clone()
        self.active.zero_()
        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):       # allocator and kernel selection happen outside the graph
                    self._step(size)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                out = self._step(size)
        self.active.copy_(saved)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0
        self.graphs[size] = (graph, out)
        return graph, out

    def step(self) -> Any:
        """Logits [S, vocab] for the next token of slots 0..S-1, S covering the last busy slot (rows of
        idle slots are junk): a graph replay on CUDA, else eager up to the last busy slot."""
        busy = set(range(self.slots)) - set(self.free)
        hi = max(busy) + 1 if busy else 1
        for s in self.on:
            self.n[s] += 1
        if self.use_graphs:
            size = self.size_for(hi)
            graph, out = self.graphs.get(size) or self._capture(size)
            graph.replay()
            return out
        import torch

        with torch.no_grad():
            return self._step(hi)
