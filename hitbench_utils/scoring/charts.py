"""Chart scoring (ECR and Pass) — the client side of the chart fork server.

Model code never runs in this process. ``score_chart`` extracts the program, checks the table, and
sends the program to a long-lived server (``chart_server``) that forks one sandboxed child per
program; Pass is then computed here from the y-values the child read off the axes. The server starts
lazily on first use, is restarted transparently if it dies, and is shut down at exit. Any number of
threads may call ``score_chart`` at once; the server runs up to ``max_children`` programs in parallel.
"""
from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from hitbench_utils.scoring import chart_code
from hitbench_utils.scoring.chart_reply import redact, server_environment

__all__ = ["score_chart", "xlsx_problem", "library_versions", "sandbox_info", "ChartRunner", "get_runner",
           "shutdown_runner"]

from hitbench_utils.data import LFS_MAGIC  # noqa: E402 - one definition of a Git LFS pointer
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def xlsx_problem(path: str | None) -> str | None:
    """Why the table cannot be used (absent, empty, a Git LFS pointer stub), or None when it can."""
    if not path:
        return "no xlsx path was given"
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(LFS_MAGIC))
    except OSError as exc:
        return f"xlsx not readable: {path} ({exc.strerror or exc})"
    if not head:
        return f"xlsx is empty: {path}"
    if head.startswith(LFS_MAGIC):
        return f"xlsx is a Git LFS pointer stub, not a table: {path}. Fetch the LFS object (git lfs pull)."
    import zipfile

    if not zipfile.is_zipfile(path):
        return f"xlsx is truncated or corrupt (not a zip archive): {path}. Fix: restore it from the dataset"
    return None


def library_versions() -> dict[str, str]:
    """Versions of what executes and scores the programs, for a run's report. Imports nothing heavy."""
    out = {"python": sys.version.split()[0]}
    for dist in ("pandas", "matplotlib", "numpy", "openpyxl", "rouge-score", "sacrebleu"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


class ChartRunner:
    """A handle on one fork server process; thread-safe, restarts the server when it dies."""

    def __init__(self, max_children: int | None = None, memory_mb: int = 4096, sandbox: str = "auto",
                 python: str | None = None, start_timeout: float = 120.0, quota_mb: int = 64) -> None:
        self.args = ["--max-children", str(max_children or max(2, os.cpu_count() or 2)),
                     "--memory-mb", str(memory_mb), "--sandbox", sandbox, "--quota-mb", str(quota_mb)]
        self.python, self.start_timeout = python or sys.executable, start_timeout
        self._lock = threading.Lock()  # starting/stopping the server
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._pending: dict[int, list] = {}
        self._ready: dict = {}
        self._stderr: Any = None

    # ---- server lifecycle -----------------------------------------------------------------
    def _start(self) -> subprocess.Popen:
        env = server_environment(os.environ, _PACKAGE_ROOT)  # an allowlist: no secret reaches the sandbox
        self._stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen([self.python, "-m", "hitbench_utils.scoring.chart_server", *self.args],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                cwd=_PACKAGE_ROOT, env=env, start_new_session=True)
        box: list = []
        reader = threading.Thread(target=self._read, args=(proc, box), daemon=True, name="chart-server-reader")
        reader.start()
        deadline = time.monotonic() + self.start_timeout
        while not box and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if not box:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"the chart server did not start: {self._stderr_tail()}")
        self._ready = box[0]
        return proc

    def _stderr_tail(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-2000:].decode(errors="replace").strip() or "(no output)"
        except (OSError, ValueError, AttributeError):
            return "(no output)"

    def _read(self, proc: subprocess.Popen, box: list) -> None:
        """Reader thread: route each reply to the waiting caller; on EOF, fail the waiters."""
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("type") == "ready":
                box.append(msg)
                continue
            slot = self._pending.get(msg.get("id"))
            if slot is not None:
                slot[1] = msg
                slot[0].set()
        for slot in list(self._pending.values()):
            if slot[2] is proc:
                slot[0].set()  # result stays None: the server died

    def _ensure(self) -> subprocess.Popen:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = self._start()
            return self._proc

    def info(self) -> dict:
        """The server's ready message: library versions and the sandbox in force (starts it if needed)."""
        self._ensure()
        return dict(self._ready)

    def __enter__(self) -> ChartRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server: EOF on its stdin makes it kill running programs and exit. (A runner that
        is never closed still goes away with this process: its server exits when stdin closes.)"""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()

    # ---- requests -------------------------------------------------------------------------
    def run(self, request: dict, timeout: float) -> dict:
        """Run one program; returns the server's reply, or an ``infra_error`` reply."""
        error = "unknown"
        for _attempt in range(2):
            try:
                proc = self._ensure()
            except (OSError, RuntimeError) as exc:
                error = str(exc)
                continue
            rid = next(self._ids)
            slot = [threading.Event(), None, proc]
            self._pending[rid] = slot
            try:
                with self._write_lock:
                    proc.stdin.write((json.dumps(dict(request, id=rid, timeout=timeout)) + "\n").encode())
                    proc.stdin.flush()
                # Queueing in the server adds to the wall time; give up only on a hung server.
                limit = time.monotonic() + (timeout + 30) * (1 + len(self._pending))
                while not slot[0].wait(0.5):
                    if proc.poll() is not None or time.monotonic() > limit:
                        break
            except (OSError, ValueError):
                pass
            finally:
                self._pending.pop(rid, None)
            if slot[1] is not None:
                return slot[1]
            error = f"the chart server died or hung; stderr: {self._stderr_tail()}"
            with self._lock:
                if self._proc is proc:
                    proc.kill()
                    proc.wait()
                    self._proc = None
        return {"ECR": False, "error": error, "infra_error": True}


_runner: ChartRunner | None = None
_runner_lock = threading.Lock()


def get_runner() -> ChartRunner:
    """The process-wide runner (created on first use; nothing runs at import)."""
    global _runner
    with _runner_lock:
        if _runner is None:
            _runner = ChartRunner()
            atexit.register(shutdown_runner)
        return _runner


def shutdown_runner() -> None:
    """Stop the process-wide chart server (registered with atexit)."""
    global _runner
    with _runner_lock:
        runner, _runner = _runner, None
    if runner is not None:
        runner.close()


def _forget_runner_in_child() -> None:
    global _runner
    _runner = None  # a forked copy of this process must not share the parent's pipes


os.register_at_fork(after_in_child=_forget_runner_in_child)


def sandbox_info() -> dict:
    """Library versions and sandbox layers of the running chart server (starts it if needed)."""
    return get_runner().info()


def write_series_artifact(folder: str, name: str, result: dict) -> str | None:
    """Save the chart's series, ECR and error (already redacted) as ``<folder>/<name>.json``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(name))[:120]
    path = os.path.join(folder, stem + ".json")
    meta = {k: result.get(k) for k in ("ECR", "error", "series", "duration_s", "chart_type", "compat")}
    try:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as fh:
            json.dump(meta, fh, allow_nan=True)
    except OSError:
        return None
    return path


def score_chart(code: str, chart_type: str, reference: str, xlsx_path: str, timeout: float = 20,
                artifacts_dir: str | None = None, compat: bool = False, *,
                artifact_name: str | None = None, runner: ChartRunner | None = None,
                allow_unsealed: bool = False, secrets: Sequence[str] = ()) -> dict:
    """Score one Visualization answer: ``ECR`` (ran without error), ``Pass`` (its y-data match the
    reference), ``error``, ``series``, ``missing_input`` (the table is absent or an LFS stub: not the
    model's failure) and ``infra_error`` (our sandbox failed or cannot be sealed here, not the model).

    ``code`` may be the whole response; ``chart_type`` is 'LineChart' etc. or the whole SubQType.
    With ``artifacts_dir`` the chart PNG and its series JSON are saved there as ``artifact_name``.
    ``allow_unsealed`` runs the program even when a confinement layer is missing on this machine
    (``unsealed`` then lists them); by default such a chart is an ``infra_error``. Every text stored
    or returned has each of ``secrets`` replaced by ``[redacted]``.
    """
    chart_type = chart_code.chart_type_of(chart_type)
    result: dict = {"ECR": False, "Pass": False, "error": None, "series": None, "missing_input": False,
                    "infra_error": False, "chart_type": chart_type, "compat": compat}
    program = chart_code.prepare_code(code or "")
    if program is None:
        result["error"] = "no chart program found (import pandas/matplotlib … plt.show())"
        return result
    problem = xlsx_problem(xlsx_path)
    if problem:
        result.update(missing_input=True, error=problem)
        return result
    if artifacts_dir and not artifact_name:
        digest = hashlib.sha1(f"{chart_type}\0{xlsx_path}\0{program}".encode()).hexdigest()[:12]
        artifact_name = f"chart-{digest}"
    request = {"code": program, "chart_type": chart_type, "xlsx": os.path.abspath(xlsx_path),
               "compat": compat, "artifacts_dir": os.path.abspath(artifacts_dir) if artifacts_dir else None,
               "artifact_name": artifact_name, "allow_unsealed": bool(allow_unsealed)}
    reply = (runner or get_runner()).run(request, float(timeout))
    for key in ("ECR", "error", "series", "missing_input", "infra_error", "duration_s", "artifacts", "unsealed",
                "render_error"):
        if key in reply:
            result[key] = reply[key]
    result["ECR"] = bool(result["ECR"])
    result["error"], result["series"] = redact(result["error"], secrets), redact(result["series"], secrets)
    if result.get("render_error"):
        result["render_error"] = redact(result["render_error"], secrets)
    if result["ECR"] and result["series"] is not None:
        result["Pass"], why = chart_code.chart_pass(result["series"], reference, chart_type)
        if why:
            result["reference_error"] = why
    if artifacts_dir and not result["infra_error"]:
        written = write_series_artifact(os.path.abspath(artifacts_dir), artifact_name, result)
        if written:
            result["artifacts"] = dict(result.get("artifacts") or {}, json=written)
    return result
