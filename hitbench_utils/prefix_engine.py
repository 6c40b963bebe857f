"""Moved to ``hitbench_utils.engine`` (``scheduler``); kept so older imports keep working."""
from .engine.scheduler import PREFILL_ACTIVATIONS, RESERVE_BYTES, PrefixEngine, _cache_kw  # noqa: F401
