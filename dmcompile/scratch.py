"""Temporary folders and files that a killed run leaves behind, and reclaiming them.

Every temporary dmcompile makes is named ``.<name>.tmp-<pid>-<random>``. A temporary folder is
held under an advisory lock (``flock`` on the folder itself) for as long as its owner runs; the
kernel drops the lock when the owner dies, however it dies (kill -9, the OOM killer, a cancelled
CI job). So the next run can tell a folder some live build is writing from one nobody will
finish, and removes only the latter. Temporary files carry their owner's PID instead.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: temporaries are reclaimed only by `dmcompile cache --clean`
    fcntl = None

MARK = ".tmp-"
GRACE_SECONDS = 10  # a folder younger than this may be one whose owner is about to lock it
_NAME = re.compile(r"^\..*\.tmp-(\d+)-[a-z0-9_]{4,}(\.[a-z0-9]+)?$")  # what temp_dir / temp_file make
_held: dict[str, int] = {}  # path -> fd of the locks this process holds


def temp_dir(parent: Path, name: str) -> Path:
    """A new locked temporary folder ``parent/.<name>.tmp-<pid>-*`` (released by :func:`release`
    or when this process exits)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{name}{MARK}{os.getpid()}-", dir=parent))
    path.chmod(0o755)  # mkdtemp makes it private; a finished one is an ordinary folder
    fd = try_lock(path)
    if fd is not None:
        _held[str(path)] = fd
    return path


def try_lock(folder: Path) -> int | None:
    """An exclusive ``flock`` on ``folder`` without waiting: the open descriptor holding it (close
    it to release), or None when another process holds it (or the platform has no flock)."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def release(path: Path) -> None:
    """Drop the lock of a temporary folder this process made (after removing or renaming it)."""
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def check_writable(folder: Path) -> str | None:
    """Why nothing can be written in ``folder`` (or in its nearest existing ancestor, where the
    folder would be made), or None when a probe file can be created there."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        fd, probe = tempfile.mkstemp(prefix=f".probe{MARK}{os.getpid()}-", dir=folder)
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def temp_file(path: Path, suffix: str = "") -> Path:
    """A sibling name for writing ``path`` before renaming it into place (``suffix``: a file
    extension some writers insist on, e.g. ``.npz``)."""
    path = Path(path)
    return path.with_name(f".{path.name}{MARK}{os.getpid()}-{os.urandom(4).hex()}{suffix}")


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is named as dmcompile names its temporaries (nothing else is ever removed)."""
    return _NAME.match(Path(path).name) is not None


def in_use(path: Path) -> bool:
    """Whether a temporary is still being written: its folder's lock is held, its owner PID is
    alive, or it is only seconds old."""
    path = Path(path)
    try:
        if time.time() - path.lstat().st_mtime < GRACE_SECONDS:
            return True
    except FileNotFoundError:
        return False
    if str(path) in _held:
        return True
    if path.is_dir() and not path.is_symlink() and fcntl is not None:
        try:
            fd = try_lock(path)
        except OSError:
            return True
        if fd is None:
            return True
        os.close(fd)
        return False
    m = _NAME.match(path.name)
    return m is not None and _alive(int(m.group(1)))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_in(folder: Path) -> list[Path]:
    """The temporaries directly in ``folder`` that no running process will finish."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if is_temporary(p) and not in_use(p))


def reclaim(folder: Path) -> list[Path]:
    """Remove the stale temporaries directly in ``folder``; the paths removed."""
    removed = []
    for p in stale_in(folder):
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


def size_of(path: Path) -> int:
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size if path.exists() or path.is_symlink() else 0
    return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir())


@contextlib.contextmanager
def locked(folder: Path):
    """Hold an exclusive lock on ``folder`` (blocking): writers that swap entries in it take turns."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
