"""The generation engine.

- ``batching``: ``Engine``, plain batches under a token budget, with failures isolated per sample
  (OOM halving, then one by one);
- ``prefixes``: cutting prompts into a shared prefix and a suffix, and the state of a decoding question;
- ``scheduler``: ``PrefixEngine``, for local HF models: groups questions by shared prefix, keeps slot
  pools decoding side by side (``pools``), drains and falls back;
- ``admission``: its prefill side: each prefix once (short ones packed into one pass), a group's
  further questions in packed passes, each question into a pool;
- ``kv_pool``: ``KVPool``, per-request KV slots keyed by the scheduler's request handle (slots and
  compaction are its own business);
- ``runner``: ``ModelRunner``, the model's passes over that memory (the prefix forward, the packed pass
  of a group's further questions, the decode step) and the step's CUDA graphs; the scheduler is tested
  against a stand-in for it (``tests/test_scheduler.py``);
- ``attention``: norms, rotary embedding, fused projections and split-key attention;
- ``sampling``: greedy or top-k / top-p picking.

Both engines take ``(backend, batch_size, token_budget)`` and offer ``run(requests, settings)`` and
``run_stream(chunks, settings)``, which yield ``(request, GenResult | exception, degradation steps)``.
In a stream an empty chunk means "nothing new now, more may come": the engine advances the work it has
in flight by one decode step (yielding what finishes) before it asks for the next chunk.
"""
from .batching import Engine, default_token_budget, free_memory, plan_batches, release_frames
from .scheduler import PrefixEngine

__all__ = ["Engine", "PrefixEngine", "default_token_budget", "free_memory", "plan_batches", "release_frames"]
