"""What the engine needs from a model, whatever serves it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class GenSettings:
    """Generation settings; greedy when temperature == 0 (reproducible), sampling otherwise."""

    max_new_tokens: int = 1024
    temperature: float = 0.0
    top_p: float = 0.8
    top_k: int = 20
    seed: int = 0
    max_time: float | None = None      # seconds per generate call; unfinished sequences end as timeouts

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class GenRequest:
    key: Any                       # the caller's handle (e.g. the sample id)
    messages: list[dict]
    image: Any = None              # a PIL image, or None
    input_tokens: int | None = None
    share_from: str | None = None      # the text the shareable prefix ends before (the question part)
    max_new_tokens: int | None = None  # a per-request cap (benchmarks script output lengths with it)
    cut: Any = None                    # the shared-prefix engine's split of the prompt, made in preparation


@dataclass
class GenResult:
    text: str
    output_tokens: int
    input_tokens: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the registry picks the engine from it (never from the backend's class)."""

    shared_prefix: bool = False    # a local model the shared-prefix engine can drive (KV slots, prefixes)
    remote: bool = False           # requests go to a server: keep ``concurrency`` in flight, no padding


class Backend(Protocol):
    """What every backend provides. Wrappers (``faults.FaultyBackend``) forward what they do not change."""

    name: str
    info: dict                     # device, dtype, attention... (results.json's "backend")
    identity: dict                 # what identifies the model in the run fingerprint
    default_max_new_tokens: int
    capabilities: Capabilities
    device: str
    tokenizer: Any

    def count_tokens(self, messages: list[dict], image: Any = None) -> int: ...

    def image_tokens(self, image: Any) -> int: ...

    def generate(self, requests: list[GenRequest], settings: GenSettings) -> list[GenResult]: ...

    def admit(self, requests: list[GenRequest]) -> None:
        """Called by engines that drive the model themselves before they run these requests; may raise
        to fail them (fault injection). Real backends accept everything."""
