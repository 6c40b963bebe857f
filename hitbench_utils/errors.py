"""Every error hitbench raises, in one place.

Errors that describe one *sample* (``SampleError`` subclasses) become error records with a typed
``status``; they never crash a run. Errors that describe the *run* (bad parameters, a malformed QA
file, a fingerprint mismatch, a locked folder) stop it before any work starts, with a message that
names the value, what was allowed, and the fix.
"""
from __future__ import annotations

# Typed statuses an error record can carry (DESIGN.md §4). "ok" is the only success status.
ERROR_STATUSES = ("oom", "truncation", "missing_input", "exception", "timeout")


class HitbenchError(Exception):
    """Base class: anything hitbench raises on purpose."""


# ---- run-level errors: refuse to start ------------------------------------------------------
class ConfigError(HitbenchError, ValueError):
    """A parameter has a value that is not allowed."""

    def __init__(self, name: str, value: object, allowed: object, fix: str = "") -> None:
        self.name, self.value, self.allowed = name, value, allowed
        msg = f"{name}={value!r} is not allowed; allowed: {allowed}"
        if fix:
            msg += f". Fix: {fix}"
        super().__init__(msg)


class DataError(HitbenchError):
    """The QA file or the data folder is malformed (checked before any work starts)."""


class ModelLoadError(HitbenchError):
    """The model folder is not a loadable model, or the requested attention is unavailable."""


class FingerprintMismatch(HitbenchError):
    """Resuming a run folder whose header was written by a different configuration. Only the settings
    that differ are shown, each as ``key: old -> new`` (nested settings by their dotted path)."""

    def __init__(self, run_dir: str, diff: dict[str, tuple[object, object]]) -> None:
        self.diff = {k: v for key, (a, b) in diff.items() for k, v in _leaf_diff(key, a, b).items()}
        lines = [f"  {k}: {a!r} -> {b!r}" for k, (a, b) in sorted(self.diff.items())]
        super().__init__(
            f"{run_dir} holds a run with a different configuration (run folder -> this run):\n" + "\n".join(lines)
            + "\nFix: use another run_dir, restore the original parameters, "
            "or pass resume=False, overwrite=True to start the folder afresh."
        )


def _leaf_diff(key: str, a: object, b: object) -> dict[str, tuple[object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[object, object]] = {}
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                out.update(_leaf_diff(f"{key}.{k}", a.get(k), b.get(k)))
        return out
    return {key: (a, b)}


class RunExistsError(HitbenchError):
    """resume=False on a folder that already holds a run, without overwrite=True."""


class RunLockedError(HitbenchError):
    """Another live process is writing this run folder."""


class RunLogError(HitbenchError):
    """The sample log cannot be read or written."""


class LogWriteError(RunLogError):
    """Appending to the sample log failed (disk full, I/O error). Every record already appended is whole
    on disk and the torn tail is cut, so the next resume continues from there."""


class RunFailed(HitbenchError):
    """The run ended, but not well enough for a script to go on (the notebook's last cell raises it)."""


# ---- the chart sandbox ----------------------------------------------------------------------
class SandboxLayerError(HitbenchError, OSError):
    """A confinement layer of the chart sandbox (mount namespace, quota tmpfs, the programs' own
    root) cannot be set up here. The server lists it and charts fail closed as infra_error."""


class ChartReplyError(HitbenchError, ValueError):
    """A chart program's reply breaks the fixed schema or a size cap (then: ECR False, 'malformed')."""


# ---- sample-level errors: become error records -------------------------------------------------
class SampleError(HitbenchError):
    """One sample failed; ``status`` is the record's typed status. ``permanent`` errors are
    deterministic (the same input fails the same way), so resume does not retry them."""

    status = "exception"
    permanent = False

    def __init__(self, *args: object, permanent: bool | None = None) -> None:
        super().__init__(*args)
        if permanent is not None:
            self.permanent = permanent


class MissingInputError(SampleError):
    """A table, image or xlsx file is absent, empty, corrupt or a Git LFS pointer stub. Permanent: the
    same file fails the same way, so resume retries it only once the file is there (``data.inputs_present``)."""

    status = "missing_input"
    permanent = True


class TruncationError(SampleError):
    """The prompt cannot be brought under max_input_tokens (e.g. the question alone is too long)."""

    status = "truncation"


class SampleTimeout(SampleError):
    """Generation exceeded max_time_per_sample."""

    status = "timeout"


class SampleOOM(SampleError):
    """Out of memory after every fallback was tried."""

    status = "oom"


class OpenAIError(SampleError):
    """A request an OpenAI-compatible server refused (4xx), or that failed every retry; ``http_status``
    when known."""

    status = "exception"

    def __init__(self, msg: str, http_status: int | None = None) -> None:
        super().__init__(msg)
        self.http_status = http_status


class BadReply(OpenAIError):
    """The server answered, but not with an answer: a body that is not JSON, no ``choices``, ``content``
    null or without text. ``detail`` names what came instead."""

    def __init__(self, msg: str, detail: str = "", http_status: int | None = None) -> None:
        super().__init__(msg + (f" ({detail})" if detail else ""), http_status)
        self.detail = detail


def is_transient(exc: BaseException) -> bool:
    """An outage (the server refused or dropped the connection), not the sample's own failure: an ok
    record whose re-ask failed this way is retried on resume."""
    if getattr(exc, "transient", False):
        return True
    return isinstance(exc, (ConnectionError, TimeoutError)) or "connection refused" in str(exc).lower()


def status_of(exc: BaseException) -> str:
    """Map any exception to a record status, so callers never need isinstance ladders."""
    if isinstance(exc, SampleError):
        return exc.status
    name = type(exc).__name__
    if name == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "oom"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "exception"


class InputDecodeError(MissingInputError):
    """A table file is not valid UTF-8 (nor the opt-in ``table_encoding``): unusable as data, like a stub."""
