"""Writing artefacts safely: build in a temporary sibling, rename when complete, and never
replace anything dmcompile did not write.

Every artefact folder has a marker JSON naming its kind (a bundle's manifest.json says
``"kind": "dmcompile-bundle"``). An existing output folder is replaced only when it is empty
or when its marker says it is an earlier output of the same kind and it holds nothing but the
files that output wrote; anything else is a :class:`ConfigError` and stays untouched. An
interrupted run leaves only a ``.<name>.tmp-*`` sibling, never a half-written folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dmruntime.bundle import BUNDLE_KIND, MANIFEST, sha256_file
from dmruntime.png import SOFTWARE

from . import __version__
from .errors import ConfigError

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
    ``kind`` holding only its own files."""
    out = Path(out)
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
    rename, so a folder the user filled in the meantime is not lost either)."""
    out = Path(out)
    check_replaceable(out, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        check_replaceable(out, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_file_replaceable(path: Path) -> None:
    """Raise ConfigError unless ``path`` is absent or a PNG that dmcompile wrote."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_file() and not path.is_symlink() and _is_our_png(path):
        return
    raise ConfigError(f"{path} exists and is not an image dmcompile wrote; refusing to overwrite it: "
                      "choose another output path or remove it yourself")


def _is_our_png(path: Path) -> bool:
    try:
        from PIL import Image

        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get("Software") == PNG_SOFTWARE
    except Exception:  # not an image at all
        return False


def write_json(path: Path, data: dict) -> None:
    """Write JSON via a temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
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
