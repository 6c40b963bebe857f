"""The run folder's append-only sample log, its header fingerprint, the view, the lock (no torch).

samples.jsonl: line 1 is ``{"type": "header", ...}``; every other line is one flat record per attempt,
fsync'd. The view keeps the latest record per id. A torn last line (kill -9 mid-write) is cut off
before appending; a garbage line in the middle is reported with its number and skipped. Ranks of a
data-parallel run write ``samples.rank<r>.jsonl``; ``read_log`` merges every ``samples*.jsonl`` in the
order the records were logged.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .errors import FingerprintMismatch, LogWriteError, RunExistsError, RunLockedError, RunLogError
from .runfolder import LOCK_NAME, LOG_NAME, RUN_FILES, RunFolder
from .records import record_type_problem

WRITE_RETRIES = 8         # writes that make no progress before the append is declared failed


def rank_log_name(rank: int) -> str:
    return RunFolder(".").log(rank).name


def log_files(run_dir: str | os.PathLike) -> list[Path]:
    """samples.jsonl first, then the ranks' logs in rank order."""
    return RunFolder(run_dir).logs()


@dataclass
class LogContents:
    header: dict | None
    records: list[dict]
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (1-based line number, reason)
    torn_tail: bool = False
    valid_bytes: int = 0       # the length up to the last newline: what stays when a torn tail is cut
    headers: list[dict] = field(default_factory=list)    # every file's header (one per rank log)


def read_log(run_dir: str | os.PathLike) -> LogContents:
    """Every log of the run folder, merged: records in the order they were logged (``logged_at``, then
    each file's own order), bad lines named with their file, the first header."""
    files = log_files(run_dir)
    if len(files) <= 1:
        return read_file(files[0] if files else Path(run_dir) / LOG_NAME)
    parts = [read_file(f) for f in files]
    header = next((c.header for c in parts if c.header is not None), None)
    tagged = [(r.get("logged_at") or 0.0, k, n, r) for k, c in enumerate(parts) for n, r in enumerate(c.records)]
    records = [r for *_, r in sorted(tagged, key=lambda t: (t[0], t[1], t[2]))]
    bad = [(n, f"{f.name}: {why}") for f, c in zip(files, parts) for n, why in c.bad_lines]
    return LogContents(header, records, bad, any(c.torn_tail for c in parts), 0,
                       [c.header for c in parts if c.header is not None])


def read_file(path: Path) -> LogContents:
    if not path.is_file():
        return LogContents(None, [])
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = bool(lines[-1])      # no trailing newline: the last write was cut off (never counted, cut on append)
    body = lines[:-1]
    header, records, bad = None, [], []
    for n, line in enumerate(body, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            bad.append((n, f"not JSON ({e})"))
            continue
        if n == 1 and isinstance(obj, dict) and obj.get("type") == "header":
            header = obj
        elif (isinstance(obj, dict) and isinstance(obj.get("id"), int) and not isinstance(obj["id"], bool)
              and isinstance(obj.get("status"), str)):
            problem = record_type_problem(obj)
            if problem:
                bad.append((n, problem))
            else:
                records.append(obj)
        else:
            bad.append((n, "not a sample record"))
    return LogContents(header, records, bad, torn, raw.rfind(b"\n") + 1, [header] if header else [])


def view(records: Iterable[dict]) -> dict[int, dict]:
    """Exactly one record per id: the latest."""
    out: dict[int, dict] = {}
    for r in records:
        out[int(r["id"])] = r
    return out


def attempts(records: Iterable[dict]) -> dict[int, int]:
    """Attempts made per id: the highest ``attempt`` seen (a rescored record repeats its attempt)."""
    n: dict[int, int] = {}
    for r in records:
        i = int(r["id"])
        n[i] = max(n.get(i, 0), int(r.get("attempt") or n.get(i, 0) + 1))
    return n


def needs_retry(r: dict) -> bool:
    """An error that a retry may change, or an ok record an outage degraded (a re-ask that found the
    server down). Permanent errors and answers without a final line are final (DESIGN.md §4)."""
    if r["status"] != "ok":
        return not r.get("permanent")
    return any(isinstance(d, dict) and d.get("transient") for d in r.get("degraded") or [])


def runnable(ids: Iterable[int], records: list[dict], max_attempts: int) -> list[int]:
    """Ids with no record, or whose latest record needs a retry and has attempts left (ok ids are done)."""
    latest, tries = view(records), attempts(records)
    return [i for i in ids if (r := latest.get(i)) is None or (needs_retry(r) and tries.get(i, 0) < max_attempts)]


def fingerprint_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    keys = set(old) | set(new)
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def ensure_run_dir(run_dir: str | os.PathLike) -> Path:
    """Create the run folder, or say clearly why it cannot be written (root ignores permissions, so try)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise RunLogError(f"run folder {run_dir} is not writable ({e.strerror or e}). Fix: choose a writable run_dir") from None
    return run_dir


class RunLock:
    """One writer per run folder: the lock names its owner; a dead owner's lock is taken over.

    The lock file is created whole (written aside, then hard-linked into place), and every acquisition
    runs under a kernel lock on ``.lock.guard``, so two processes can never both judge a lock stale and
    both take it."""

    def __init__(self, run_dir: str | os.PathLike, name: str = LOCK_NAME) -> None:
        self.path = Path(run_dir) / name
        self.held = False

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def acquire(self) -> "RunLock":
        import fcntl

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            guard = os.open(self.path.with_name(self.path.name + ".guard"), os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise RunLogError(f"cannot write the lock in run folder {self.path.parent} ({e.strerror or e}). "
                              "Fix: choose a writable run_dir") from None
        try:
            fcntl.flock(guard, fcntl.LOCK_EX)
            other = self.owner() if self.path.exists() else None
            if self.path.exists():
                if other is not None and other.get("pid") == me["pid"] and other.get("host") == me["host"]:
                    raise RunLockedError(f"{self.path.parent} is already open for writing in this process. "
                                         "Fix: close the first run (or use another run_dir)")
                if other is not None and not _stale(other):
                    raise RunLockedError(
                        f"{self.path.parent} is being written by pid {other.get('pid')} on host {other.get('host')} "
                        f"since {time.ctime(other.get('since', 0))}. Fix: wait for it to finish, stop it, or, if that "
                        f"process is gone, delete {self.path}")
                self.path.unlink(missing_ok=True)       # a dead owner's (or an unreadable) lock: take it over
            tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(me))
            try:
                os.link(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)
            self.held = True
            return self
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
            os.close(guard)

    def release(self) -> None:
        if self.held:
            owner = self.owner()
            if owner and owner.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _stale(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return False  # another machine: we cannot tell, so we never steal it
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError):
        return False
    return False


class RunLog:
    """Writer for one run folder; open it with ``RunLog.open`` (which checks resume rules)."""

    def __init__(self, run_dir: Path, header: dict, contents: LogContents, name: str = LOG_NAME) -> None:
        self.run_dir, self.header, self.contents = run_dir, header, contents
        self.path = run_dir / name
        self._fd: int | None = None
        self.secrets: list[str] = []       # values masked in every record appended (redact.secret_values)

    @classmethod
    def open(cls, run_dir: str | os.PathLike, header: dict, *, resume: bool = True, overwrite: bool = False,
             name: str = LOG_NAME) -> "RunLog":
        """Open ``name`` for appending; resume decisions read every log of the folder (all ranks)."""
        run_dir = ensure_run_dir(run_dir)
        contents = read_log(run_dir)
        exists = contents.header is not None or contents.records
        if exists and not resume:
            if not overwrite:
                raise RunExistsError(f"{run_dir} already holds a run ({len(contents.records)} records). Fix: pass "
                                     "resume=True to continue it, or overwrite=True to move it aside and start afresh")
            backup = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
            backup.mkdir()
            for f in [p.name for p in log_files(run_dir)] + list(RUN_FILES):
                if (run_dir / f).exists():
                    os.rename(run_dir / f, backup / f)
            contents = LogContents(None, [])
        elif exists and contents.header is not None:
            for h in contents.headers:
                diff = fingerprint_diff(h.get("fingerprint", {}), header["fingerprint"])
                if diff:
                    raise FingerprintMismatch(str(run_dir), diff)
        elif exists:
            raise RunLogError(f"{run_dir / LOG_NAME} has records but no header line. Fix: move it aside and start afresh")
        log = cls(run_dir, contents.header or header, contents, name)
        own = read_file(log.path) if len(log_files(run_dir)) > 1 or name != LOG_NAME else contents
        log._open_for_append(own, write_header=own.header is None)
        return log

    def _open_for_append(self, own: LogContents, write_header: bool) -> None:
        if own.torn_tail:      # cut this file's torn tail (read_file found it) so it stays valid JSONL
            self._cut(own.valid_bytes)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size
        if write_header:
            self._write(self.header)

    def _cut(self, size: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())

    def _write(self, obj: dict) -> None:
        """Append one whole line and fsync it, or fail loudly. A short write is resumed; when the disk is
        full (ENOSPC, EDQUOT) or fails (EIO), the partial line is cut off, so every record before it
        stays whole, and the run stops with what to do."""
        data = (json.dumps(obj, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        if self._fd is None:
            raise RunLogError("the sample log is closed")
        done, stalled = 0, 0
        try:
            while done < len(data):
                n = os.write(self._fd, data[done:])
                done += n
                stalled = 0 if n else stalled + 1
                if stalled > WRITE_RETRIES:
                    raise OSError(errno.EIO, f"only {done} of {len(data)} bytes written, then {stalled} empty writes")
            os.fsync(self._fd)
        except OSError as e:
            self._fail(e, done)
        self._size += len(data)

    def _fail(self, e: OSError, written: int) -> None:
        try:
            if written:
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
        except OSError:
            pass          # read_file ignores a torn tail, and the next open cuts it
        try:
            free = shutil.disk_usage(self.run_dir).free
        except OSError:
            free = -1
        os.close(self._fd)
        self._fd = None
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EIO: "an I/O error"}.get(e.errno, e.strerror or str(e))
        raise LogWriteError(
            f"cannot append to {self.path}: {what} ({free:,} bytes free in {self.run_dir}). Every record "
            f"appended before is kept whole. Fix: free space and run again to resume") from None

    def append(self, record: dict) -> None:
        record["logged_at"] = time.time()       # orders records across the ranks' logs
        if self.secrets:                        # a server may echo the API key back: it is never stored
            from .redact import redact

            record = redact(record, self.secrets)
        self._write(record)
        self.contents.records.append(record)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
