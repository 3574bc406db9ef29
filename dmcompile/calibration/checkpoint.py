"""A calibration pass's progress on disk, so that an interrupted pass goes on where it stopped.

The pass records its trajectories a chunk at a time (``recorder.record_in_chunks``); after each
chunk everything it has gathered is committed under ``<cache entry>.partial/``:

    state/          state.json (chunks done, random generator states, moment counts, what the
                    pass measures), observers.npz (every histogram), moments/ (running sums)
    work/           the next chunk's copy of the moments, renamed over state/ when it completes

Only whole chunks are ever committed (a rename), so a pass killed at any point, kill -9
included, resumes from its last chunk with the same result as a pass never stopped. The folder
is locked while a pass uses it; a second pass of the same entry meanwhile records without one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .. import scratch
from .hessian import MomentRecorder

CHECKPOINT_SCHEMA_VERSION = 1
STATE, WORK, OLD = "state", "work", "old"

try:
    import fcntl
except ImportError:
    fcntl = None


class Checkpoint:
    """The ``.partial`` folder of one calibration pass; ``what`` identifies the pass (a state
    written for another is ignored)."""

    def __init__(self, folder: Path, what: dict):
        self.folder, self.what = Path(folder), what
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.folder, os.O_RDONLY)
        self.usable = True
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another pass of the same entry is running: record without a checkpoint
                self.usable = False
        self._recover()

    def _recover(self) -> None:
        """A rename interrupted half-way leaves old/ beside work/ and no state/: finish it."""
        if not self.usable:
            return
        state, old = self.folder / STATE, self.folder / OLD
        if not state.exists() and old.exists():
            (self.folder / WORK).rename(state) if (self.folder / WORK / "state.json").is_file() else old.rename(state)
        shutil.rmtree(self.folder / OLD, ignore_errors=True)
        shutil.rmtree(self.folder / WORK, ignore_errors=True)

    def load(self) -> dict | None:
        """The committed state of this pass ({"done", "json", "observers"}), or None."""
        if not self.usable:
            return None
        state = self.folder / STATE
        try:
            meta = json.loads((state / "state.json").read_text())
            if meta.get("schema_version") != CHECKPOINT_SCHEMA_VERSION or meta.get("what") != self.what or \
                    meta.get("finishing"):
                return None
            with np.load(state / "observers.npz") as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError):
            return None
        return {"done": int(meta["done"]), "json": meta, "observers": arrays}

    def moments_folder(self) -> Path:
        return self.folder / STATE / "moments"

    def work_folder(self) -> Path:
        return self.folder / WORK / "moments"

    def begin(self, recorder: MomentRecorder | None) -> None:
        """Before a chunk: its moments accumulate in a copy of the committed ones."""
        if recorder is None or not self.usable:
            return
        work = self.folder / WORK
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        if self.moments_folder().is_dir():
            shutil.copytree(self.moments_folder(), work / "moments")
        recorder.move_to(work / "moments")

    def commit(self, done: int, observers: dict[str, np.ndarray], meta: dict,
               recorder: MomentRecorder | None) -> None:
        """After a chunk: write its state beside its moments and rename the lot over state/."""
        if not self.usable:
            return
        work = self.folder / WORK
        work.mkdir(exist_ok=True)
        if recorder is not None:
            recorder.flush()
        tmp = scratch.temp_file(work / "observers.npz", ".npz")
        np.savez(tmp, **observers)
        os.replace(tmp, work / "observers.npz")
        (work / "state.json").write_text(json.dumps({
            "schema_version": CHECKPOINT_SCHEMA_VERSION, "what": self.what, "done": done, **meta}))
        state, old = self.folder / STATE, self.folder / OLD
        if state.exists():
            state.rename(old)
        work.rename(state)
        shutil.rmtree(old, ignore_errors=True)
        if recorder is not None:
            recorder.move_to(self.moments_folder())

    def finishing(self) -> None:
        """The sums are about to become means in place: a pass stopped now cannot resume."""
        if self.usable:
            path = self.folder / STATE / "state.json"
            if path.is_file():
                meta = json.loads(path.read_text())
                path.write_text(json.dumps({**meta, "finishing": True}))

    def close(self, remove: bool) -> None:
        """Release the lock; ``remove``: the pass is saved, the checkpoint is no longer needed."""
        if remove and self.usable:
            shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._fd)


def generator_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def restore_generator(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
