"""Writing artefact folders safely: build in a temporary sibling, rename when complete.

A folder that holds a manifest.json is complete; an interrupted run leaves only a
``.<name>.tmp-*`` sibling, never a half-written folder under the requested name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from dmruntime.bundle import BUNDLE_KIND, MANIFEST, sha256_file

from . import __version__
from .errors import ConfigError

BUNDLE_SCHEMA_VERSION = 1


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = True):
    """Yield a temporary folder next to ``out``; on success it replaces ``out``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder; choose another -o")
    if out.exists() and not overwrite:
        raise ConfigError(f"output folder {out} exists; remove it or pass another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
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


def write_json(path: Path, data: dict) -> None:
    """Write JSON via a temporary file and rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


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
