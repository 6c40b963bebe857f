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
    """Resuming a run folder whose header was written by a different configuration."""

    def __init__(self, run_dir: str, diff: dict[str, tuple[object, object]]) -> None:
        self.diff = diff
        lines = [f"  {k}: run folder has {a!r}, this run has {b!r}" for k, (a, b) in sorted(diff.items())]
        super().__init__(
            f"{run_dir} holds a run with a different configuration:\n" + "\n".join(lines)
            + "\nFix: use another run_dir, restore the original parameters, "
            "or pass resume=False, overwrite=True to start the folder afresh."
        )


class RunExistsError(HitbenchError):
    """resume=False on a folder that already holds a run, without overwrite=True."""


class RunLockedError(HitbenchError):
    """Another live process is writing this run folder."""


class RunLogError(HitbenchError):
    """The sample log cannot be read or written."""


# ---- sample-level errors: become error records -------------------------------------------------
class SampleError(HitbenchError):
    """One sample failed; ``status`` is the record's typed status."""

    status = "exception"


class MissingInputError(SampleError):
    """A table, image or xlsx file is absent, empty, corrupt or a Git LFS pointer stub."""

    status = "missing_input"


class TruncationError(SampleError):
    """The prompt cannot be brought under max_input_tokens (e.g. the question alone is too long)."""

    status = "truncation"


class SampleTimeout(SampleError):
    """Generation exceeded max_time_per_sample."""

    status = "timeout"


class SampleOOM(SampleError):
    """Out of memory after every fallback was tried."""

    status = "oom"


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
