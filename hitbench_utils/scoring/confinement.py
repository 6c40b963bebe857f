"""The confinement of the chart server's children: which layers this machine gives, the working
folders they run in, and whether a request may run at all (it fails closed).

A layer that cannot be set up here (no Landlock, no seccomp filter for this CPU, no private mount
namespace for the quota and the programs' own root, a failed self-test) is listed in ``missing``;
every request is then refused with an ``infra_error`` naming it, unless it says ``allow_unsealed``
(the ``chart_allow_unsealed`` parameter): then it runs with the layers there are.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile

from hitbench_utils.scoring import chart_child, chart_root, landlock, quota, sandbox

__all__ = ["Confinement", "temp_root", "remove_stale_folders"]


def temp_root() -> str:
    """Where working folders go: the temp folder, unless its path could break a string literal in
    the rewritten program (the xlsx path is pasted into quotes)."""
    root = tempfile.gettempdir()
    return root if re.fullmatch(r"[A-Za-z0-9._/-]+", root) else "/tmp"


def remove_stale_folders() -> None:
    """Remove the working folders of servers that were killed before they could clean up."""
    root = temp_root()
    for name in os.listdir(root):
        parts = name.split("-")
        if name.startswith("hitbench-charts-") and len(parts) == 4 and parts[2].isdigit():
            path = os.path.join(root, name)
            try:
                if os.stat(path).st_uid == os.geteuid() and not os.path.exists(f"/proc/{parts[2]}"):
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                continue


class Confinement:
    def __init__(self, base: str, max_children: int, memory_mb: int, uid_base: int, mode: str = "auto",
                 quota_mb: int = 64, namespace_error: str | None = None) -> None:
        self.base = base
        self.test_error: str | None = None
        self.root = os.geteuid() == 0
        self.uids = sandbox.UidPool(uid_base, max_children) if self.root else None
        abi = landlock.landlock_abi()
        if not self.root:
            self.mode = "user"
        elif mode == "auto":
            self.mode = sandbox.choose_root_mode(self.uids.free[0] if self.uids.free else 65534, abi)
        else:
            self.mode = mode
        self.missing: list[str] = []
        if not abi:
            self.missing.append("Landlock (the kernel offers no Landlock ABI: it needs Linux >= 5.13 with "
                                "landlock in the kernel's lsm= list)")
        if not sandbox.seccomp_supported():
            self.missing.append(f"seccomp (no filter for the {os.uname().machine} architecture)")
        if namespace_error:
            self.missing.append(f"the disk quota ({namespace_error})")
        with open("/proc/self/status") as fh:
            vm_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
        self.ctx = {"landlock": abi, "mode": self.mode, "vm_bytes": vm_kb * 1024, "memory_bytes": memory_mb << 20,
                    "quota_bytes": quota_mb << 20, "quota": namespace_error is None,
                    "userns": not self.root and namespace_error is None, "seccomp": sandbox.seccomp_supported(),
                    "read_roots": landlock.read_roots(), "env": dict(os.environ), "server_pid": os.getpid(),
                    "chroot": None, "last_cap": sandbox.cap_last_cap()}
        self.work = self.base
        if namespace_error is None:
            try:
                roots = self.ctx["read_roots"]
                spellings = tuple(p for p in sys.path if p and os.path.realpath(p) != os.path.abspath(p)
                                  and landlock.exposed_by(p, roots))
                self.work = chart_root.build_root(os.path.join(self.base, "root"), roots, spellings)
                self.ctx["chroot"] = os.path.join(self.base, "root")
            except OSError as exc:
                self.missing.append(f"the programs' own filesystem view ({exc})")

    def self_test(self) -> str | None:
        """Contain a trivial program once with every layer. A failure is a missing layer; then try
        without Landlock (and 'nocaps', which needs it), for ``allow_unsealed`` requests only.
        Returns the error that remains (nothing can run at all), or None."""
        error = self._contain_once()
        if error is None:
            return None
        self.missing.append(f"the sandbox self-test ({error})")
        if self.ctx["landlock"]:
            self.ctx["landlock"] = 0
            if self.mode == "nocaps":
                self.mode = self.ctx["mode"] = "uid"
            error = self._contain_once()
        return error

    def _contain_once(self) -> str | None:
        uid = (self.uids.free[0] if self.uids.free else 65534) if self.mode == "uid" else None
        job = {"code": "x = 1\n", "chart_type": "BarChart", "timeout": 10, "uid": uid, "dedicated": False}
        try:
            self.prepare(job, None)
            return chart_child.self_test(job, self.ctx)
        except OSError as exc:
            return f"preparing the working folder failed: {exc}"
        finally:
            self.cleanup(job)

    def info(self) -> dict:
        """The layers in force, for the server's ready message and the run's provenance."""
        return {"mode": self.mode, "root": self.root, "self_test_error": self.test_error,
                "dedicated_uids": self.mode == "uid" and bool(self.uids.free), "sealed": not self.missing,
                "missing_layers": list(self.missing), "landlock_abi": self.ctx["landlock"],
                "seccomp": self.ctx["seccomp"], "own_root": bool(self.ctx["chroot"]),
                "quota_mb": self.ctx["quota_bytes"] >> 20 if self.ctx["quota"] else None,
                "read_roots": self.ctx["read_roots"], "memory_mb": self.ctx["memory_bytes"] >> 20, "pid": os.getpid()}

    def refusal(self, job: dict) -> str | None:
        """Why this request may not run (fails closed), or None."""
        if self.missing and not job["allow_unsealed"]:
            return ("the chart sandbox cannot be sealed on this machine; missing: " + "; ".join(self.missing)
                    + ". Chart programs are not run and score as infra_error. Fix the machine, or accept a "
                    "weaker sandbox with chart_allow_unsealed=True (rescore: --chart-allow-unsealed)")
        if self.test_error:
            return f"the chart sandbox does not work here, even unsealed: {self.test_error}"
        for path in (os.path.dirname(job["xlsx"]), os.path.dirname(os.path.dirname(job["xlsx"])),
                     job["artifacts_dir"]):
            root = path and landlock.exposed_by(path, self.ctx["read_roots"])
            if root:
                return (f"{path} lies inside {root}, which chart programs may read (Python, libraries, "
                        f"fonts); move the dataset and the run folder out of it")
        return None

    def prepare(self, job: dict, src: str | None) -> None:
        """A fresh working folder: its own tmpfs quota (room for the xlsx too), the xlsx copied in,
        owned by the program's identity."""
        job["workdir"] = workdir = tempfile.mkdtemp(dir=self.work)
        job["child_workdir"] = workdir
        if self.ctx["chroot"]:
            job["child_workdir"] = f"{chart_root.WORK}/{os.path.basename(workdir)}"
        uid = job["uid"]
        if self.ctx["quota"]:
            size = self.ctx["quota_bytes"] + (os.path.getsize(src) if src else 0)
            quota.mount_quota(workdir, size, uid, uid)
            job["mounted"] = True
        name = os.path.basename(src or "table.xlsx")  # keep the name, unless it could break a string literal
        name = name if re.fullmatch(r"[A-Za-z0-9._-]+\.xlsx", name) else "table.xlsx"
        dst = os.path.join(workdir, name)
        job["xlsx_copy"] = os.path.join(job["child_workdir"], name)  # the path the program sees
        if src:
            shutil.copyfile(src, dst)
        if uid is not None:
            os.chown(workdir, uid, uid)
            if src:
                os.chown(dst, uid, uid)
        os.chmod(workdir, 0o700)

    def close(self) -> None:
        """Take the programs' view down, then remove the server's folder (never through a mount)."""
        try:  # also after a half-built view
            chart_root.remove_root(os.path.join(self.base, "root"))
        except OSError:
            return  # leave the folder: removing it through live binds could delete real files
        shutil.rmtree(self.base, ignore_errors=True)

    def cleanup(self, job: dict) -> None:
        """Unmount and remove the job's working folder; give its uid back."""
        if job.pop("mounted", False):
            try:
                quota.unmount(job["workdir"])
            except OSError:
                job.pop("workdir")  # still mounted: its pages go with the server's namespace
        if job.get("workdir"):
            shutil.rmtree(job["workdir"], ignore_errors=True)
        if job["dedicated"]:
            self.uids.give(job["uid"])

