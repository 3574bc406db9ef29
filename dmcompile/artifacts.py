"""Writing artefacts safely: build in a temporary sibling, rename when complete, and never
replace anything dmcompile did not write.

Every artefact folder has a marker JSON naming its kind (a bundle's manifest.json says
``"kind": "dmcompile-bundle"``). An existing output folder is replaced only when it is empty
or when its marker says it is an earlier output of the same kind and it holds nothing but the
files that output wrote; anything else is a :class:`ConfigError` and stays untouched. An
interrupted run leaves only a ``.<name>.tmp-<pid>-*`` sibling, never a half-written folder, and
the next run into the same parent folder removes it (:mod:`dmcompile.scratch`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dmruntime.bundle import BUNDLE_KIND, MANIFEST, sha256_file
from dmruntime.png import SOFTWARE

from . import __version__, scratch
from .errors import ConfigError


def cache_dir() -> Path:
    """Where cached artefacts live: $DMCOMPILE_CACHE or ~/.cache/dmcompile."""
    return Path(os.environ.get("DMCOMPILE_CACHE", Path.home() / ".cache" / "dmcompile"))

BUNDLE_SCHEMA_VERSION = 1
PNG_SOFTWARE = SOFTWARE  # the PNG text tag that marks grids and figures we wrote (runtime and compiler)


@dataclass(frozen=True)
class ArtifactKind:
    """A kind of output folder: its marker file, the kind string in it, what it is called in
    messages, and the files an output of this kind written before the marker listed them."""

    kind: str
    marker: str
    what: str
    legacy_files: tuple[str, ...] = ()
    legacy_keys: tuple[str, ...] = ()  # marker keys that identify outputs written before "kind"


BUNDLE = ArtifactKind(BUNDLE_KIND, MANIFEST, "bundle or export folder")
CURVES = ArtifactKind("dmcompile-rd-curves", "curves.json", "rate-distortion curves folder",
                      ("curves.json", "curves.npz", "rd_curves.png"), ("layers", "weight_bits", "act_bits"))
CALIBRATION = ArtifactKind("dmcompile-calibration", "calibration.json", "calibration folder",
                           ("calibration.json", "histograms.npz"), ("tensors", "ranges", "counts"))
EVAL = ArtifactKind("dmcompile-eval", "eval.json", "evaluation folder",
                    ("eval.json", "samples.png", "fd.png"), ("paired_vs_fp",))
PLOTS = ArtifactKind("dmcompile-plots", "plots.json", "inspect plots folder")


def _owned_files(folder: Path, kind: ArtifactKind) -> set[str] | None:
    """The entries an earlier output of ``kind`` in ``folder`` wrote, or None if it is not one."""
    try:
        meta = json.loads((folder / kind.marker).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if meta.get("kind") != kind.kind:
        legacy = kind.legacy_keys and "kind" not in meta and all(k in meta for k in kind.legacy_keys)
        if not legacy:
            return None
        return {kind.marker, *kind.legacy_files}
    files = meta.get("files") or ()
    return {kind.marker, *files} if files else {kind.marker, *kind.legacy_files}


def check_replaceable(out: Path, kind: ArtifactKind) -> None:
    """Raise ConfigError unless ``out`` is absent, an empty folder, or an earlier output of
    ``kind`` holding only its own files, in a folder this process can write (and not made
    read-only by its owner)."""
    out = Path(out)
    why = scratch.check_writable(out.parent)
    if why:
        raise ConfigError(f"cannot write {out}: {why}; choose another output path")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ConfigError(f"output path {out} exists and is not a folder; choose another output path")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    owned = _owned_files(out, kind)
    if owned is None:
        raise ConfigError(f"output folder {out} is not empty and is not a dmcompile {kind.what} "
                          f"(it holds {_listing(entries)}); refusing to replace it: choose another output path, "
                          "or empty the folder yourself")
    if not out.stat().st_mode & 0o222:
        raise ConfigError(f"output folder {out} is read-only (chmod a-w); refusing to replace it: make it writable "
                          f"(chmod -R u+w {out}) or choose another output path")
    extra = [e for e in entries if e not in owned]
    if extra:
        raise ConfigError(f"output folder {out} holds a dmcompile {kind.what} and also {_listing(extra)}, which "
                          "dmcompile did not write; refusing to replace it: move those files or choose another "
                          "output path")


def _listing(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


@contextlib.contextmanager
def atomic_dir(out: Path, kind: ArtifactKind):
    """Yield a temporary folder next to ``out``; on success it replaces ``out``. ``out`` must
    be absent, empty, or an earlier output of ``kind`` (checked before and again at the
    rename, so a folder the user filled in the meantime is not lost either). Runs writing the
    same ``out`` at once each finish (the last one's output stays); temporaries that killed runs
    left next to ``out`` are removed first."""
    out = Path(out)
    check_replaceable(out, kind)
    scratch.reclaim(out.parent)
    tmp = scratch.temp_dir(out.parent, out.name)
    try:
        yield tmp
        with scratch.locked(out.parent):  # concurrent writers of ``out`` swap one at a time
            check_replaceable(out, kind)
            if out.exists():
                old = scratch.temp_file(out)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        scratch.release(tmp)


def write_json(path: Path, data: dict) -> None:
    """Write JSON via a temporary file and rename."""
    path = Path(path)
    tmp = scratch.temp_file(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_marker(folder: Path, kind: ArtifactKind, body: dict, files: list[str]) -> dict:
    """Write ``kind``'s marker JSON into ``folder``: schema fields, ``body``, and the files the
    folder holds (so a later run knows what it may replace)."""
    data = {"kind": kind.kind, **body, "files": sorted(files)}
    write_json(Path(folder) / kind.marker, data)
    return data


def write_manifest(folder: Path, body: dict, files: list[str]) -> dict:
    """Write manifest.json listing ``files`` (relative to ``folder``) with size and sha256."""
    folder = Path(folder)
    manifest = {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "kind": BUNDLE_KIND,
        "dmcompile_version": __version__,
        **body,
        "files": {f: {"bytes": (folder / f).stat().st_size, "sha256": sha256_file(folder / f)} for f in files},
    }
    write_json(folder / MANIFEST, manifest)
    return manifest
