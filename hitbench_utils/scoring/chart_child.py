"""What runs in the forked child of the chart server: contain, run one program, report, exit.
(Also the server's helpers that deal in children: the start-up self-test, the PNG artifact.)

The child seals itself (rlimits, identity, Landlock, seccomp, an allowlist environment), writes one
byte (``S``, or ``E`` and the reason when a layer cannot be set up: the server then reports an
``infra_error``), and only then runs the program. The program's report that follows — ``ECR``,
``error``, ``series`` and, when asked, the rendered ``png`` (base64) — is untrusted: the server
keeps only what ``chart_reply.parse_report`` accepts.
"""
from __future__ import annotations

import base64
import ctypes
import io
import json
import os
import re
import signal
import sys
import tempfile
import traceback

from hitbench_utils.scoring import chart_code, chart_reply, chart_root, landlock, sandbox

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


def self_test(job: dict, ctx: dict) -> str | None:
    """Contain a trivial program once, synchronously, in a prepared working folder (the server's
    start-up check that every layer can be set up here); the error, or None."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        run_child(job, w, ctx)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        data = fh.read()
    _, status = os.waitpid(pid, 0)
    if data[:1] == chart_reply.SETUP_FAILED:
        return data[1:].decode(errors="replace")
    if data[:1] != chart_reply.SEALED:
        return f"the sandbox self-test child ended without sealing itself ({describe_exit(status)})"
    report = chart_reply.parse_report(data[1:])
    return None if report["ECR"] and report["series"] == [] else f"the self-test program failed: {report['error']}"


def write_png(job: dict, png: bytes) -> dict:
    """Save the chart's (validated) PNG as ``<artifacts_dir>/<name>.png``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(job["name"]))[:120]
    path = os.path.join(job["artifacts_dir"], stem + ".png")
    try:
        os.makedirs(job["artifacts_dir"], exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(png)
    except OSError as exc:
        return {"error": str(exc)}
    return {"png": path}


def seal(job: dict, ctx: dict) -> None:
    """Every confinement layer, in an order where each still has what it needs: the programs' own
    root first (chroot needs CAP_SYS_CHROOT), then the allowlist environment, rlimits, the identity
    (a sandbox uid, or no capabilities), Landlock, and seccomp last (it forbids what they use)."""
    workdir = job["child_workdir"]
    if ctx["chroot"]:
        chart_root.enter_root(ctx["chroot"], workdir)
    else:
        os.chdir(workdir)
    os.environ.clear()
    os.environ.update(chart_reply.child_environment(workdir, ctx["env"]))
    tempfile.tempdir = workdir
    sandbox.apply_limits(cpu_s=int(job["timeout"]) + 1, memory_bytes=ctx["vm_bytes"] + ctx["memory_bytes"],
                         fsize_bytes=ctx["quota_bytes"])
    if ctx["mode"] == "uid":
        sandbox.drop_privileges(job["uid"], job["uid"])
    elif ctx["mode"] == "nocaps" or ctx["userns"]:
        sandbox.drop_capabilities(ctx["last_cap"])
    elif os.geteuid() == 0:
        raise PermissionError("refusing to run a chart program as root without a sandbox")
    if ctx["landlock"]:
        landlock.restrict_filesystem(workdir, ctx["landlock"], ctx["read_roots"])
    # After the uid change (which clears it): die with the server, never outlive it.
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != ctx["server_pid"]:
        os._exit(1)
    if ctx["seccomp"] and not sandbox.install_seccomp():
        raise PermissionError(f"no seccomp filter for {os.uname().machine}")


def run_child(job: dict, wfd: int, ctx: dict) -> None:
    """Entry point right after fork. Never returns."""
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, wfd)
        os.closerange(wfd + 1, 1 << 16)
        seal(job, ctx)
    except BaseException as exc:
        _write_all(wfd, chart_reply.SETUP_FAILED + f"sandbox setup failed: {type(exc).__name__}: {exc}".encode())
        os._exit(0)
    _write_all(wfd, chart_reply.SEALED)  # from here on, everything on wfd may come from the program
    me = os.getpid()
    report: dict = {"ECR": False, "error": None, "series": None}
    try:
        report.update(execute(job))
    except BaseException as exc:
        report.update(ECR=False, error=f"runner failed: {type(exc).__name__}: {exc}")
    if os.getpid() != me:  # a copy the program forked: only the original process reports
        os._exit(0)
    send(wfd, report)
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
        if count > chart_reply.MAX_SERIES_VALUES:
            out["error"] = f"the chart has {count} y-values, more than {chart_reply.MAX_SERIES_VALUES}"
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


def _write_all(fd: int, data: bytes) -> None:
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


def send(fd: int, obj: dict, newline: bool = False) -> None:
    """Write one JSON document (NaN allowed) to ``fd``, retrying short writes."""
    _write_all(fd, json.dumps(obj, allow_nan=True, default=str).encode() + (b"\n" if newline else b""))
