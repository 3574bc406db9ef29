"""A calibration pass's progress on disk, so that an interrupted pass goes on where it stopped.

The pass records its trajectories in shards (``trajectory.record_shard``) and folds them in
shard order; after each fold everything it has gathered is committed under
``<cache entry>.partial/``:

    state/          state.json (trajectories done, moment counts, what the pass measures),
                    observers.npz (every histogram), moments/ (running sums)
    work/           the next fold's copy of the moments, renamed over state/ when it completes
    shards/NNNNN/   a shard's own moment sums until folded

Only whole shards are ever committed (a rename), so a pass killed at any point, kill -9
included, resumes after its last folded shard with the same result as a pass never stopped. The folder
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

class Checkpoint:
    """The ``.partial`` folder of one calibration pass; ``what`` identifies the pass (a state
    written for another is ignored)."""

    def __init__(self, folder: Path, what: dict, fd: int | None):
        self.folder, self.what, self._fd = Path(folder), what, fd
        self._recover()

    @classmethod
    def open(cls, folder: Path, what: dict) -> Checkpoint | None:
        """The checkpoint in ``folder``, locked for this pass; None when another pass of the same
        entry holds it (this one then records without a checkpoint)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        fd = scratch.try_lock(Path(folder))
        if fd is None and scratch.fcntl is not None:
            return None
        return cls(folder, what, fd)

    def _recover(self) -> None:
        """A rename interrupted half-way leaves old/ beside work/ and no state/: finish it."""
        state, old, work = self.folder / STATE, self.folder / OLD, self.folder / WORK
        if not state.exists() and old.exists():
            (work if (work / "state.json").is_file() else old).rename(state)
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    def load(self) -> dict | None:
        """The committed state of this pass ({"done", "json", "observers"}), or None."""
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
        if recorder is None:
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
        path = self.folder / STATE / "state.json"
        if path.is_file():
            meta = json.loads(path.read_text())
            path.write_text(json.dumps({**meta, "finishing": True}))

    def close(self) -> None:
        """Release the lock (the saved calibration's writer removes the folder)."""
        if self._fd is not None:
            os.close(self._fd)
