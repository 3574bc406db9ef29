"""What every backend provides, and the typed values it takes and returns.

A backend turns the lowered QDQ graphs of a build into one runtime's engines (``emit``), says
what the manifest's ``engine`` entry needs beyond the common fields, how many layers run as
integer kernels (``fusion``), what the runtime holds in memory (``memory``), and, where its
engines cannot run here as they are, a CPU reference of them (``reference``). It never imports
the algorithms that made the graphs: the build hands it an :class:`EngineJob`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from ..frontend.layermap import Layer
from ..memory import MemoryModel
from ..targets import TargetProfile

# (cluster index, weights key (widths, rounding scope), QDQ graph): what EngineJob.lower yields
Lowered = Iterator[tuple[int, tuple, onnx.ModelProto]]


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of the build (``dmcompile.compiler.build_steps``): ``run`` is called with the
    named values ``reads`` and its result stored as ``writes`` (``"body.KEY"``: that key of the
    manifest body, where a result of None writes nothing; None: nothing). ``when(config)``: run
    only if true. ``in_folder``: runs inside the bundle's temporary folder (opened before the first
    such step)."""

    name: str
    run: Callable
    reads: tuple[str, ...]
    writes: str | None = None
    when: Callable | None = None
    in_folder: bool = False


@dataclasses.dataclass(frozen=True)
class EngineJob:
    """What a backend makes engines from.

    ``lower(clusters, ranges, constant_conv_params=False)`` lowers one QDQ graph per cluster (a
    list of timestep groups with equal weight widths; its activation ranges the union of its
    groups' ``ranges``), one at a time; graphs with equal keys hold byte-identical weights;
    ``constant_conv_params``: the clusters will share one engine fed their scales, so their Conv
    inputs share zero points and Conv biases go float (``lowering/qdq.py``). ``bits[g, l]``: the width of
    ``weight_layers[l]`` in group g (32: kept float). ``store_weights``: quantized weights go to
    a store outside the engines (mixed precision: 4-bit packed). ``per_group_rounding``: each
    group's weights are rounded on its own moments. ``shared_engine``: a target whose engines carry their
    scales writes one engine for every group, fed each group's scalars."""

    profile: TargetProfile
    groups: int
    bits: np.ndarray
    weight_layers: tuple[Layer, ...]
    ranges: list[dict]
    lower: Callable[[list[list[int]], list[dict]], Lowered]
    store_weights: bool = False
    per_group_rounding: bool = False
    max_engines: int | None = None
    shared_engine: bool = False


@dataclasses.dataclass(frozen=True)
class StoredWeights:
    """Quantized weights kept outside the engines (weights.npz): key -> (int8 array, grid
    bits), and per engine the initializers it takes from there."""

    tensors: dict[str, tuple[np.ndarray, int]]
    external: dict[str, dict[str, str]]


@dataclasses.dataclass(frozen=True)
class EngineSet:
    """The engines a backend wrote: file names (``files``, in the order written: engines, group
    inputs, weights); per group, its engine and the inputs it feeds it (empty where the engine
    carries its scales); per engine a group it serves and its integer-kernel counts; the
    weights stored outside the engines, if any."""

    engines: tuple[str, ...]
    engine_of: tuple[str, ...]
    params: tuple[dict, ...]
    first_group: dict[str, int]
    fusion: dict[str, dict]
    files: list[str]
    stored: StoredWeights | None = None


def group_files(k: int) -> list[str]:
    """The bundle's per-group input files (``group_XX.npz``), in group order."""
    return [f"group_{g:02d}.npz" for g in range(k)]


def write_group_inputs(folder: Path, params: list[dict[str, np.ndarray]]) -> list[str]:
    """Each group's engine inputs as ``group_XX.npz`` in ``folder``; returns the file names."""
    names = group_files(len(params))
    for p, name in zip(params, names):
        with open(Path(folder) / name, "wb") as f:
            np.savez(f, **p)
    return names


class Backend:
    """One target runtime's engine writer. Subclasses set ``name`` (the profile's ``backend`` and the
    manifest's ``engine.runtime``) and ``memory``, and implement :meth:`emit` and :meth:`fusion`."""

    name = ""
    memory: MemoryModel = MemoryModel(weight_copies=1.0)
    float_weight_bytes = 4  # bytes per weight of a layer its engines keep float
    fusion_note = ""  # what `inspect`'s fusion lines count on this runtime

    def emit(self, folder: Path, job: EngineJob, progress=None) -> EngineSet:
        """Write the engines (and their group inputs and stored weights) into ``folder``."""
        raise NotImplementedError

    def engine_entry(self, engines: EngineSet, guided: bool, config) -> dict:
        """Fields of the manifest's ``engine`` entry beyond file, runtime and group inputs
        (``guided``: the model has a null condition, so guidance doubles the batch; ``config``:
        the BuildConfig)."""
        return {}

    def extra_files(self, folder: Path) -> list[str]:
        """Files the bundle ships for this runtime beyond the engines (written last)."""
        return []

    def steps(self) -> tuple[Step, ...]:
        """Build steps this target needs after the manifest is written (inside the bundle's
        temporary folder), appended to the common ones."""
        return ()

    def notes(self, manifest: dict, path: Path) -> list[str]:
        """Lines the command line prints after building a bundle for this target."""
        return []

    def fusion(self, bundle, engine: str) -> dict:
        """Integer-kernel counts of one engine file of an opened bundle, as its runtime runs it:
        {"integer": {op: n}, "float": {op: n}, "ratio"}."""
        raise NotImplementedError

    def reference(self, bundle, folder: Path):
        """A bundle that runs what ``bundle``'s engines compute in plain FP32 arithmetic, written
        into ``folder`` (None where the engines are that already)."""
        return None
