"""Files written whole or not at all: every file the package writes (images, checkpoints, reports) goes
through ``atomic_write``. A leaf module: it imports nothing from ldm, so every layer may use it."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from typing import BinaryIO, Callable


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


def atomic_write(path: str, write: Callable[[BinaryIO, str], None], need: int = 0) -> int:
    """Run ``write(file, temp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    On any error (or Ctrl-C) the temporary file is removed and ``path`` is untouched. The temporary
    name keeps the suffix so readers that sniff it still work. ``need`` (bytes, 0 = unknown) is checked
    against the free disk space first, and a full disk is reported in one line either way.
    Returns the bytes written.
    """
    check_disk(path, need)
    folder, name = os.path.split(os.path.abspath(path))
    stem, suffix = os.path.splitext(name)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.partial-", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f, tmp)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o22)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode open() would
        size = os.path.getsize(tmp)
        os.replace(tmp, path)
        return size
    except BaseException as e:
        full = _disk_full(e, folder)  # before the partial file is removed and its space freed
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise DiskSpaceError(f"the disk filled up while writing {path} ({folder}: "
                                  f"{shutil.disk_usage(folder).free / 1e9:.1f} GB free now); nothing was written") from e
        raise


def write_text(path: str, text: str) -> int:
    """``text`` (UTF-8) to ``path`` through ``atomic_write``; returns the bytes written. A path that exists and is
    not a regular file (``/dev/stdout``, a FIFO) is written in place: there is nothing to replace atomically."""
    data = text.encode("utf-8")
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "wb") as f:
            return f.write(data)
    return atomic_write(path, lambda f, _tmp: f.write(data))
