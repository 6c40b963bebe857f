"""The chart fork server: ``python -m hitbench_utils.scoring.chart_server``.

Starting Python and importing pandas + matplotlib costs about a second, so one long-lived server
pays it once and forks a fresh child per program (a few milliseconds). The server is single-threaded
(an event loop over stdin, the children's result pipes and a SIGCHLD wake-up pipe), so forking is
safe. Protocol: one JSON request per line on stdin, one JSON reply per line on stdout, matched by
``id``; ``{"type": "ready", ...}`` once warmed up; EOF on stdin (or SIGTERM) shuts it down.

Per program the server makes a fresh working folder — a size-limited tmpfs (``quota``) in the
server's private mount namespace — holding a copy of the xlsx (the sandbox uid may not be able to
read the original, and must not be able to change it), forks the child (``chart_child``), enforces
the wall timeout by killing the child's process group and — for a dedicated uid — every process of
that uid, validates the child's report (``chart_reply``), writes the PNG, and removes the folder.

It fails closed: a confinement layer that cannot be set up here (no Landlock, no seccomp filter for
this CPU, no private mount namespace for the quota, a failed self-test) is listed in ``missing``, and
every request is then answered with an ``infra_error`` naming it, unless the request says
``allow_unsealed`` (the ``chart_allow_unsealed`` parameter): then it runs with the layers there are.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import selectors
import signal
import tempfile
import time
from collections import deque



class Server:
    def __init__(self, max_children: int, memory_mb: int, uid_base: int, mode: str = "auto",
                 quota_mb: int = 64, namespace_error: str | None = None) -> None:
        from hitbench_utils.scoring import chart_child, chart_reply, sandbox
        from hitbench_utils.scoring.confinement import Confinement, remove_stale_folders, temp_root

        self.child, self.reply_mod, self.sandbox = chart_child, chart_reply, sandbox
        self.max_children = max_children
        self.queue: deque = deque()
        self.running: dict[int, dict] = {}
        self.closing = False
        remove_stale_folders()
        self.base = tempfile.mkdtemp(prefix=f"hitbench-charts-{os.getpid()}-", dir=temp_root())
        os.chmod(self.base, 0o711)  # sandbox uids may enter their own folder, not list others
        self.conf = conf = Confinement(self.base, max_children, memory_mb, uid_base, mode, quota_mb, namespace_error)
        self.ctx, self.uids, self.missing = conf.ctx, conf.uids, conf.missing
        self.out_fd = os.dup(1)  # replies go here; stray library prints go to /dev/null
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        self.sel = selectors.DefaultSelector()
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, "stdin")
        self.inbuf = b""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        ctypes.CDLL(None).prctl(sandbox.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans come to us
        conf.test_error = conf.self_test()

    def _on_term(self, *_: object) -> None:
        self.closing = True

    def info(self) -> dict:
        return {**self.conf.info(), "max_children": self.max_children}

    def reply(self, obj: dict) -> None:
        self.child.send(self.out_fd, obj, newline=True)

    # ---- requests -------------------------------------------------------------------------
    def read_stdin(self) -> None:
        try:
            data = os.read(0, 1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.closing = True
            return
        self.inbuf += data
        *lines, self.inbuf = self.inbuf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except ValueError:
                continue
            if not isinstance(req, dict):
                continue
            if req.get("type") == "shutdown":
                self.closing = True
            elif req.get("type") == "info":
                self.reply({"type": "info", "id": req.get("id"), **self.info()})
            else:
                self.queue.append(req)

    def start(self, req: dict) -> None:
        job = {"id": req.get("id"), "timeout": float(req.get("timeout", 20)), "code": str(req.get("code", "")),
               "chart_type": str(req.get("chart_type", "")), "compat": bool(req.get("compat")),
               "render": bool(req.get("artifacts_dir")), "artifacts_dir": req.get("artifacts_dir"),
               "name": req.get("artifact_name") or f"chart-{req.get('id')}", "uid": None,
               "xlsx": str(req.get("xlsx", "")),
               "allow_unsealed": bool(req.get("allow_unsealed")), "dedicated": False, "buf": bytearray(),
               "eof": False, "status": None, "timed_out": False}
        refused = self.conf.refusal(job)
        if refused:
            self.reply({"type": "result", "id": job["id"], "ECR": False, "infra_error": True, "error": refused})
            return
        if self.conf.mode == "uid":
            uid = self.uids.take()
            job["uid"], job["dedicated"] = (uid, True) if uid is not None else (65534, False)
        try:
            self.conf.prepare(job, job["xlsx"])
        except OSError as exc:
            self.cleanup(job)
            missing = isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError))
            self.reply({"type": "result", "id": job["id"], "ECR": False, "missing_input": missing,
                        "infra_error": not missing, "error": f"cannot copy the xlsx into the sandbox: {exc}"})
            return
        r, w = os.pipe()
        job["started"] = time.monotonic()
        job["deadline"] = job["started"] + job["timeout"]
        try:
            pid = os.fork()
        except OSError as exc:
            for fd in (r, w):
                os.close(fd)
            self.cleanup(job)
            self.reply({"type": "result", "id": job["id"], "ECR": False, "infra_error": True,
                        "error": f"cannot fork the program's process: {exc}"})
            return
        if pid == 0:  # child: never returns
            os.close(r)
            self.child.run_child(job, w, self.ctx)
        os.close(w)
        os.set_blocking(r, False)
        job["pid"], job["fd"] = pid, r
        self.running[pid] = job
        self.sel.register(r, selectors.EVENT_READ, pid)

    # ---- children -------------------------------------------------------------------------
    def read_child(self, job: dict) -> None:
        while not job["eof"]:
            try:
                data = os.read(job["fd"], 1 << 20)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                job["eof"] = True
                self.sel.unregister(job["fd"])
                os.close(job["fd"])
                return
            if job.get("too_large"):
                continue
            job["buf"] += data
            if len(job["buf"]) > self.reply_mod.MAX_REPLY_BYTES + 1:
                job["too_large"] = True
                job["buf"] = bytearray()
                self.kill(job)

    def kill(self, job: dict, timed_out: bool = False) -> None:
        """SIGKILL the child's process group, then (dedicated uid) every process of its uid."""
        job["timed_out"] = job["timed_out"] or timed_out
        targets = [lambda: os.killpg(job["pid"], signal.SIGKILL)]
        if job["status"] is None:  # not reaped yet, so the pid is still ours (before setsid, no group)
            targets.append(lambda: os.kill(job["pid"], signal.SIGKILL))
        for target in targets:
            try:
                target()
            except OSError:
                pass
        if job["dedicated"]:
            self.sandbox.sweep_uid(job["uid"])
        if job["status"] is None:
            try:
                _, job["status"] = os.waitpid(job["pid"], 0)
            except ChildProcessError:
                job["status"] = 0

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            job = self.running.get(pid)
            if job is not None and job["status"] is None:
                job["status"] = status

    def finish(self, job: dict) -> None:
        self.kill(job)  # the child has exited: clear its group and any escapees before reading the rest
        self.read_child(job)
        if not job["eof"]:
            self.sel.unregister(job["fd"])
            os.close(job["fd"])
        del self.running[job["pid"]]
        result = {"type": "result", "id": job["id"], "ECR": False, "error": None, "series": None,
                  "duration_s": round(time.monotonic() - job["started"], 3)}
        if self.missing:
            result["unsealed"] = list(self.missing)
        png = self.reply_mod.interpret(bytes(job["buf"]), result, timeout=job["timeout"] if job["timed_out"] else None,
                                       too_large=bool(job.get("too_large")),
                                       exit_text=lambda: self.child.describe_exit(job["status"]))
        if job["artifacts_dir"] and png:
            result["artifacts"] = self.child.write_png(job, png)
        self.cleanup(job)
        self.reply(result)

    def cleanup(self, job: dict) -> None:
        self.conf.cleanup(job)

    # ---- loop -----------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            while self.queue and len(self.running) < self.max_children and not self.closing:
                req = self.queue.popleft()
                try:
                    self.start(req)
                except (TypeError, ValueError) as exc:  # a malformed request must not stop the server
                    self.reply({"type": "result", "id": req.get("id"), "ECR": False, "infra_error": True,
                                "error": f"bad request: {exc}"})
            if self.closing:
                for job in list(self.running.values()):
                    job["timed_out"] = True
                    self.kill(job)
                    self.running.pop(job["pid"], None)
                    self.cleanup(job)
                break
            now = time.monotonic()
            deadlines = [j["deadline"] for j in self.running.values()]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, _ in self.sel.select(timeout):
                if key.data == "stdin":
                    self.read_stdin()
                elif key.data == "wake":
                    try:
                        os.read(key.fd, 4096)
                    except BlockingIOError:
                        pass
                elif key.data in self.running:
                    self.read_child(self.running[key.data])
            self.reap()
            now = time.monotonic()
            for job in list(self.running.values()):
                if job["status"] is None and now >= job["deadline"]:
                    self.kill(job, timed_out=True)
                if job["status"] is not None:
                    self.finish(job)
        self.conf.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-children", type=int, default=max(2, os.cpu_count() or 2))
    parser.add_argument("--memory-mb", type=int, default=4096, help="address space per program, on top of the server's")
    parser.add_argument("--quota-mb", type=int, default=64, help="disk quota of each program's folder")
    parser.add_argument("--uid-base", type=int, default=52000, help="first uid tried for sandbox slots (when root)")
    parser.add_argument("--sandbox", choices=("auto", "uid", "nocaps"), default="auto",
                        help="as root: drop to a sandbox uid, or stay uid 0 without capabilities (auto: probe)")
    args = parser.parse_args(argv)
    from hitbench_utils.scoring import quota

    namespace_error = None
    try:
        quota.enter_private_mounts()  # first: it needs a single-threaded process
    except OSError as exc:
        namespace_error = f"no private mount namespace for the per-program tmpfs: {exc}"
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = "1"  # no thread pools: children run under RLIMIT_NPROC
    os.environ["MPLBACKEND"] = "Agg"
    from hitbench_utils.scoring.chart_child import warm_up

    versions = warm_up()
    server = Server(args.max_children, args.memory_mb, args.uid_base, args.sandbox, args.quota_mb, namespace_error)
    gc.collect()
    gc.freeze()  # keep the warmed heap shared copy-on-write with every child
    server.reply({"type": "ready", "versions": versions, "sandbox": server.info()})
    server.serve()


if __name__ == "__main__":
    main()
