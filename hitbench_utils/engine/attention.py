"""The arithmetic of the engine's own passes: the model's RMSNorm and rotary embedding, fused
projections, and attention of a few queries over long keys (split-key, flash-decoding's idea).

The passes are written against the model's own modules, so the weights are the model's; only the
attention is ours, because fused SDPA kernels spread their work badly at decode (bench/README.md).
"""
from __future__ import annotations

from typing import Any

SCORES_CAP = 2**26      # float32 attention scores held at once, per call (256 MB): longer query sets split


def text_model(model: Any) -> Any:
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)


def kv_bytes_per_token(model: Any) -> int:
    cfg = text_model(model).config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = text_model(model).embed_tokens.weight.element_size()
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * d * elem


def norm(mod: Any, x: Any) -> Any:
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
    if M > 1 and B * H * M * L > SCORES_CAP:      # bound the float32 scores (256 MB) on long prompts
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


def attend_after(q: Any, K: Any, V: Any, scale: float) -> Any:
    """Causal attention of ``T`` new queries that follow ``L - T`` earlier keys (bottom-right aligned:
    query ``t`` sees keys ``0 .. L - T + t``). q [1, heads, T, D], K/V [1, kv heads, L, D] (grouped query
    heads share their KV head, never repeated). On a GPU this is one flash-attention call; float32 scores
    split under ``SCORES_CAP`` took 5.5 s for 7 suffixes on a 79K-token prefix on an H200."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    T, L = q.shape[2], K.shape[2]
    return F.scaled_dot_product_attention(q, K, V, attn_mask=causal_lower_right(T, L), scale=scale,
                                          enable_gqa=q.shape[1] != K.shape[1])


def rope(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

