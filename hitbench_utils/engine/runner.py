"""The model runner: the engine's own passes of the text decoder over a ``SlotPool``'s KV memory.

- ``prefill``: tokens after those already in one slot (eager);
- ``prefill_group``: all of a prefix group's further questions in one packed pass over the group's
  shared prefix cache: each suffix attends to the prefix and to its own earlier tokens, and its keys
  and values land in its own slot, after a copy of the prefix;
- ``step``: one decode token for the first ``S`` slots (what the pool replays as a CUDA graph).

Images enter only through the prefix, which the model's own forward computes.
"""
from __future__ import annotations

from typing import Any

from .attention import attend, attend_prefixed, norm, rope

CHUNK = 1024          # keys read by a slot prefill: whole chunks, masked past the slot's length


def _qkv(pool: Any, li: int, layer: Any, x: Any) -> tuple[Any, Any, Any]:
    import torch.nn.functional as F

    a = layer.self_attn
    if pool.fused[li] is None:
        return a.q_proj(x), a.k_proj(x), a.v_proj(x)
    nq, nk = pool.nh * pool.hd, pool.kvh * pool.hd
    return F.linear(x, pool.fused[li][0]).split((nq, nk, nk), dim=-1)


def _mlp(pool: Any, li: int, layer: Any, x: Any) -> Any:
    import torch.nn.functional as F

    mlp = layer.mlp
    if pool.fused[li] is None:
        return mlp(x)
    gate, up = F.linear(x, pool.fused[li][1]).chunk(2, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _heads(pool: Any, layer: Any, qkv: tuple[Any, Any, Any], B: int, T: int, cos: Any, sin: Any
           ) -> tuple[Any, Any, Any]:
    """q [B, nh, T, hd], k/v [B, kvh, T, hd]: the model's q/k norms, then its rotary embedding."""
    a = layer.self_attn
    q, k, v = qkv
    q = norm(a.q_norm, q.view(B, T, pool.nh, pool.hd)).transpose(1, 2)
    k = norm(a.k_norm, k.view(B, T, pool.kvh, pool.hd)).transpose(1, 2)
    v = v.view(B, T, pool.kvh, pool.hd).transpose(1, 2)
    return rope(q, cos, sin), rope(k, cos, sin), v


def _rotary(pool: Any, h: Any, positions: Any) -> tuple[Any, Any]:
    cos, sin = pool.tm.rotary_emb(h, positions)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def prefill(pool: Any, slot: int, ids: list[int], start: int, position: int) -> Any:
    """Run ``ids`` after the ``start`` tokens already in ``slot``; the last token's logits."""
    import torch

    T, n = len(ids), start + len(ids)
    if n > pool.length:
        raise ValueError(f"slot length {pool.length} < {n} tokens")
    na = min(pool.length, -(-n // CHUNK) * CHUNK)
    h = pool.tm.embed_tokens(torch.tensor([ids], device=pool.device))
    cos, sin = _rotary(pool, h, torch.arange(position, position + T, device=pool.device).view(1, 1, T))
    causal = pool.keys[None, :na] <= (start + torch.arange(T, device=pool.device))[:, None]
    mask = causal.repeat(pool.groups, 1)[None, None]                      # [1, 1, G*T, na]
    for li, layer in enumerate(pool.layers):
        a = layer.self_attn
        q, k, v = _heads(pool, layer, _qkv(pool, li, layer, norm(layer.input_layernorm, h)), 1, T, cos, sin)
        pool.K[li][slot, :, start:n] = k[0]
        pool.V[li][slot, :, start:n] = v[0]
        qq = q.reshape(1, pool.kvh, pool.groups * T, pool.hd)
        o = attend(qq, pool.K[li][slot:slot + 1, :, :na], pool.V[li][slot:slot + 1, :, :na], mask, a.scaling)
        o = o.view(1, pool.kvh, pool.groups, T, pool.hd).permute(0, 3, 1, 2, 4).reshape(1, T, pool.nh * pool.hd)
        h = h + a.o_proj(o)
        h = h + _mlp(pool, li, layer, norm(layer.post_attention_layernorm, h))
    return pool.model.lm_head(norm(pool.tm.norm, h[:, -1:]))[0, -1]


def prefill_group(pool: Any, slots: list[int], cache: Any, P: int, suffixes: list[list[int]], position: int) -> Any:
    """Each suffix after the ``P`` shared prefix tokens of ``cache`` (a batch-1 cache of the model's own
    forward), packed into one sequence; slot ``slots[i]`` gets the prefix and suffix ``i``. Returns the
    last-token logits of each suffix [len(suffixes), vocab]. ``position`` is the rotary position of the
    first suffix token (P, plus the image's rope delta)."""
    import torch

    dev, G = pool.device, pool.groups
    lens = [len(s) for s in suffixes]
    if P + max(lens) > pool.length:
        raise ValueError(f"slot length {pool.length} < {P + max(lens)} tokens")
    S = sum(lens)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
    starts = torch.tensor([0] + lens[:-1], device=dev).cumsum(0)
    offset = torch.arange(S, device=dev) - starts[seg]                    # each token's place in its suffix
    own = (seg[:, None] == seg[None, :]) & (offset[None, :] <= offset[:, None])   # [S, S] block causal
    mask = own.repeat(G, 1)                                                # [G*S, S]
    ends = (starts + torch.tensor(lens, device=dev) - 1).tolist()
    h = pool.tm.embed_tokens(torch.tensor([sum(suffixes, [])], device=dev))
    cos, sin = _rotary(pool, h, (position + offset).view(1, 1, S))
    for li, layer in enumerate(pool.layers):
        a = layer.self_attn
        q, k, v = _heads(pool, layer, _qkv(pool, li, layer, norm(layer.input_layernorm, h)), 1, S, cos, sin)
        Kp, Vp = cache.layers[li].keys[:, :, :P], cache.layers[li].values[:, :, :P]
        for i, slot in enumerate(slots):
            a0 = ends[i] - lens[i] + 1
            pool.K[li][slot, :, :P] = Kp[0]
            pool.V[li][slot, :, :P] = Vp[0]
            pool.K[li][slot, :, P:P + lens[i]] = k[0, :, a0:ends[i] + 1]
            pool.V[li][slot, :, P:P + lens[i]] = v[0, :, a0:ends[i] + 1]
        qq = q.reshape(1, pool.kvh, G * S, pool.hd)
        o = attend_prefixed(qq, Kp, Vp, k, v, mask, a.scaling)
        o = o.view(1, pool.kvh, G, S, pool.hd).permute(0, 3, 1, 2, 4).reshape(1, S, pool.nh * pool.hd)
        h = h + a.o_proj(o)
        h = h + _mlp(pool, li, layer, norm(layer.post_attention_layernorm, h))
    return pool.model.lm_head(norm(pool.tm.norm, h[0, ends]))


def step(pool: Any, S: int) -> Any:
    """Logits [S, vocab] of the next token of slots 0..S-1; active slots advance by one position."""
    G = pool.groups
    tok, pos, wr, rows = pool.tok[:S], pool.pos[:S], pool.wr[:S], pool.rows[:S]
    h = pool.tm.embed_tokens(tok)[:, None, :]                               # [S, 1, H]
    cos, sin = _rotary(pool, h, pos.view(1, S, 1))
    mask = (pool.keys[None, :] <= wr[:, None])[:, None, None, :]            # [S, 1, 1, L]
    for li, layer in enumerate(pool.layers):
        a = layer.self_attn
        q, k, v = _heads(pool, layer, _qkv(pool, li, layer, norm(layer.input_layernorm, h)), S, 1, cos, sin)
        K, V = pool.K[li][:S], pool.V[li][:S]
        K[rows, :, wr] = k[:, :, 0]
        V[rows, :, wr] = v[:, :, 0]
        o = attend(q.reshape(S, pool.kvh, G, pool.hd), K, V, mask, a.scaling)
        h = h + a.o_proj(o.reshape(S, 1, pool.nh * pool.hd))
        h = h + _mlp(pool, li, layer, norm(layer.post_attention_layernorm, h))
    logits = pool.model.lm_head(norm(pool.tm.norm, h))[:, 0]
    live = pool.active[:S].long()
    wr.add_(live)
    pos.add_(live)
    return logits


def prefix_forward(be: Any, first: Any, image: Any) -> tuple[Any, int, int, Any]:
    """The model's own forward over a group's first question's whole prompt: the shared prefix's cache
    (a ``DynamicCache``), its length ``P``, the image's rope delta, and that question's first-token
    logits, in one pass."""
    import torch
    from transformers import DynamicCache

    from .prefixes import _cache_kw

    model = be.model
    if image is None:    # already tokenized by the split: no second pass through the processor
        ids = torch.tensor([first.prefix_ids + first.suffix_ids], device=be.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    else:
        inputs = be.processor(text=[be.chat_text(first.req.messages)], images=[image], return_tensors="pt").to(be.device)
    P = inputs["input_ids"].shape[1] - len(first.suffix_ids)
    inner = getattr(model, "model", model)
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(**inputs, **{_cache_kw(model): cache}, use_cache=True, logits_to_keep=1).logits[0, -1]
    delta = 0
    if image is not None:
        rd = getattr(inner, "rope_deltas", None)
        if rd is None:
            raise RuntimeError("the model did not expose rope_deltas for an image prefix")
        delta = int(rd.reshape(-1)[0].item())
    return cache, P, delta, logits
