"""What crosses the sandbox's boundary: the child's reply (never trusted), the environments given
to the server and to the child (allowlists), and the parent's redaction of the secrets it knows.

The child writes one byte before the program runs: ``S`` (sealed; what follows is the program's
report, which the program itself could have written) or ``E`` (the sandbox could not be set up;
what follows is the reason, written before any untrusted code ran). So the program can never claim
an ``infra_error``, and ``parse_report`` keeps only the fixed schema, within size caps.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hitbench_utils.errors import ChartReplyError

__all__ = ["SEALED", "SETUP_FAILED", "parse_report", "interpret", "server_environment", "child_environment", "redact",
           "MAX_REPLY_BYTES", "MAX_SERIES_VALUES", "MAX_PNG_BYTES", "MAX_ERROR_CHARS"]

SEALED, SETUP_FAILED = b"S", b"E"
MAX_SERIES_VALUES = 200_000  # y-values in one chart
MAX_VALUE_CHARS = 1_000  # one text y-value
MAX_ERROR_CHARS = 2_000  # error texts
MAX_PNG_BYTES = 4 << 20
MAX_REPLY_BYTES = 16 << 20  # the whole report; a larger one is cut off and the child killed
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
_LOCALE_VARS = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


def cap_text(text: Any, limit: int = MAX_ERROR_CHARS) -> str | None:
    """``text`` as a string of at most ``limit`` characters (None stays None)."""
    if text is None:
        return None
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"… [{len(text) - limit} more characters]"


def _value(v: Any) -> float | str:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ChartReplyError(f"a y-value of type {type(v).__name__}")
    if isinstance(v, str):
        if len(v) > MAX_VALUE_CHARS:
            raise ChartReplyError(f"a text y-value of {len(v)} characters (at most {MAX_VALUE_CHARS})")
        return v
    return float(v) if not (isinstance(v, float) and math.isnan(v)) else math.nan


def _series(raw: Any) -> list:
    if not isinstance(raw, list):
        raise ChartReplyError(f"series is a {type(raw).__name__}, not a list")
    out, count = [], 0
    for item in raw:
        if isinstance(item, list):
            out.append([_value(v) for v in item])
            count += len(item)
        else:
            out.append(_value(item))
            count += 1
        if count > MAX_SERIES_VALUES:
            raise ChartReplyError(f"more than {MAX_SERIES_VALUES} y-values")
    return out


def _png(raw: Any) -> bytes:
    if not isinstance(raw, str) or len(raw) > (MAX_PNG_BYTES * 4) // 3 + 4:
        raise ChartReplyError(f"the PNG is larger than {MAX_PNG_BYTES >> 20} MB")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ChartReplyError("the PNG is not base64") from None
    if not data.startswith(PNG_MAGIC):
        raise ChartReplyError("the PNG does not start with the PNG signature")
    return data


def parse_report(raw: bytes) -> dict:
    """The child's report reduced to ``{ECR, error, series, png (bytes|None), render_error}``.

    Unknown fields are dropped; a report that is not JSON, not an object, or breaks a type or a
    cap gives ``ECR`` False with an error that says the reply was malformed."""
    out: dict = {"ECR": False, "error": None, "series": None, "png": None, "render_error": None}
    try:
        if len(raw) > MAX_REPLY_BYTES:
            raise ChartReplyError(f"{len(raw)} bytes (at most {MAX_REPLY_BYTES})")
        try:
            obj = json.loads(raw)
        except ValueError as exc:
            raise ChartReplyError(f"not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise ChartReplyError(f"a JSON {type(obj).__name__}, not an object")
        if not isinstance(obj.get("ECR"), bool):
            raise ChartReplyError("ECR is missing or not a boolean")
        for key in ("error", "render_error"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                raise ChartReplyError(f"{key} is not text")
        series = None if obj.get("series") is None else _series(obj["series"])
        png = None
        if obj.get("png") is not None:
            try:
                png = _png(obj["png"])
            except ChartReplyError as exc:  # the chart still counts; only its picture is refused
                out["render_error"] = f"PNG refused: {exc}"
    except ChartReplyError as exc:
        out["error"] = f"the program's reply was malformed: {exc}"
        return out
    out.update(ECR=obj["ECR"], error=cap_text(obj.get("error")), series=series, png=png)
    out["render_error"] = out["render_error"] or cap_text(obj.get("render_error"))
    return out


def interpret(buf: bytes, result: dict, *, timeout: float | None, too_large: bool,
              exit_text: Callable[[], str]) -> bytes | None:
    """Fill ``result`` from everything the child wrote (``buf``); returns the validated PNG, if any.

    Only bytes written before the sealing byte (``E``: a layer failed) can make an infra_error;
    after ``S`` everything is the program's and goes through ``parse_report``."""
    if timeout is not None:
        result["error"] = f"timeout: the program ran longer than {timeout:g} s"
    elif too_large:
        result["error"] = f"the program's reply was malformed: more than {MAX_REPLY_BYTES} bytes"
    elif buf[:1] == SETUP_FAILED:
        result.update(infra_error=True, error=cap_text(buf[1:].decode(errors="replace")))
    elif buf[:1] != SEALED:
        result.update(infra_error=True, error="the sandbox child ended before sealing itself: " + exit_text())
    elif len(buf) == 1:
        result["error"] = exit_text()
    else:
        report = parse_report(buf[1:])
        png = report.pop("png")
        result.update({k: v for k, v in report.items() if v is not None})
        return png
    return None


def _mpl_cache_dir(env: Mapping[str, str]) -> str:
    if env.get("MPLCONFIGDIR"):
        return env["MPLCONFIGDIR"]
    cache = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "matplotlib")


def server_environment(parent: Mapping[str, str], package_root: str) -> dict[str, str]:
    """The chart server's whole environment: no API key, token, HITBENCH_* or other parent variable
    ever enters its memory, which every child inherits. HOME is kept so that Python finds the user's
    site-packages; matplotlib keeps its font cache (MPLCONFIGDIR)."""
    env = {k: parent[k] for k in _LOCALE_VARS + ("HOME", "PYTHONHOME") if parent.get(k)}
    env["PATH"] = parent.get("PATH") or SAFE_PATH
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, parent.get("PYTHONPATH")) if p)
    env.update(MPLBACKEND="Agg", PYTHONUNBUFFERED="1", MPLCONFIGDIR=_mpl_cache_dir(parent))
    env.update({k: "1" for k in _THREAD_VARS})
    return env


def child_environment(workdir: str, server_env: Mapping[str, str]) -> dict[str, str]:
    """A chart program's environment: a fixed PATH, the locale, HOME/TMPDIR/MPLCONFIGDIR set to its
    own folder, the Agg backend, single-threaded BLAS. Nothing else."""
    env = {k: server_env[k] for k in _LOCALE_VARS if server_env.get(k)}
    env.setdefault("LANG", "C.UTF-8")
    env.update(PATH=SAFE_PATH, HOME=workdir, TMPDIR=workdir, MPLCONFIGDIR=workdir, MPLBACKEND="Agg",
               USER="hitbench-sandbox", LOGNAME="hitbench-sandbox")
    env.update({k: "1" for k in _THREAD_VARS})
    return env


def redact(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` (text, or lists/dicts of text) with every known secret replaced by ``[redacted]``.
    Secrets shorter than 4 characters are ignored: replacing them would garble ordinary text."""
    keep = sorted({s for s in secrets if isinstance(s, str) and len(s) >= 4}, key=len, reverse=True)
    if not keep:
        return value
    if isinstance(value, str):
        for secret in keep:
            value = value.replace(secret, "[redacted]")
        return value
    if isinstance(value, list):
        return [redact(v, keep) for v in value]
    if isinstance(value, dict):
        return {k: redact(v, keep) for k, v in value.items()}
    return value
