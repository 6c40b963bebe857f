"""Containment for one chart program, applied inside the forked child before the program runs.

Layers, each cheap and each covering a hole the others leave (``landlock.py`` and ``quota.py`` hold
the filesystem ones):
- rlimits (CPU seconds, address space, open files, processes, file size, no core dumps);
- a seccomp filter that refuses fork/vfork/clone/clone3, so no process or thread can be started
  (root is exempt from RLIMIT_NPROC, whatever its capabilities); sockets, io_uring, ptrace and
  process_vm_*, namespaces, mounts, chroot, keyrings, BPF, module loading, execve; every signal
  (kill/tkill/tgkill/sigqueue/pidfd); and every metadata change: chmod, chown, utime, setxattr and
  removexattr in all their forms, and truncate(2) by path. Landlock cannot refuse chmod, chown,
  utime or setxattr, and as uid 0 without capabilities (or as the user) the program owns files
  outside its folder, so only this layer stops ``os.chmod('/some/file', 0o777)``;
- when the server runs as root, a dedicated unprivileged uid/gid: root ignores RLIMIT_NPROC and can
  write anywhere, a throwaway uid cannot. Each concurrent slot gets its own uid that no passwd entry
  and no running process uses, so "kill every process of this uid" is a safe sweep for escapees
  (``setsid`` + fork) — it is never done with a shared uid or our own. When such a uid cannot read
  the Python installation (a pyenv under a mode-700 /root), the child instead stays uid 0 with every
  capability dropped for good (as it does inside the user namespace of an unprivileged server).
"""
from __future__ import annotations

import ctypes
import os
import pwd
import resource
import signal
import time

__all__ = ["apply_limits", "drop_privileges", "drop_capabilities", "install_seccomp", "seccomp_supported",
           "cap_last_cap", "uid_can_read", "choose_root_mode", "UidPool", "sweep_uid"]

_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_PR_SET_SECUREBITS, _PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 28, 24, 47, 4
PR_SET_CHILD_SUBREAPER = 36


def apply_limits(cpu_s: int, memory_bytes: int, nofile: int = 128, nproc: int = 1,
                 fsize_bytes: int = 64 << 20) -> None:
    """Set hard and soft rlimits for this process and everything it starts.

    RLIMIT_NPROC counts every process (and thread) of the real uid; 1 means the program can start
    none at all, whichever uid it runs as, so a fork bomb stops at its first fork."""
    for res, value in (
        (resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, nproc),
        (resource.RLIMIT_FSIZE, fsize_bytes), (resource.RLIMIT_CORE, 0),
    ):
        soft, hard = resource.getrlimit(res)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        # CPU: soft limit sends SIGXCPU, the hard one a second later SIGKILL.
        resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))


# seccomp: no process or thread creation (EAGAIN, like RLIMIT_NPROC; root is exempt from that
# limit whatever its capabilities); everything else listed is refused with EPERM. Chart programs
# need none of it. x86-64 numbers, then the generic ones aarch64 uses.
_SECCOMP = {
    "x86_64": (0xC000003E, (56, 57, 58, 435), (
        41, 53, 425, 426, 427, 101, 310, 311,  # socket, socketpair, io_uring_*, ptrace, process_vm_*
        272, 308, 165, 166, 155, 161, 304,  # unshare, setns, mount, umount2, pivot_root, chroot, open_by_handle_at
        321, 250, 248, 249, 323, 298, 246, 320, 175, 313, 59, 322,  # bpf, keys, userfaultfd, perf, kexec, modules, exec
        62, 200, 234, 129, 297, 424,  # kill, tkill, tgkill, rt_(tg)sigqueueinfo, pidfd_send_signal
        90, 91, 268, 452, 92, 93, 94, 260,  # chmod, fchmod, fchmodat(2), chown, fchown, lchown, fchownat
        132, 235, 280, 261,  # utime, utimes, utimensat, futimesat
        188, 189, 190, 197, 198, 199, 463, 466,  # (l/f)setxattr, (l/f)removexattr, setxattrat, removexattrat
        76)),  # truncate (by path; ftruncate needs a file opened for writing, which Landlock confines)
    "aarch64": (0xC00000B7, (220, 435), (
        198, 199, 425, 426, 427, 117, 270, 271, 97, 268, 40, 39, 41, 51, 265,
        280, 219, 217, 218, 282, 241, 104, 294, 105, 273, 221, 281,
        129, 130, 131, 138, 240, 424,
        52, 53, 452, 54, 55, 88,
        5, 6, 7, 14, 15, 16, 463, 466,
        45)),
}


def seccomp_supported() -> bool:
    """Whether this architecture has a filter here (otherwise the seccomp layer is missing)."""
    return os.uname().machine in _SECCOMP


def install_seccomp() -> bool:
    """Install the seccomp filter; False when this architecture is not known (nothing installed)."""
    spec = _SECCOMP.get(os.uname().machine)
    if spec is None:
        return False
    audit_arch, no_process, no_other = spec
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, eagain, eperm = 0x7FFF0000, 0x00050000 | 11, 0x00050000 | 1  # SECCOMP_RET_ALLOW / _ERRNO
    denied = list(no_process) + list(no_other)
    n = len(denied)
    # Layout: arch check, load nr, x32 check, one JEQ per denied number, then ALLOW, EAGAIN, EPERM.
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, eperm),  # foreign ABI (int 0x80): no
            (ld, 0, 0, 0), (jge, n + 2, 0, 0x40000000)]  # x32 syscalls on x86-64: EPERM
    for i, nr in enumerate(denied):
        to_allow = n - i - 1  # instructions between this one and ALLOW
        prog.append((jeq, to_allow + 1 + (0 if i < len(no_process) else 1), 0, nr))
    prog += [(ret, 0, 0, allow), (ret, 0, 0, eagain), (ret, 0, 0, eperm)]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]

    filters = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filters)
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(SET_SECCOMP) failed")
    return True


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (no supplementary groups); verify root cannot come back."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.geteuid() == 0 or os.getuid() == 0:
        raise PermissionError("still root after dropping privileges")


def cap_last_cap() -> int:
    """The highest capability number this kernel knows (read before the child loses /proc)."""
    with open("/proc/sys/kernel/cap_last_cap") as fh:
        return int(fh.read())


def drop_capabilities(last: int | None = None) -> None:
    """Stay uid 0 but give up every capability for good (bounding set, securebits, capset).

    Used as root when a sandbox uid cannot read the Python installation (e.g. it lives under a
    mode-700 /root): without CAP_SYS_RESOURCE/CAP_SYS_ADMIN, RLIMIT_NPROC applies again, and without
    CAP_DAC_OVERRIDE/CAP_KILL/CAP_SYS_PTRACE the process is an ordinary user. Landlock must then
    guard writes, since uid 0 still owns root's files."""
    libc = _libc
    # NOROOT|NOROOT_LOCKED|NO_SETUID_FIXUP|NO_SETUID_FIXUP_LOCKED|KEEP_CAPS_LOCKED: no way back via exec.
    if libc.prctl(_PR_SET_SECUREBITS, 0b101111, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(SET_SECUREBITS) failed")
    last = cap_last_cap() if last is None else last
    for cap in range(last + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(CAPBSET_DROP, {cap}) failed")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2 words): all zero
    if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")
    if libc.capget(ctypes.byref(header), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    if any(data):
        raise PermissionError("capabilities still held after dropping them")


def uid_can_read(uid: int, paths: list[str]) -> bool:
    """Whether ``uid`` can list each folder in ``paths`` (probed in a throwaway child)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for path in paths:
                os.listdir(path)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def choose_root_mode(probe_uid: int, landlock: int) -> str:
    """As root: 'uid' (drop to a sandbox uid) when that uid can read the Python installation, else
    'nocaps' (stay uid 0 with no capabilities) — which needs Landlock >= 6, so that writes *and*
    signals stay confined; without it, 'uid' anyway (lazy imports from unreadable folders then fail)."""
    import pandas

    stdlib = os.path.dirname(os.__file__)
    needed = [stdlib, os.path.join(stdlib, "lib-dynload"), os.path.dirname(pandas.__path__[0])]
    if uid_can_read(probe_uid, [p for p in needed if os.path.isdir(p)]) or landlock < 6:
        return "uid"
    return "nocaps"


def _uids_in_use() -> set[int]:
    used = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as fh:
                    for line in fh:
                        if line.startswith("Uid:"):
                            used.update(int(x) for x in line.split()[1:])
                            break
            except OSError:
                continue
    return used


class UidPool:
    """Dedicated sandbox uids: one per running child, none with a passwd entry or a live process."""

    def __init__(self, base: int, size: int) -> None:
        used = _uids_in_use()
        self.free: list[int] = []
        for uid in range(base, base + 64 * size):
            if len(self.free) >= size:
                break
            try:
                pwd.getpwuid(uid)
                continue  # a real account: never run untrusted code as it
            except KeyError:
                pass
            if uid not in used:
                self.free.append(uid)

    def take(self) -> int | None:
        return self.free.pop(0) if self.free else None

    def give(self, uid: int) -> None:
        self.free.append(uid)


def sweep_uid(uid: int) -> None:
    """Kill every process of a *dedicated* sandbox uid, escapees in other sessions included.

    A helper child becomes that uid and calls kill(-1, SIGKILL), which reaches exactly the processes
    that uid may signal: its own. Only call it with a uid from ``UidPool``.
    """
    pid = os.fork()
    if pid == 0:
        try:
            signal.set_wakeup_fd(-1)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            for _ in range(20):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.002)
        finally:
            os._exit(0)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
