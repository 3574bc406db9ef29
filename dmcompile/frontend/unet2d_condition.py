"""diffusers' ``UNet2DConditionModel`` (the SD 1.x / 2.x family): sample, timestep,
encoder_hidden_states [B, L, D] with L free, and class labels when it embeds classes."""

from __future__ import annotations

from ..errors import ModelError
from .family import ModelInput
from .unet2d import UNet2DFamily


class UNet2DConditionFamily(UNet2DFamily):
    name = "UNet2DConditionModel"

    def check(self, config: dict, what: str) -> None:
        super().check(config, what)
        dim = config.get("cross_attention_dim", 1280)
        if not isinstance(dim, int):
            raise ModelError(f"{what}: cross_attention_dim {dim!r} differs per block; dmcompile supports one "
                             "width (the SD 1.x / 2.x family)")

    def condition_inputs(self, config: dict) -> tuple[ModelInput, ...]:
        text = ModelInput("encoder_hidden_states", "float32", (None, None, int(config["cross_attention_dim"])),
                          axes=((0, "batch"), (1, "sequence")))
        return (text, *super().condition_inputs(config))
