"""Exactness of the engine's packed group prefill in bf16 on the GPU (DESIGN.md §7: with random weights,
compare logits within a tolerance, not tokens).

For the questions of one sampled table, the first-token logits of three paths are compared with one
plain forward of each whole prompt: the engine's (the first prompt in one packed prefill pass with
another table's, then all further questions in one ``prefill_group`` pass over that prefix), and HF's
own split (the model's forward over the prefix into a ``DynamicCache``, then the question's suffix
through the model's forward). The tolerance is 1.5x HF's own difference
plus 1/16.
"""
from __future__ import annotations

import copy
from pathlib import Path


def logits_check(backend, root: Path, meta: dict, max_prompt: int = 16_000) -> dict:
    import torch
    from transformers import DynamicCache

    from hitbench_utils import data as D
    from hitbench_utils.backends.base import GenRequest
    from hitbench_utils.engine import PrefixEngine
    from hitbench_utils.engine.kv_pool import bucket_length
    from hitbench_utils.engine.runner import cache_kw
    from hitbench_utils.prompts import build_prompt, load_templates

    t = load_templates("default")
    data = root / "data"
    qs = D.load_queries(data / "QA_html.json")
    by_file: dict[str, list] = {}
    for q in qs:
        by_file.setdefault(q.file_name, []).append(q)
    model, kw = backend.model, cache_kw(backend.model)
    eng = PrefixEngine(backend, batch_size=4)

    def group_of(f: str, group: list):
        """The table's questions (at most 6) as one prefix group under ``max_prompt``, else None."""
        table = D.read_table(data, "html", f)
        reqs = []
        for q in group[:6]:
            p = build_prompt(t, q, "text", "html", table)
            reqs.append(GenRequest(q.id, p.messages(), None, None, share_from=p.suffix))
        groups, plain = eng._group(reqs)
        g = next(iter(groups.values())) if len(groups) == 1 and not plain else None
        return g if g is not None and g.prefix_len + 400 <= max_prompt else None

    tables = sorted(by_file.items(), key=lambda kv: -len(kv[1]))
    for i, (f, group) in enumerate(tables):
        g = group_of(f, group)
        if g is None or len(g.members) < 3:
            continue
        other = next((o for o in (group_of(*kv) for kv in tables[i + 1:]) if o is not None), None)
        if other is None:
            break
        with torch.no_grad():
            full = [model(input_ids=torch.tensor([m.prefix_ids + m.suffix_ids], device=backend.device),
                          logits_to_keep=1).logits[0, -1].float() for m in g.members]
            cache, P, delta, first = eng._prefix([g, other])[0]     # packed with another table's prompt
            own = DynamicCache()
            model(input_ids=torch.tensor([g.members[0].prefix_ids], device=backend.device), **{kw: own}, use_cache=True,
                  logits_to_keep=1)
            need = P + max(len(m.suffix_ids) for m in g.members) + 2
            pool = eng.runner.new_pool(len(g.members), bucket_length(need))
            rids = list(range(1, len(g.members)))
            for rid in rids:
                pool.add(rid)
            ours = [first.float()] + list(eng.runner.prefill_group(pool, rids, cache, P,
                                                                   [m.suffix_ids for m in g.members[1:]], P).float())
            hf = []
            for m in g.members:
                c = copy.deepcopy(own)
                ids = torch.tensor([m.suffix_ids], device=backend.device)
                pos = torch.arange(P, P + ids.shape[1], device=backend.device)[None]
                hf.append(model(input_ids=ids, **{kw: c}, position_ids=pos, use_cache=True,
                                logits_to_keep=1).logits[0, -1].float())
        rows = []
        for m, a, o, h in zip(g.members, full, ours, hf):
            d_ours, d_hf = float((o - a).abs().max()), float((h - a).abs().max())
            rows.append({"id": m.req.key, "max_abs_logit": round(float(a.abs().max()), 3), "engine_diff": round(d_ours, 4),
                         "hf_split_diff": round(d_hf, 4), "within": d_ours <= 1.5 * d_hf + 1 / 16,
                         "argmax_same": int(o.argmax()) == int(a.argmax())})
        del pool, cache, own
        return {"table": f, "prefix_tokens": P, "questions": len(rows), "packed_suffixes": len(rids),
                "prefill_packed_with": {"question": other.members[0].req.key, "prefix_tokens": other.prefix_len},
                "all_within": all(r["within"] for r in rows), "rows": rows,
                "tolerance": "engine diff <= 1.5 x HF's own split diff + 1/16, against one plain forward"}
    return {"skipped": f"no sampled table with 3+ questions under {max_prompt} tokens"}
