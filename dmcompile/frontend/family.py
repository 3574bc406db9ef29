"""Model families: what the frontend needs to know about one diffusers model class (its graph
inputs, example inputs, conditioning, unsupported features, default float layers), so that
nothing else in dmcompile lists a model's inputs. Registered by diffusers class name.

Adding a family is one module with a :class:`ModelFamily` subclass plus one entry in
:data:`FAMILIES`. One diffusers class may hold several families (SDXL's UNet is a
``UNet2DConditionModel`` with added conditions): the first whose :meth:`ModelFamily.matches`
takes the config is used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError

# diffusers class name -> "module:class" of its families, the most specific first
FAMILIES = {
    "UNet2DModel": ("dmcompile.frontend.unet2d:UNet2DFamily",),
    "UNet2DConditionModel": ("dmcompile.frontend.sdxl:SDXLUNetFamily",
                             "dmcompile.frontend.unet2d_condition:UNet2DConditionFamily"),
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
    # text-to-image pipelines: which encoder hidden state the UNet takes ("last": SD 1.x / 2.x,
    # "penultimate": SDXL) and the input a text encoder's pooled projection feeds (SDXL: text_embeds)
    text_layer = "last"
    pooled_input: str | None = None

    def pooled_width(self, config: dict) -> int | None:
        """Width of :attr:`pooled_input`, or None."""
        return None

    def matches(self, config: dict) -> bool:
        """Whether this family (of its diffusers class) describes ``config``."""
        return True

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

    def condition_defaults(self, config: dict, vae_scale_factor: int) -> dict[str, list]:
        """Conditioning inputs with a value the pipeline derives rather than the user gives (SDXL's
        ``time_ids`` from the image size): name -> one row, as JSON. Samplers and calibration
        use it where the input is not given."""
        return {}

    def call_kwargs(self, conds: dict) -> dict:
        """The diffusers model's keyword arguments for the conditioning inputs, by graph input name."""
        return dict(conds)

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
        defaults = self.condition_defaults(config, 8)
        for i in self.condition_inputs(config):
            out[i.name] = (np.repeat(np.asarray(defaults[i.name], np.float32)[None], n, axis=0) if i.name in defaults
                           else self.example_condition(config, i, n, rng, sequence_length))
        return out

    def example_condition(self, config: dict, inp: ModelInput, n: int, rng: np.random.Generator,
                          sequence_length: int) -> np.ndarray:
        """n seeded rows of one conditioning input: class labels over the classes, standard-normal
        embeddings (``sequence_length`` tokens where the sequence axis is free)."""
        if inp.dtype == "int64":
            return rng.integers(0, self.num_classes(config), n).astype(np.int64)
        return rng.standard_normal((n, *(sequence_length if d is None else d for d in inp.shape[1:])), dtype=np.float32)

    def dynamic_axes(self, config: dict) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes of every input and of ``eps``."""
        axes = {i.name: dict(i.axes) for i in self.inputs(config)}
        return {**axes, "eps": {0: "batch"}}


def get_family(cls: str, what: str = "model", config: dict | None = None) -> ModelFamily:
    """The family of diffusers class ``cls`` that takes ``config`` (without one: the class's most
    general family); ModelError naming the supported classes otherwise."""
    where = FAMILIES.get(cls)
    if where is None:
        raise ModelError(f"{what}: model class {cls!r} is not supported yet; dmcompile handles {tuple(FAMILIES)}")
    families = [getattr(importlib.import_module(m), n)() for m, n in (w.split(":") for w in where)]
    return next((f for f in families if config is not None and f.matches(config)), families[-1])
