"""The build's engine-writing step: the target's backend emits the engines from the lowered
groups; then the files every bundle kind may ship (guidance's null condition, the class table,
the components: the decoder) and the backend's own extras."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
from dmruntime.components import component_class
from dmruntime.conditioning import NULL_FILE, TABLE_FILE

from .. import onnxio, stages
from ..backends import get_backend
from ..backends.base import EngineJob, EngineSet
from ..calibration.trajectory import CalibrationResult
from ..config import BuildConfig, MixedRecipe
from ..lowering.groups import lower_groups
from .workspace import ComponentEngine, WeightPlan, Workspace


def engine_job(ws: Workspace, calib: CalibrationResult, plan: WeightPlan, config: BuildConfig,
               progress=None) -> EngineJob:
    """What the backend makes engines from: the plan's widths, each group's ranges, and how to
    lower a cluster of groups (weights rounded by ``config.analysis.rounding``)."""
    rounder = stages.rounder(calib, config.analysis.rounding, ws.profile.weight_grid_bits)
    lower = functools.partial(lower_groups, ws.fp, ws.layer_map, set(ws.precision.quantized), ws.weight_layers,
                              ws.profile, plan.bits, plan.per_group_rounding, rounder, progress=progress)
    return EngineJob(ws.profile, len(calib.groups), plan.bits, tuple(ws.weight_layers), calib.ranges(),
                     lower,
                     store_weights=isinstance(config.recipe, MixedRecipe),
                     per_group_rounding=plan.per_group_rounding, max_engines=config.max_engines,
                     shared_engine=config.shared_engine)


def write_engines(folder: Path, ws: Workspace, calib: CalibrationResult, plan: WeightPlan, config: BuildConfig,
                  lowered: tuple[ComponentEngine, ...] = (), progress=None) -> EngineSet:
    """The engines (one QDQ graph in memory at a time where the backend writes them as lowered),
    then the null condition of guidance and the class table, every component of the export (as it
    is, or as a step lowered it: ``lowered``) and the backend's extra files; ``files`` lists them
    all."""
    backend = get_backend(ws.profile.backend)
    engines = backend.emit(folder, engine_job(ws, calib, plan, config, progress), progress)
    files = list(engines.files)
    null, table = ws.conditioning.null, ws.conditioning.class_table
    if null:
        with open(folder / NULL_FILE, "wb") as f:
            np.savez(f, **{k: np.asarray(v) for k, v in sorted(null.items())})
        files.append(NULL_FILE)
    if table is not None:
        with open(folder / TABLE_FILE, "wb") as f:
            np.savez(f, class_table=table)
        files.append(TABLE_FILE)
    graphs = {c.key: c.models for c in lowered}
    for key, entry in ws.components.items():
        for name in component_class(key).files(entry):
            if name in graphs.get(key, {}):
                files += onnxio.save(graphs[key][name], folder / name)
            else:  # the export's file, as it is
                shutil.copyfile(ws.fp / name, folder / name)
                files.append(name)
    files += backend.extra_files(folder)
    return EngineSet(engines.engines, engines.engine_of, engines.params, engines.first_group, engines.fusion, files,
                     engines.stored)
