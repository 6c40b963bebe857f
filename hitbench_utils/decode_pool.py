"""Moved to ``hitbench_utils.engine`` (``kv_pool``, ``attention``); kept so older imports keep working."""
from .engine.attention import attend, kv_bytes_per_token, text_model  # noqa: F401
from .engine.kv_pool import SlotPool, bucket_length  # noqa: F401
