"""One place that maps a ``model`` parameter to a backend, and a backend to its engine.

``tiny`` builds (once) and loads the tiny model through the same hf path as a real folder;
``openai:<name>`` is a model behind an OpenAI-compatible server; anything else is a local folder. Each
kind says how to load it, what identifies it in the run fingerprint (without loading it), and what it
can do (``Capabilities``), so callers never switch on a backend's class. A wrapper (fault injection,
scripted oracles) forwards ``capabilities`` and so keeps the engine of the backend it wraps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .base import Capabilities


@dataclass(frozen=True)
class BackendKind:
    name: str
    matches: Callable[[str], bool]
    load: Callable[[Any], Any]                       # RunConfig -> backend
    identity: Callable[[Any], tuple[dict, int]]      # RunConfig -> (fingerprint identity, default max_new_tokens)
    label: Callable[[str], str]                      # model -> the run folder's model part
    capabilities: Capabilities


def _hf_load(path: str, cfg: Any) -> Any:
    from .hf import HFBackend

    return HFBackend(path, dtype=cfg.dtype, attn_implementation=cfg.attn_implementation, device=cfg.device)


def _tiny_dir() -> str:
    from .tiny import tiny_model_dir

    return str(tiny_model_dir())


def _tiny_identity(cfg: Any) -> tuple[dict, int]:
    from .hf import model_identity
    from .tiny import TINY_MAX_NEW_TOKENS

    return model_identity(_tiny_dir()), TINY_MAX_NEW_TOKENS


def _folder_identity(cfg: Any) -> tuple[dict, int]:
    from .hf import model_identity

    return model_identity(cfg.model), 1024


def _openai_load(cfg: Any) -> Any:
    from .openai import from_config

    return from_config(cfg)


def _openai_identity(cfg: Any) -> tuple[dict, int]:
    """What is served (the server's own model entry), never the address: a moved server resumes."""
    from .openai_http import served_identity

    return served_identity(cfg.model, cfg.extra.get("base_url_fleet") or cfg.base_url, tokenizer=cfg.tokenizer,
                           api_key_env=cfg.api_key_env, max_retries=cfg.max_retries), 1024


KINDS: tuple[BackendKind, ...] = (
    BackendKind("tiny", lambda m: m == "tiny", lambda cfg: _hf_load(_tiny_dir(), cfg), _tiny_identity,
                lambda m: "tiny", Capabilities(shared_prefix=True)),
    BackendKind("openai", lambda m: m.startswith("openai:"), _openai_load, _openai_identity,
                lambda m: "openai-" + m.split(":", 1)[1].replace("/", "-"), Capabilities(remote=True)),
    BackendKind("folder", lambda m: True, lambda cfg: _hf_load(cfg.model, cfg), _folder_identity,
                lambda m: Path(m.rstrip("/")).name, Capabilities(shared_prefix=True)),
)


def kind_of(model: str) -> BackendKind:
    return next(k for k in KINDS if k.matches(model))


def load_backend(cfg: Any) -> Any:
    """The backend for ``cfg.model``, loaded."""
    return kind_of(cfg.model).load(cfg)


def model_label(model: str) -> str:
    return kind_of(model).label(model)


def backend_identity(backend: Any, cfg: Any) -> tuple[dict, int, str]:
    """(fingerprint identity, default max_new_tokens, dtype) of an injected backend, or of the configured
    model without loading it (the header is written before the model loads)."""
    if backend is not None:
        return backend.identity, backend.default_max_new_tokens, backend.info.get("dtype", cfg.dtype)
    ident, default_new = kind_of(cfg.model).identity(cfg)
    if kind_of(cfg.model).capabilities.remote:
        return ident, default_new, "server"
    dtype = cfg.dtype
    if dtype == "auto":
        from .hf import resolve_device

        dtype = "bfloat16" if resolve_device(cfg.device).startswith("cuda") else "float32"
    return ident, default_new, dtype


def shares_prefix(backend: Any, cfg: Any) -> bool:
    """Whether this run uses the shared-prefix engine (preparation then cuts each prompt for it)."""
    caps = getattr(backend, "capabilities", None)
    return bool(cfg.share_prefix and caps is not None and caps.shared_prefix and not caps.remote)


def make_engine(backend: Any, cfg: Any) -> Any:
    """The engine a backend's capabilities call for: the shared-prefix engine for local models
    (``share_prefix=True``), a continuous request stream for servers, else plain batching."""
    from ..engine import Engine

    caps: Capabilities = backend.capabilities
    if caps.remote:
        from ..remote_engine import RemoteEngine

        return RemoteEngine(backend, backend.concurrency)
    if shares_prefix(backend, cfg):
        from ..engine import PrefixEngine

        return PrefixEngine(backend, cfg.batch_size, cfg.token_budget)
    return Engine(backend, cfg.batch_size, cfg.token_budget)
