"""Model families: what the frontend needs to know about one diffusers model class (its graph
inputs, example inputs, conditioning, unsupported features, default float layers), so that
nothing else in dmcompile lists a model's inputs. Registered by diffusers class name.

Adding a family is one module with a :class:`ModelFamily` subclass plus one line in
:data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError

# diffusers class name -> "module:class"
FAMILIES = {
    "UNet2DModel": "dmcompile.frontend.unet2d:UNet2DFamily",
    "UNet2DConditionModel": "dmcompile.frontend.unet2d_condition:UNet2DConditionFamily",
}


@dataclass(frozen=True)
class ModelInput:
    """One graph input of the traced model: name, dtype and shape (None = a free dimension;
    ``axes`` names each free dimension in the ONNX graph)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]
    axes: tuple[tuple[int, str], ...] = ((0, "batch"),)


class ModelFamily:
    """One diffusers model class. The graph always takes ``sample`` and ``timestep`` first, then
    :meth:`condition_inputs` in that order, and returns ``eps``."""

    name = ""
    # config keys whose features need inputs the family does not export: key -> what they need
    unsupported: dict[str, str] = {}
    # module names kept float by targets that keep embeddings and edge layers float (TensorRT)
    default_float: tuple[str, ...] = ()

    def check(self, config: dict, what: str) -> None:
        """Raise ModelError for a feature of ``config`` this family cannot export."""
        for key, need in self.unsupported.items():
            if config.get(key) is not None:
                raise ModelError(f"{what}: {key}={config[key]!r} makes the model need {need}, which dmcompile does "
                                 f"not support; supported inputs are {', '.join(self.supported_inputs())}")

    def supported_inputs(self) -> tuple[str, ...]:
        return ("sample", "timestep")

    def sample_shape(self, config: dict) -> tuple[int, ...]:
        size = config["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config["in_channels"]), int(h), int(w))

    def num_classes(self, config: dict) -> int | None:
        """Class labels the model embeds, or None."""
        return config.get("num_class_embeds") or None

    def condition_inputs(self, config: dict) -> tuple[ModelInput, ...]:
        """Conditioning inputs, in the order the engine takes them."""
        return ()

    def inputs(self, config: dict) -> tuple[ModelInput, ...]:
        return (ModelInput("sample", "float32", (None, *self.sample_shape(config))),
                ModelInput("timestep", "int64", (None,)), *self.condition_inputs(config))

    def example_inputs(self, config: dict, num_train_timesteps: int, n: int, seed: int,
                       sequence_length: int) -> dict[str, np.ndarray]:
        """Seeded inputs of every graph input: noise, timesteps spread over [0, T), then each
        condition (:meth:`example_condition`)."""
        rng = np.random.default_rng(seed)
        out = {"sample": rng.standard_normal((n, *self.sample_shape(config)), dtype=np.float32),
               "timestep": np.linspace(0, num_train_timesteps - 1, n).round().astype(np.int64)}
        for i in self.condition_inputs(config):
            out[i.name] = self.example_condition(config, i, n, rng, sequence_length)
        return out

    def example_condition(self, config: dict, inp: ModelInput, n: int, rng: np.random.Generator,
                          sequence_length: int) -> np.ndarray:
        """n seeded rows of one conditioning input: class labels over the classes, standard-normal
        embeddings of ``sequence_length`` tokens."""
        if inp.dtype == "int64":
            return rng.integers(0, self.num_classes(config), n).astype(np.int64)
        return rng.standard_normal((n, sequence_length, inp.shape[-1]), dtype=np.float32)

    def dynamic_axes(self, config: dict) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes of every input and of ``eps``."""
        axes = {i.name: dict(i.axes) for i in self.inputs(config)}
        return {**axes, "eps": {0: "batch"}}


def get_family(cls: str, what: str = "model") -> ModelFamily:
    """The family of diffusers class ``cls``; ModelError naming the supported ones otherwise."""
    where = FAMILIES.get(cls)
    if where is None:
        raise ModelError(f"{what}: model class {cls!r} is not supported yet; dmcompile handles {tuple(FAMILIES)}")
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)()
