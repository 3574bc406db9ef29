"""Compiling a model into a bundle, as a list of named steps over typed values (:data:`STEPS`,
plus the steps the target's backend adds): ``build`` runs them in order.

    steps.py      prepare, calibrate, allocate, lower the decoder and the text encoders
    engines.py    the backend writes the engines; the bundle's other files
    manifest.py   the manifest body
    measure.py    PTQD statistics, step-aware report, fidelity of the written engines
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

from dmruntime.progress import reporter, stage

from ..artifacts import BUNDLE, atomic_dir, check_replaceable, write_manifest
from ..backends import get_backend
from ..backends.base import EngineSet, Step
from ..calibration.trajectory import CalibrationResult
from ..config import BuildConfig
from ..frontend.load import LoadedModel
from ..targets import get_profile
from .engines import write_engines
from .manifest import describe_bundle
from .measure import check_fidelity, check_speed, estimate_corrections, step_aware
from .steps import allocate_widths, calibrate_workspace, prepare, quantize_decoder, quantize_text
from .workspace import WeightPlan, Workspace

__all__ = ["STEPS", "VALUES", "BuildResult", "build", "build_steps"]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """The bundle folder and its manifest."""

    path: Path
    manifest: dict


def finish_manifest(folder: Path, body: dict, engines: EngineSet, started: float) -> dict:
    """The build's time, then manifest.json listing every file with its size and sha256."""
    body["build"]["seconds"] = round(time.perf_counter() - started, 2)
    return write_manifest(folder, body, engines.files)


# The values steps read and write, and their types. build's inputs: model, config, progress, started.
VALUES = {
    "model": (LoadedModel, str, Path, type(None)), "config": BuildConfig, "progress": object, "started": float,
    "ws": Workspace, "calib": CalibrationResult, "plan": WeightPlan, "lowered": tuple,
    "folder": Path, "cache": str, "engines": EngineSet, "body": dict, "manifest": dict,
}
INPUTS = ("model", "config", "progress", "started")

STEPS = (
    Step("prepare", prepare, ("model", "config"), "ws"),
    Step("calibrate", calibrate_workspace, ("ws", "config", "progress"), "calib"),
    Step("allocate", allocate_widths, ("ws", "calib", "config", "progress"), "plan"),
    Step("lower_decoder", quantize_decoder, ("ws", "config", "lowered", "progress"), "lowered",
         when=lambda config: config.decoder == "w8a8"),
    Step("lower_text", quantize_text, ("ws", "config", "lowered", "progress"), "lowered",
         when=lambda config: config.text_encoder == "int8"),
    Step("write_engines", write_engines, ("folder", "ws", "calib", "plan", "config", "lowered", "progress"), "engines",
         in_folder=True),
    Step("describe", describe_bundle, ("ws", "calib", "plan", "engines", "config", "lowered"), "body", in_folder=True),
    Step("estimate_corrections", estimate_corrections, ("folder", "body", "ws", "calib", "config", "progress", "cache"),
         "body.correction", when=lambda config: config.correction, in_folder=True),
    Step("step_aware", step_aware, ("ws", "calib", "plan", "config"), "body.step_aware_activation",
         when=lambda config: config.step_aware, in_folder=True),
    Step("check_fidelity", check_fidelity, ("folder", "body", "ws", "config", "cache"), "body.fidelity",
         when=lambda config: bool(config.eval_samples), in_folder=True),
    Step("check_speed", check_speed, ("folder", "body", "ws", "config", "cache"), "body.speed",
         when=lambda config: config.speed_check is not False, in_folder=True),
    Step("write_manifest", finish_manifest, ("folder", "body", "engines", "started"), "manifest", in_folder=True),
)


def build_steps(profile: str) -> tuple[Step, ...]:
    """The steps of a build for target profile ``profile``: the common ones, then its backend's."""
    return STEPS + tuple(get_backend(get_profile(profile).backend).steps())


def check_build(model: LoadedModel | str | Path | None, config: BuildConfig = BuildConfig()) -> Workspace:
    """What a build checks before any calibration (the model, its scheduler config, the rules
    against the layer map, a budget's feasibility, options that cannot apply), without building:
    raises the error the build would, else returns the prepared workspace. Exports the model to
    fp32 ONNX if it is not cached yet."""
    return prepare(model, config)


def build(model: LoadedModel | str | Path | None, out: str | Path, config: BuildConfig = BuildConfig(),
          progress="auto") -> BuildResult:
    """Compile a model into a bundle: per timestep group, activation scales calibrated on the
    inputs that group sees. ``W8A8Recipe``: int8 weights everywhere. ``MixedRecipe``: per-layer
    weight widths chosen by rate-distortion allocation under a budget (or pinned by
    overrides), 4-bit weights stored packed. On ort-cpu, groups with the same weights share one
    fused integer ONNX Runtime engine and feed it their own scales, zero points and int32 biases
    (group_XX.npz); on openvino-cpu and tensorrt each engine is a group's (or, with
    ``max_engines``, a run of groups') QDQ graph with its scales in it, all engines reading one
    weights.bin. ``out`` must be absent, empty or an earlier bundle; it is written to a
    temporary folder and renamed when complete. ``progress``: "auto" (bars on a terminal, lines in
    a log), "bars", "lines", None, or a callable ``progress(label, i, n)`` (dmruntime.progress)."""
    progress = reporter(progress, "build")
    check_replaceable(Path(out), BUNDLE)  # before minutes of work; atomic_dir checks again at the end
    values = {"model": model, "config": config, "progress": progress, "started": time.perf_counter(),
              "lowered": ()}
    with contextlib.ExitStack() as stack:
        for step in build_steps(config.profile):
            if step.when is not None and not step.when(config):
                continue
            if step.in_folder and "folder" not in values:
                # OpenVINO's compile cache for this build: the correction and the fidelity check open the
                # bundle in turn, the second one imports the compiled engines (a second start: 4.9x faster
                # on ddpm-cifar10-32, benchmarks/README.md)
                values["cache"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="dmcompile-ov-"))
                values["folder"] = stack.enter_context(atomic_dir(Path(out), BUNDLE))
            with stage(progress, step.name):  # every step a line (with its time) or a bar
                result = step.run(*(values[name] for name in step.reads))
            if step.writes and step.writes.startswith("body."):
                if result is not None:  # None: the step decided it does not apply
                    values["body"][step.writes[len("body."):]] = result
            elif step.writes:
                assert isinstance(result, VALUES[step.writes]), f"step {step.name} wrote a {type(result).__name__}"
                values[step.writes] = result
    return BuildResult(Path(out), values["manifest"])
