"""The typed values the build's steps pass along (besides the backends' EngineJob / EngineSet)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from dmruntime.conditioning import Conditioning

from ..config import BuildConfig, MixedRecipe
from ..frontend.layermap import Layer, LayerMap
from ..lowering.precision import LayerPrecision
from ..targets import TargetProfile


@dataclasses.dataclass(frozen=True)
class Workspace:
    """What every step works on: the model's description, its fp32 export and layer map, the
    target profile, and the resolved per-layer precision. The torch model itself is not kept:
    after the export every step reads the ONNX files (3.4 GB less resident for SD 1.5)."""

    model: dict  # LoadedModel.describe()
    scheduler: dict  # the diffusers scheduler config
    fp: Path
    layer_map: LayerMap
    profile: TargetProfile
    precision: LayerPrecision
    conditioning: Conditioning  # the model's conditioning inputs and the null condition (none: unconditional)
    conditions: dict | None  # calibration conditions, one row per trajectory
    components: dict  # manifest key -> the export's entry of each graph it ships beside the UNet (dmruntime.COMPONENTS)

    @property
    def calibration_conditions(self) -> tuple:
        """(Conditioning, rows): what calibration, RD curves and the step-aware check are driven by."""
        return self.conditioning, self.conditions

    @property
    def decoder(self) -> dict | None:
        """Latent models: the export's decoder entry (its file in ``fp``)."""
        return self.components.get("decoder")

    @property
    def weight_layers(self) -> list[Layer]:
        """Quantized layers with weights, in graph order: the columns of a WeightPlan."""
        return self.precision.weight_layers(self.layer_map)


@dataclasses.dataclass(frozen=True)
class WeightPlan:
    """bits[g, l]: weight width of ``Workspace.weight_layers[l]`` in timestep group g;
    record: the manifest's "plan" entry (None for W8A8); per_group_rounding: each engine's
    weights are rounded on its own groups' moments (GPTQ with per-group weights), so groups
    with equal widths still hold different weights."""

    bits: np.ndarray
    record: dict | None
    per_group_rounding: bool = False


@dataclasses.dataclass(frozen=True)
class ComponentEngine:
    """A component the build lowered (the W8A8 decoder, int8 text encoders): its manifest key,
    its lowered graphs by bundle file name (its other files are copied as exported), and its
    manifest entry as lowered (precision, and that precision's record: calibration, fidelity
    against fp32, fusion)."""

    key: str
    models: dict  # file name -> onnx.ModelProto
    entry: dict


def per_group_weights(config: BuildConfig) -> bool:
    """Whether the recipe gives each timestep group its own weights (``--per-group-weights``)."""
    return isinstance(config.recipe, MixedRecipe) and not config.recipe.share_weights
