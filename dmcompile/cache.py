"""What the cache holds (``dmcompile cache --info``) and removing what killed runs left in it
(``dmcompile cache --clean``) or all of it (``--clean --all``).

Entries live in one folder per kind under ``stages.cache_dir()`` (see :mod:`dmcompile.stages`);
temporaries are named by :mod:`dmcompile.scratch`. Temporaries of dmcompile versions before the
owner-PID names (``.moments-tmp-*``, ``.<name>.tmp-XXXXXXXX``) are stale once an hour old.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import scratch
from .stages import cache_dir

KINDS = ("exports", "calib", "rounded", "rd", "presets")
_LEGACY = re.compile(r"^\.(moments-tmp-[a-z0-9_]{8}|.+\.tmp-[a-z0-9_]{8}|.+\.old-\d+)$")
LEGACY_AGE_SECONDS = 3600


@dataclass
class CacheReport:
    """Entries and bytes per kind, and the temporaries found (stale ones can be removed)."""

    root: Path
    entries: dict[str, tuple[int, int]] = field(default_factory=dict)  # kind -> (entries, bytes)
    stale: list[tuple[Path, int]] = field(default_factory=list)
    in_use: list[tuple[Path, int]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b in self.entries.values()) + sum(b for _, b in self.stale + self.in_use)


def _stale(path: Path) -> bool:
    if scratch.is_temporary(path):
        return not scratch.in_use(path)
    if _LEGACY.match(path.name):
        return time.time() - path.lstat().st_mtime > LEGACY_AGE_SECONDS
    return False


def _temporaries(root: Path):
    """(path, is stale) of every temporary under ``root`` (not descending into them)."""
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(folder) / name
            if scratch.is_temporary(p) or _LEGACY.match(name):
                yield p, _stale(p)
                if name in dirs:
                    dirs.remove(name)


def report(root: Path | None = None) -> CacheReport:
    """What the cache at ``root`` (default: ``cache_dir()``) holds."""
    root = Path(root or cache_dir())
    out = CacheReport(root)
    for p, stale in _temporaries(root) if root.is_dir() else ():
        (out.stale if stale else out.in_use).append((p, scratch.size_of(p)))
    temps = {p for p, _ in out.stale + out.in_use}
    for kind in KINDS:
        folder = root / kind
        entries = [p for p in sorted(folder.iterdir()) if p not in temps] if folder.is_dir() else []
        out.entries[kind] = (len(entries), sum(scratch.size_of(p) for p in entries))
    return out


def clean(root: Path | None = None, everything: bool = False) -> list[Path]:
    """Remove the stale temporaries under ``root`` (default: ``cache_dir()``), or with
    ``everything`` every cache entry too (temporaries a running build holds stay); the paths removed."""
    rep = report(root)
    removed = []
    targets = [p for p, _ in rep.stale]
    if everything:
        held = {p for p, _ in rep.in_use}
        targets += [p for kind in KINDS if (rep.root / kind).is_dir()
                    for p in sorted((rep.root / kind).iterdir()) if p not in held and p not in targets]
    for p in targets:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not p.exists():
            removed.append(p)
    return removed
