"""Keep secrets (API keys, tokens) out of everything a run stores.

A server may echo the request's ``Authorization`` header back: in an error body, in a proxy's HTML
page, even in the answer's content. Whatever text crosses from a server into a record, a log line or
``results.json`` goes through :func:`redact` first, so the key's value never reaches the run folder.

Which values are secret (:func:`secret_values`): the values of the environment variables the run names
(``api_key_env``, ``judge_api_key_env``), and of every environment variable whose *name* says it holds
one (it contains KEY, TOKEN, SECRET or PASSWORD; TOKENIZER does not count, so a ``TOKENIZER_DIR``
folder is not masked). Short values are left alone, because replacing a short string everywhere would
corrupt ordinary answers: a named key needs at least 4 characters, one found by its name at least 8.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Mapping, TypeVar

MASK = "***"
SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
MIN_NAMED = 4          # the length a value of an explicitly named variable needs to be redacted
MIN_FOUND = 8          # ... and one found by its name's pattern

T = TypeVar("T")


def secret_values(env_names: Iterable[str | None] = (), environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret values to redact, longest first (so a key that contains another is masked whole).

    ``env_names``: variables the run reads a key from (``None`` entries are skipped)."""
    env = os.environ if environ is None else environ
    named = {n for n in env_names if n}
    found = set()
    for name, value in env.items():
        value = value.strip()
        if name in named and len(value) >= MIN_NAMED:
            found.add(value)
        elif any(p in name.upper().replace("TOKENIZER", "") for p in SECRET_NAME_PARTS) and len(value) >= MIN_FOUND:
            found.add(value)
    return sorted(found, key=lambda v: (-len(v), v))


def redact_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by ``***``."""
    for s in secrets:
        if s and s in text:
            text = text.replace(s, MASK)
    return text


def redact(obj: T, secrets: Iterable[str]) -> T:
    """``obj`` with every secret replaced by ``***``: strings, bytes, and (recursively) the keys and
    values of dicts and the items of lists and tuples; other values come back unchanged. Returns the
    same type (a new object when anything is walked, the input itself when there is nothing to hide)."""
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)    # a key holding another: masked whole
    if not secrets:
        return obj
    return _walk(obj, secrets)


def _walk(obj, secrets: list[str]):
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, (bytes, bytearray)):
        out = bytes(obj)
        for s in secrets:
            out = out.replace(s.encode("utf-8"), MASK.encode())
        return type(obj)(out)
    if isinstance(obj, dict):
        return {_walk(k, secrets): _walk(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk(v, secrets) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_walk(v, secrets) for v in obj)
    return obj



class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in each record's message and traceback. On the ``hitbench``
    logger itself (``logging.getLogger("hitbench").addFilter(...)``) it runs before every handler, so
    run.log and the notebook's printed log are both masked; on one handler it masks that handler's
    output (and, as the record is shared, that of the handlers after it)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = redact_text(record.getMessage(), self.secrets), None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact_text(record.exc_text, self.secrets)
        return True
