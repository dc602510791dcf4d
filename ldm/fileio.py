"""Files written whole or not at all: every file the package writes (images, checkpoints, reports) goes
through ``atomic_write``. A leaf module: it imports nothing from ldm, so every layer may use it.

Temporary files lie beside their target as ``.{stem}.partial-{host}.{pid}-XXXX{suffix}``. A writer killed
outright (SIGKILL, power loss) cannot remove its own, so the next write to the same target removes the
stale ones (``remove_stale_partials``): a file of this host whose writer pid is gone, or any other (another
host's, which cannot be asked, or one named before pids were) once untouched for ``STALE_AFTER`` seconds.
A file that a live writer is writing is never removed, however slow it is: each writer holds an exclusive
``flock`` on its file while it writes (POSIX), and a locked file is left alone whatever its name says (containers
sharing a volume may share a host name and reuse pids). Only writes that say how large they are (``need``:
checkpoints) clean up, so that saving many images does not list their folder each time.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from typing import BinaryIO, Callable

try:
    import fcntl
except ImportError:  # Windows: no flock; the pid and age rules alone decide
    fcntl = None


class DiskSpaceError(OSError):
    """Too little free disk for a file, or the disk filled up while writing it; the message is one line."""


def check_disk(path: str, need: int) -> None:
    """One-line DiskSpaceError when the folder of ``path`` has less than ``need`` bytes free."""
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    if need > free:
        raise DiskSpaceError(f"not enough disk space for {path}: it needs about {need / 1e9:.1f} GB, "
                              f"{free / 1e9:.1f} GB are free in {folder}")


def _disk_full(e: BaseException, folder: str) -> bool:
    """Whether ``e`` says the disk filled up: ENOSPC, or torch.save's RuntimeError for a failed write
    ("unexpected pos", "file write failed") with almost nothing left free."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    if not (isinstance(e, RuntimeError) and ("unexpected pos" in str(e) or "file write failed" in str(e))):
        return False
    try:
        return shutil.disk_usage(folder).free < 16 * 2**20
    except OSError:
        return False


STALE_AFTER = 3600.0  # seconds untouched before a partial file whose writer cannot be asked counts as stale


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def partial_file(path: str, suffix: str | None = None) -> tuple[int, str]:
    """(fd, name) of a new temporary file beside ``path``, named for it and this writer (host and pid) so that
    ``remove_stale_partials(path)`` can tell when it is left over; ``suffix`` defaults to ``path``'s."""
    folder, name = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.partial-{_host()}.{os.getpid()}-", dir=folder,
                               suffix=ext if suffix is None else suffix)
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while the file is open: a live writer's file is never stale
    return fd, tmp


def _locked(path: str) -> bool:
    """Whether another open file (a live writer) holds the flock of ``path``; False where flock does not exist."""
    if fcntl is None:
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def _running(pid: int) -> bool:
    """Whether process ``pid`` of this (POSIX) host runs; True when that cannot be told."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs as another user
        return True
    return True


def remove_stale_partials(path: str) -> list[str]:
    """Remove the temporary files of ``path`` that dead writers left (see the module docstring); returns them."""
    folder, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(os.path.splitext(name)[0])}\.partial-(?:([A-Za-z0-9]+)\.(\d+)-)?.+")
    removed = []
    host, now = _host(), time.time()
    for entry in os.listdir(folder):
        m = pattern.fullmatch(entry)
        if m is None:
            continue
        full = os.path.join(folder, entry)
        try:
            if m.group(1) == host and os.name == "posix":  # on Windows os.kill(pid, 0) would end the process
                stale = not _running(int(m.group(2)))
            else:
                stale = now - os.stat(full).st_mtime > STALE_AFTER
            if stale and os.path.isfile(full) and not _locked(full):
                os.remove(full)
                removed.append(full)
        except OSError:  # removed meanwhile by another writer, or not ours to remove
            continue
    return removed


def atomic_write(path: str, write: Callable[[BinaryIO, str], None], need: int = 0, replace: bool = True) -> int:
    """Run ``write(file, temp_path)`` on a temporary file beside ``path``, then rename it over ``path``; with
    ``replace=False`` the finished file is published only where ``path`` is free (``FileExistsError`` otherwise,
    and nothing is written): how independent writers of one folder claim names without overwriting each other.

    On any error (or Ctrl-C) the temporary file is removed and ``path`` is untouched. The temporary
    name keeps the suffix so readers that sniff it still work; stale ones of ``path`` that killed writers left are
    removed first. ``need`` (bytes, 0 = unknown) is checked against the free disk space (after that cleanup),
    and a full disk is reported in one line either way. Returns the bytes written.
    """
    if need:
        remove_stale_partials(path)
    check_disk(path, need)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = partial_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f, tmp)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        size = os.path.getsize(tmp)
        if replace:
            os.replace(tmp, path)
        else:
            publish_new(tmp, path)
        return size
    except BaseException as e:
        full = _disk_full(e, folder)  # before the partial file is removed and its space freed
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise DiskSpaceError(f"the disk filled up while writing {path} ({folder}: "
                                  f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free now); nothing was written") from e
        raise


def publish_new(tmp: str, path: str) -> None:
    """Give the finished file ``tmp`` the name ``path`` only if no file has it (FileExistsError otherwise): a hard
    link is that test and the publication in one step, so the name is never seen empty or half-written. Where the
    file system has no hard links, an exclusive create claims the name first, then the file is renamed over it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # EPERM, ENOTSUP...: no hard links here
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, path)
        return
    os.remove(tmp)


def write_text(path: str, text: str) -> int:
    """``text`` (UTF-8) to ``path`` through ``atomic_write``; returns the bytes written. A path that exists and is
    not a regular file (``/dev/stdout``, a FIFO) is written in place: there is nothing to replace atomically."""
    data = text.encode("utf-8")
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "wb") as f:
            return f.write(data)
    return atomic_write(path, lambda f, _tmp: f.write(data))
