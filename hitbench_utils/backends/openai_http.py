"""HTTP to an OpenAI-compatible server: one request with the retry policy, and what identifies the
served model (for the run fingerprint).

Standard library only (urllib). Every text that comes from the server (error bodies, reason phrases,
bodies that are not JSON) is redacted (:mod:`hitbench_utils.redact`) where it enters, before it is cut
short, logged or put into an exception, so an API key a server echoes back goes nowhere.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import Any

from ..errors import BadReply, ConfigError, ModelLoadError, OpenAIError, SampleTimeout
from ..redact import redact, secret_values

log = logging.getLogger("hitbench")

PREFIX = "openai:"
RETRY_STATUSES = frozenset({408, 429}) | frozenset(range(500, 600))
MAX_BODY = 64 * 2**20          # bytes of one reply read at most: a larger one is a BadReply
_MAX_RETRY_AFTER = 300.0
# What a server's /models entry says about the model it serves; kept in the fingerprint when present.
SERVED_FIELDS = ("id", "root", "parent", "owned_by", "max_model_len")


class _Retryable(Exception):
    def __init__(self, msg: str, retry_after: float | None = None, timeout: bool = False,
                 bad_reply: bool = False) -> None:
        super().__init__(msg)
        self.retry_after, self.timeout, self.bad_reply = retry_after, timeout, bad_reply


class _Refused(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


def model_name(model: str) -> str:
    """``'openai:<name>'`` → ``'<name>'``."""
    if not model.startswith(PREFIX) or not model[len(PREFIX):].strip():
        raise ConfigError("model", model, "'openai:<name>', the name the server knows the model by")
    return model[len(PREFIX):].strip()


def is_loopback(url: str) -> bool:
    return (urllib.parse.urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


def retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def server_message(raw: bytes) -> str:
    """The human part of an error body (``error.message``, ``detail``...), else the text itself."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(err, dict):
            err = err.get("message", err)
        return err if isinstance(err, str) else json.dumps(err)
    return text


class Transport:
    """Requests to one server with the retry policy (see the backend's module docstring): 408/429/5xx,
    connection errors, timeouts and unreadable bodies are retried with backoff; other 4xx pass through
    as ``_Refused``. ``stats`` (``http_calls``, ``retries``) is updated under ``lock``."""

    def __init__(self, base_url: str, *, api_key_env: str | None, max_retries: int = 5, backoff_base: float = 1.0,
                 backoff_max: float = 30.0, stats: dict | None = None, lock: threading.Lock | None = None) -> None:
        self.base_url, self.api_key_env, self.max_retries = base_url.rstrip("/"), api_key_env, max_retries
        self.backoff_base, self.backoff_max = float(backoff_base), float(backoff_max)
        self.stats = stats if stats is not None else {"http_calls": 0, "retries": 0}
        self.lock = lock or threading.Lock()
        self.secrets = secret_values([api_key_env])
        self._key_seen = os.environ.get(api_key_env) if api_key_env else None
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if is_loopback(base_url) else []))

    def redact(self, obj: Any) -> Any:
        """``obj`` without the API key (nor any other secret of the environment)."""
        return redact(obj, self.secrets)

    def _clip(self, text: str, n: int = 2000) -> str:
        return self.redact(text)[:n]          # redact first: a cut must not leave half a key behind

    def headers(self) -> dict:
        h = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            h["Authorization"] = f"Bearer {key}"
            if key != self._key_seen:       # set or changed after we started: still never stored
                self.secrets, self._key_seen = secret_values([self.api_key_env]), key
        return h

    def once(self, method: str, url: str, body: dict | None, timeout: float) -> Any:
        """One HTTP request; the decoded JSON reply, or _Retryable / _Refused."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        req = urllib.request.Request(url, data=data, method=method, headers=self.headers())
        with self.lock:
            self.stats["http_calls"] += 1
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                raw = resp.read(MAX_BODY + 1)
        except urllib.error.HTTPError as e:
            try:
                msg = server_message(e.read(MAX_BODY) or b"") or str(e.reason)
            except (OSError, HTTPException):
                msg = str(e.reason)
            msg = self._clip(msg)
            if e.code in RETRY_STATUSES:
                raise _Retryable(f"HTTP {e.code}: {msg}", retry_after(e.headers.get("Retry-After"))) from None
            raise _Refused(e.code, msg) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer within {timeout:g}s", timeout=True) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no connection within {timeout:g}s", timeout=True) from None
            raise _Retryable(self._clip(f"connection failed: {e.reason}")) from None
        except (ConnectionError, HTTPException, OSError) as e:   # reset, refused, server gone mid-answer
            raise _Retryable(self._clip(f"connection failed: {type(e).__name__}: {e}")) from None
        if len(raw) > MAX_BODY:
            raise BadReply(f"{url} sent a reply over {MAX_BODY:,} bytes", "not read further")
        try:
            return json.loads(raw)
        except ValueError:
            text = self._clip(raw.decode("utf-8", "replace"), 200)
            raise _Retryable(f"the reply is not JSON ({len(raw):,} bytes): {text!r}", bad_reply=True) from None

    def backoff(self, attempt: int, after: float | None) -> float:
        if after is not None:
            return min(after, _MAX_RETRY_AFTER)
        d = min(self.backoff_max, self.backoff_base * 2 ** attempt)
        return d / 2 + random.uniform(0, d / 2)

    def call(self, method: str, url: str, body: dict | None, *, timeout: float, retries: int | None = None,
             hard_deadline: bool = False, note: dict | None = None) -> Any:
        """One request with the retry policy. ``_Refused`` passes through (a 4xx: not retried); running out
        of retries raises SampleTimeout (last failure a timeout), BadReply (an unreadable body) or
        OpenAIError. ``hard_deadline``: a timeout is final at once (max_time_per_sample)."""
        retries = self.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return self.once(method, url, body, timeout)
            except _Retryable as e:
                last = e
                if e.timeout and hard_deadline:
                    raise SampleTimeout(f"{url}: no answer within max_time_per_sample={timeout:g}s") from None
                if attempt == retries:
                    break
                wait = self.backoff(attempt, e.retry_after)
                log.warning("%s %s: %s; retry %d/%d in %.1fs", method, url, e, attempt + 1, retries, wait)
                with self.lock:
                    self.stats["retries"] += 1
                if note is not None:
                    note["retries"] = note.get("retries", 0) + 1
                time.sleep(wait)
        msg = f"{method} {url}: {last} (after {retries + 1} attempt{'s' if retries else ''})"
        if last.timeout:
            raise SampleTimeout(msg)
        raise BadReply(msg) if last.bad_reply else OpenAIError(msg)


# ---- what is served: the fingerprint's model identity ---------------------------------------------------
def identity_from_models(name: str, body: Any) -> dict | None:
    """The ``/models`` entry whose ``id`` is ``name``, reduced to SERVED_FIELDS (strings and integers
    only); None when the reply lists no such model."""
    entries = body.get("data") if isinstance(body, dict) else None
    for m in entries if isinstance(entries, list) else []:
        if isinstance(m, dict) and m.get("id") == name:
            return {k: m[k] for k in SERVED_FIELDS
                    if isinstance(m.get(k), (str, int)) and not isinstance(m.get(k), bool)}
    return None


def identity(model: str, served: dict | None, tokenizer: str | None) -> dict:
    """The fingerprint's model identity: the name asked for, what the server says it serves, and the
    tokenizer (it decides how tables are truncated). Not the URL: the same model at another address
    resumes."""
    return {"path": PREFIX + model_name(model), "served": served, "tokenizer": tokenizer}


def served_identity(model: str, base_url: str, *, tokenizer: str | None = None,
                    api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 30.0, max_retries: int = 5,
                    backoff_base: float = 1.0) -> dict:
    """The identity of ``model`` as the server at ``base_url`` serves it (``GET {base_url}/models``), for
    the run fingerprint. A fleet (comma-separated URLs) must serve one identity. A server without
    ``/models`` (404) gives ``served: None``. Raises ModelLoadError when a server cannot be reached or
    refuses the key, ConfigError when the fleet's servers disagree."""
    name = model_name(model)
    if not base_url or not urllib.parse.urlsplit(base_url).scheme.startswith("http"):
        raise ConfigError("base_url", base_url, "the server's OpenAI-compatible URL, e.g. http://127.0.0.1:8000/v1")
    seen: dict[str, dict | None] = {}
    for url in [u.strip().rstrip("/") for u in base_url.split(",") if u.strip()]:
        t = Transport(url, api_key_env=api_key_env, max_retries=max_retries, backoff_base=backoff_base)
        try:
            body = t.call("GET", url + "/models", None, timeout=timeout)
        except _Refused as e:
            if e.status in (401, 403):
                raise ModelLoadError(f"{url} refused the key ({e.status}: {e}). Fix: put the API key in "
                                     f"${api_key_env}") from None
            body = None
        except (OpenAIError, SampleTimeout) as e:
            raise ModelLoadError(f"cannot reach {url}: {e}. Fix: start the server, or pass the right base_url "
                                 "(it usually ends in /v1)") from None
        seen[url] = t.redact(identity_from_models(name, body))
    if len({json.dumps(v, sort_keys=True) for v in seen.values()}) > 1:
        raise ConfigError("base_url", base_url, "servers that all serve the same model",
                          "their /models entries differ: " + json.dumps(seen)[:1000])
    return identity(model, next(iter(seen.values()), None), tokenizer)
