"""The disk quota of a chart program: its working folder is a size-limited tmpfs of its own.

RLIMIT_FSIZE caps one file, not a folder (a program can write a thousand files at the cap), so
each working folder is a tmpfs mounted with ``size=`` and ``nr_inodes=``: a write past the quota
fails with ENOSPC, whatever the program does. The mounts live in a private mount namespace that
the server enters once at start (as root: a mount namespace; as an ordinary user: a user namespace
that maps only the user's own uid/gid, plus a mount namespace), so no mount is ever visible to the
rest of the machine and none outlives the server, even when it is killed.
"""
from __future__ import annotations

import ctypes
import os

from hitbench_utils.errors import SandboxLayerError

__all__ = ["enter_private_mounts", "mount_quota", "unmount", "DEFAULT_QUOTA_BYTES"]

DEFAULT_QUOTA_BYTES = 64 << 20
MAX_INODES = 4096
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REC, _MS_PRIVATE = 2, 4, 8, 1 << 14, 1 << 18
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _fail(what: str) -> SandboxLayerError:
    errno = ctypes.get_errno()
    return SandboxLayerError(errno, f"{what}: {os.strerror(errno)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def enter_private_mounts() -> str:
    """Move this (still single-threaded) process into a private mount namespace; returns how.

    Must run before anything starts a thread (numpy's BLAS pool): unshare refuses threaded callers."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        if _libc.unshare(_CLONE_NEWNS) != 0:
            raise _fail("unshare(CLONE_NEWNS)")
        how = "mount namespace"
    else:
        if _libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
            raise _fail("unshare(CLONE_NEWUSER|CLONE_NEWNS) (unprivileged user namespaces are disabled?)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        how = "user and mount namespace"
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise _fail("making / a private mount tree")
    return how


def mount_quota(path: str, size_bytes: int = DEFAULT_QUOTA_BYTES, uid: int | None = None,
                gid: int | None = None) -> None:
    """Mount a fresh tmpfs of ``size_bytes`` (and at most ``MAX_INODES`` files) on ``path``."""
    opts = f"size={max(size_bytes, 1 << 20)},nr_inodes={MAX_INODES},mode=0700"
    if uid is not None:
        opts += f",uid={uid},gid={gid if gid is not None else uid}"
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc.mount(b"hitbench-chart", path.encode(), b"tmpfs", flags, opts.encode()) != 0:
        raise _fail(f"mounting the {size_bytes >> 20} MB tmpfs quota on {path}")


def unmount(path: str) -> None:
    """Detach the quota tmpfs (its pages are freed once nothing holds it open)."""
    if _libc.umount2(path.encode(), _MNT_DETACH) != 0:
        raise _fail(f"unmounting {path}")
