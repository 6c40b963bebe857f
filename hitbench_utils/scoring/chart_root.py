"""The chart programs' own view of the filesystem: a root holding only what they may read.

Landlock refuses to *open* or *list* what a program may not read, but ``stat`` still answers, so a
program that guesses a path could learn that an answer key exists there. In the server's private
mount namespace (``quota.enter_private_mounts``) we therefore build, once, a small tmpfs root into
which each read root (the Python installation, site-packages, system libraries, fonts) is
bind-mounted read-only at its own path, plus ``/dev/null`` and ``/dev/urandom``, and an empty
``/.hitbench-work`` where each program's quota tmpfs is mounted. Each child ``chroot``s into it before it
drops its privileges: the dataset, the run folder, home folders, ``/tmp`` and ``/proc`` do not exist
there at all. Nothing in it is visible outside the server's mount namespace.
"""
from __future__ import annotations

import ctypes
import os

from hitbench_utils.errors import SandboxLayerError

__all__ = ["build_root", "enter_root", "remove_root", "WORK"]

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC = 1, 2, 4, 32, 4096, 1 << 14
_libc = ctypes.CDLL(None, use_errno=True)
DEVICES = ("/dev/null", "/dev/urandom", "/dev/random")
LINKS = ("/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
WORK = "/.hitbench-work"  # where the working folders are, as programs see it


def _mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        errno = ctypes.get_errno()
        raise SandboxLayerError(errno, f"mount {src} on {dst}: {os.strerror(errno)}")


def _bind(src: str, root: str, read_only: bool) -> None:
    dst = root + src
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.exists(dst):
            open(dst, "w").close()
    _mount(src, dst, None, _MS_BIND | _MS_REC)
    if read_only:  # adding read-only is allowed even on mounts locked by a user namespace
        _mount("none", dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)


def build_root(root: str, read_roots: list[str], extra_paths: tuple[str, ...] = ()) -> str:
    """Make ``root`` (an empty folder) the programs' filesystem; returns its ``WORK`` folder.

    ``extra_paths`` are other spellings of read roots (``sys.path`` entries through symlinks) that
    must exist at their own path too. A root nested in one already bound comes with it."""
    os.makedirs(root, exist_ok=True)
    _mount("hitbench-root", root, "tmpfs", _MS_NOSUID, "size=1m,nr_inodes=4096,mode=0755")
    for link in LINKS:  # merged-/usr systems: ld.so.cache names /lib/... paths
        if os.path.islink(link):
            os.symlink(os.readlink(link), root + link)
    for path in sorted(set(read_roots)):
        if os.path.exists(path) and not os.path.exists(root + path):
            _bind(path, root, read_only=True)
    for path in extra_paths:
        if os.path.exists(path) and not os.path.exists(root + path):
            _bind_as(path, root)
    for dev in DEVICES:
        if os.path.exists(dev):
            _bind(dev, root, read_only=False)
    work = root + WORK
    os.makedirs(work, mode=0o711)  # fails if a read root is spelled like it: never share it
    return work


def _bind_as(path: str, root: str) -> None:
    """Bind the real folder behind ``path`` at ``path`` itself (a symlinked spelling), read-only."""
    dst = root + path
    os.makedirs(dst, exist_ok=True)
    _mount(os.path.realpath(path), dst, None, _MS_BIND | _MS_REC)
    _mount("none", dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID)


def remove_root(root: str) -> None:
    """Detach the whole view (every bind below it, lazily) before its folder is removed: a
    recursive delete must never walk into the bound Python installation or system folders."""
    if os.path.ismount(root) and _libc.umount2(root.encode(), 2) != 0:  # MNT_DETACH
        errno = ctypes.get_errno()
        raise SandboxLayerError(errno, f"unmounting {root}: {os.strerror(errno)}")


def enter_root(root: str, workdir: str) -> None:
    """chroot into the programs' root and go to ``workdir`` (a path inside it). Needs
    CAP_SYS_CHROOT (root, or the server's user namespace): call it before dropping privileges."""
    os.chroot(root)
    os.chdir(workdir)
