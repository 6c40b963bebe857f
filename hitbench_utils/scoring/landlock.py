"""Landlock for one chart program: what it may read, where it may write, and nothing else.

Landlock (Linux >= 5.13, no privileges needed) is the layer that keeps the answer key out of reach:
the program may read only the Python installation and its site-packages, matplotlib's and the
fonts' data and the system libraries (``read_roots``), read and write only beneath its own working
folder, execute nothing, and (ABI >= 4) open no TCP connection, (ABI >= 6) signal nothing and use no
abstract socket outside the sandbox. The dataset, QA files, run folder, home folders, ``/tmp`` and
``/proc`` are simply not granted, so listing or opening them fails with EACCES.
"""
from __future__ import annotations

import ctypes
import os
import site
import sys
import sysconfig

__all__ = ["landlock_abi", "restrict_filesystem", "read_roots", "exposed_by"]

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_CREATE, _SYS_ADD_RULE, _SYS_RESTRICT = 444, 445, 446  # x86-64 and aarch64 share these numbers
_PR_SET_NO_NEW_PRIVS = 38

# Landlock filesystem rights (uapi/linux/landlock.h), by the ABI that introduced them.
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_CHANGE_ABI1 = sum(1 << i for i in range(4, 13))  # remove_dir/file, make_char/dir/reg/sock/fifo/block/sym
_FS_REFER, _FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1
_READ = _FS_READ_FILE | _FS_READ_DIR

# System folders a chart program may need to read: shared libraries loaded lazily, fonts, time zones.
SYSTEM_READ_ROOTS = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/usr/share/fonts",
                     "/usr/local/share/fonts", "/usr/share/zoneinfo", "/etc/localtime", "/etc/ld.so.cache")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is unavailable."""
    try:
        abi = _libc.syscall(_SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    except Exception:
        return 0
    return max(int(abi), 0)


def read_roots(extra: tuple[str, ...] = ()) -> list[str]:
    """Folders (and single files) a chart program may read: the standard library, every
    site-packages folder on ``sys.path``, matplotlib's data and font folders, system libraries.

    Never ``sys.path`` entries in general: the project folder (and the ``runs/`` under it) is on it."""
    paths = {sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})[k]
             for k in ("stdlib", "platstdlib")}
    paths |= {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    paths |= set(site.getsitepackages())
    paths |= {p for p in sys.path if os.path.basename(p.rstrip("/")) in ("site-packages", "dist-packages")}
    paths.add(os.path.join(sys.base_prefix, "lib"))  # libpython and its lib-dynload
    mpl = sys.modules.get("matplotlib")
    if mpl is not None:
        paths.add(mpl.get_data_path())
        font_manager = sys.modules.get("matplotlib.font_manager")
        if font_manager is not None:
            paths |= {os.path.dirname(f.fname) for f in font_manager.fontManager.ttflist}
    paths |= set(SYSTEM_READ_ROOTS) | set(extra)
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})


def exposed_by(path: str, roots: list[str]) -> str | None:
    """The read root that contains ``path`` (the program could read it), or None."""
    real = os.path.realpath(path)
    for root in roots:
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return root
    return None


def _add_rule(ruleset: int, path: str, rights: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        rule = (ctypes.c_uint8 * 12)()  # packed {u64 allowed_access; s32 parent_fd}
        ctypes.memmove(rule, ctypes.byref(ctypes.c_uint64(rights)), 8)
        ctypes.memmove(ctypes.addressof(rule) + 8, ctypes.byref(ctypes.c_int32(fd)), 4)
        if _libc.syscall(_SYS_ADD_RULE, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
    finally:
        os.close(fd)


def restrict_filesystem(workdir: str, abi: int, roots: list[str] | tuple[str, ...] = ()) -> None:
    """Confine this process: read ``roots``; read/write beneath ``workdir``; /dev/null; no exec."""
    handled_fs = _FS_EXECUTE | _READ | _FS_WRITE_FILE | _FS_CHANGE_ABI1
    handled_fs |= (_FS_REFER if abi >= 2 else 0) | (_FS_TRUNCATE if abi >= 3 else 0)
    handled_fs |= _FS_IOCTL_DEV if abi >= 5 else 0
    handled_net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = (ctypes.c_uint64 * 3)(handled_fs, handled_net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _libc.syscall(_SYS_CREATE, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
    try:
        own = handled_fs & ~(_FS_EXECUTE | _FS_IOCTL_DEV)
        _add_rule(ruleset, workdir, own)
        _add_rule(ruleset, "/dev/null", _FS_READ_FILE | _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0))
        for path in ("/dev/urandom", "/dev/random"):
            if os.path.exists(path):
                _add_rule(ruleset, path, _FS_READ_FILE)
        for path in roots:
            try:
                _add_rule(ruleset, path, _READ if os.path.isdir(path) else _FS_READ_FILE)
            except (PermissionError, FileNotFoundError):
                continue  # this identity cannot reach it anyway: granting it would add nothing
        if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS) failed")
        if _libc.syscall(_SYS_RESTRICT, ruleset, ctypes.c_uint32(0)) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
    finally:
        os.close(ruleset)
