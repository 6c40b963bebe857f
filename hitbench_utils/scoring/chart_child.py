"""What runs in the forked child of the chart server: contain, run one program, report, exit.
(Also the server's helpers that deal in children's results: the start-up self-test, artifacts.)

The child reports one JSON object over a pipe: ``ECR``, ``error``, ``series`` and, when asked, the
rendered ``png`` (base64). A failure to *contain* the program (rlimits, uid drop, Landlock) is
reported with ``infra_error`` so it is never mistaken for the model's failure.
"""
from __future__ import annotations

import base64
import ctypes
import io
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import traceback

from hitbench_utils.scoring import chart_code, sandbox

MAX_SERIES_VALUES = 1_000_000
PROGRAM_NAME = "<chart program>"
_PR_SET_PDEATHSIG = 1


def warm_up() -> dict:
    """Import and exercise what chart programs use, in the server, so every child inherits it ready."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy
    import openpyxl
    import pandas

    buf = io.BytesIO()
    pandas.DataFrame({"a": [1, 2], "b": ["x", "y"]}).to_excel(buf, index=False)
    buf.seek(0)
    pandas.read_excel(buf)
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4], label="l")
    ax.bar(["a", "b"], [1, 2])
    ax.scatter([1], [2])
    ax.set_title("warm")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png")
    plt.figure()
    plt.pie([1, 2], labels=["a", "b"], autopct="%1.1f%%")
    plt.close("all")
    return {"python": sys.version.split()[0], "pandas": pandas.__version__,
            "matplotlib": matplotlib.__version__, "numpy": numpy.__version__,
            "openpyxl": openpyxl.__version__}


def describe_exit(status: int) -> str:
    """Why a child ended without a report, from its wait status."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGXCPU:
            return "CPU time limit exceeded (SIGXCPU)"
        return f"the program's process was killed by {signal.Signals(sig).name}"
    return f"the program's process exited with code {os.WEXITSTATUS(status)} before reporting"


def self_test(base: str, uid: int | None, ctx: dict) -> str | None:
    """Contain a trivial program once, synchronously (the server's start-up check); the error, or None."""
    workdir = tempfile.mkdtemp(dir=base)
    job = {"code": "x = 1\n", "chart_type": "BarChart", "timeout": 10, "uid": uid, "dedicated": False,
           "workdir": workdir, "xlsx_copy": os.path.join(workdir, "table.xlsx")}
    if uid is not None:
        os.chown(workdir, uid, uid)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        run_child(job, w, ctx)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    os.waitpid(pid, 0)
    shutil.rmtree(workdir, ignore_errors=True)
    try:
        report = json.loads(data)
    except ValueError:
        return "the sandbox self-test child died without a report"
    return report.get("error") if report.get("infra_error") or not report.get("ECR") else None


def write_artifacts(job: dict, result: dict, png: str | None) -> dict:
    """Save the chart's PNG and a JSON of its series/ECR/error as ``<artifacts_dir>/<name>.*``."""
    folder = job["artifacts_dir"]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(job["name"]))[:120]
    written = {}
    try:
        os.makedirs(folder, exist_ok=True)
        if png:
            written["png"] = os.path.join(folder, stem + ".png")
            with open(written["png"], "wb") as fh:
                fh.write(base64.b64decode(png))
        written["json"] = os.path.join(folder, stem + ".json")
        meta = {k: result.get(k) for k in ("ECR", "error", "series", "duration_s")}
        meta.update(chart_type=job["chart_type"], compat=job["compat"])
        with open(written["json"], "w") as fh:
            json.dump(meta, fh, allow_nan=True)
    except OSError as exc:
        written["error"] = str(exc)
    return written


def run_child(job: dict, wfd: int, ctx: dict) -> None:
    """Entry point right after fork. Never returns."""
    report: dict = {"ECR": False, "error": None, "series": None}
    try:
        server_pid = os.getppid()
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, wfd)
        os.closerange(wfd + 1, 1 << 16)
        workdir = job["workdir"]
        os.chdir(workdir)
        os.environ.update(HOME=workdir, TMPDIR=workdir, MPLBACKEND="Agg")
        tempfile.tempdir = workdir
        sandbox.apply_limits(cpu_s=int(job["timeout"]) + 1,
                             memory_bytes=ctx["vm_bytes"] + ctx["memory_bytes"])
        if ctx["landlock"]:
            sandbox.restrict_filesystem(workdir, ctx["landlock"])
        if ctx["mode"] == "uid":
            os.environ["USER"] = os.environ["LOGNAME"] = "hitbench-sandbox"
            sandbox.drop_privileges(job["uid"], job["uid"])
        elif ctx["mode"] == "nocaps":
            sandbox.drop_capabilities()
        elif os.geteuid() == 0:
            raise PermissionError("refusing to run a chart program as root without a sandbox")
        # After the uid change (which clears it): die with the server, never outlive it.
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != server_pid:
            os._exit(1)
        if not sandbox.install_seccomp() and ctx["mode"] == "nocaps":
            raise PermissionError(f"no seccomp filter for {os.uname().machine}: cannot contain uid 0")
    except BaseException as exc:
        report.update(error=f"sandbox setup failed: {type(exc).__name__}: {exc}", infra_error=True)
        send(wfd, report)
        os._exit(0)
    me = os.getpid()
    try:
        report.update(execute(job))
    except BaseException as exc:
        report.update(ECR=False, error=f"runner failed: {type(exc).__name__}: {exc}", infra_error=True)
    if os.getpid() != me:  # a copy the program forked: only the original process reports
        os._exit(0)
    send(wfd, report)
    if job.get("dedicated"):  # a uid nobody else has: take escaped descendants down with us
        try:
            os.kill(-1, signal.SIGKILL)
        except OSError:
            pass
    os._exit(0)


def execute(job: dict) -> dict:
    """Run the program as module-level code, then read the current axes (and render, if asked)."""
    import builtins

    import matplotlib.pyplot as plt

    out: dict = {}
    plt.close("all")
    plt.show = lambda *args, **kwargs: None
    code = chart_code.rewrite_xlsx_paths(job["code"], job["xlsx_copy"])
    g: dict = {"__name__": "__main__", "__builtins__": builtins}
    try:
        compiled = compile(code, PROGRAM_NAME, "exec")
        if job.get("compat"):
            # The reference harness exec'd inside a function: separate globals and locals, so names the
            # program defines are invisible to its comprehensions and lambdas. Its globals held pd/plt/np.
            import numpy
            import pandas

            g.update(pd=pandas, plt=plt, np=numpy)
            exec(compiled, g, {})
        else:
            exec(compiled, g)  # one dict: globals are locals, as in a script
        out["ECR"] = True
    except SystemExit as exc:
        out["ECR"] = exc.code in (None, 0)
        if not out["ECR"]:
            out["error"] = f"SystemExit: {exc.code}"
    except BaseException as exc:
        out["ECR"] = False
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f" (line {f.lineno})" for f in reversed(frames) if f.filename == PROGRAM_NAME), "")
        out["error"] = f"{type(exc).__name__}: {str(exc)[:500]}{where}"
    if not out["ECR"]:
        return out
    try:
        series = chart_code.extract_series(plt.gca(), job["chart_type"])
        count = sum(len(s) if isinstance(s, list) else 1 for s in series)
        if count > MAX_SERIES_VALUES:
            out["error"] = f"the chart has {count} y-values, more than {MAX_SERIES_VALUES}"
        else:
            out["series"] = series
    except BaseException as exc:
        out["error"] = f"reading the chart failed: {type(exc).__name__}: {str(exc)[:300]}"
    if job.get("render"):
        try:
            fig = plt.gcf()
            width, height = fig.get_size_inches()
            dpi = min(100.0, 4000.0 / max(width, height, 1e-3))  # cap a huge figure at 4000 px
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=dpi)
            out["png"] = base64.b64encode(buf.getvalue()).decode("ascii")
        except BaseException as exc:
            out["render_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def send(fd: int, obj: dict, newline: bool = False) -> None:
    """Write one JSON document (NaN allowed) to ``fd``, retrying short writes."""
    data = json.dumps(obj, allow_nan=True, default=str).encode() + (b"\n" if newline else b"")
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except BlockingIOError:
            import select

            select.select([], [fd], [], 1.0)
        except OSError:
            return
