"""Picking the next token: greedy argmax, or the old scripts' temperature / top-k / top-p sampling."""
from __future__ import annotations

from typing import Any

from ..backends.base import GenSettings


def generator(settings: GenSettings, device: Any) -> Any:
    """A seeded generator for sampling (None when greedy)."""
    if settings.greedy:
        return None
    import torch

    return torch.Generator(device=str(device)).manual_seed(settings.seed)


def pick(logits: Any, settings: GenSettings, gen: Any) -> Any:
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
