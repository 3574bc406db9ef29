"""diffusers' ``UNet2DConditionModel`` (the SD 1.x / 2.x family): sample, timestep,
encoder_hidden_states [B, L, D] with L free, and class labels when it embeds classes."""

from __future__ import annotations

from ..errors import ModelError
from .family import ModelInput
from .unet2d import UNet2DFamily

# addition_embed_type values other than SDXL's "text_time" (frontend/sdxl.py): what each needs
ADDED_CONDITIONS = {
    "text": "an added embedding of encoder_hidden_states (TextTimeEmbedding)",
    "text_image": "added_cond_kwargs image_embeds and text_embeds (Kandinsky 2.1)",
    "image": "added_cond_kwargs image_embeds (Kandinsky 2.2)",
    "image_hint": "added_cond_kwargs image_embeds and hint (Kandinsky 2.2 ControlNet)",
}


class UNet2DConditionFamily(UNet2DFamily):
    name = "UNet2DConditionModel"
    addition_embed_type = None  # the added conditions this family exports (SDXL's family: "text_time")

    def check(self, config: dict, what: str) -> None:
        added = config.get("addition_embed_type")
        if added is not None and added != self.addition_embed_type:
            need = ADDED_CONDITIONS.get(added, "added conditions dmcompile does not know")
            raise ModelError(f"{what}: addition_embed_type={added!r} makes the model need {need}, which dmcompile "
                             "does not support; supported: none, or 'text_time' (SDXL: text_embeds and time_ids)")
        super().check(config, what)
        dim = config.get("cross_attention_dim", 1280)
        if not isinstance(dim, int):
            raise ModelError(f"{what}: cross_attention_dim {dim!r} differs per block; dmcompile supports one "
                             "width (the SD 1.x / 2.x family)")

    def condition_inputs(self, config: dict) -> tuple[ModelInput, ...]:
        text = ModelInput("encoder_hidden_states", "float32", (None, None, int(config["cross_attention_dim"])),
                          axes=((0, "batch"), (1, "sequence")))
        return (text, *super().condition_inputs(config))
