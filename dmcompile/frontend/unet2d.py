"""diffusers' ``UNet2DModel``: sample, timestep, and class labels when it embeds classes."""

from __future__ import annotations

from .family import ModelFamily, ModelInput

# Config keys whose features need inputs beyond sample, timestep, class_labels and
# encoder_hidden_states: each is refused with a message naming what it would need.
UNET_UNSUPPORTED = {
    "addition_embed_type": "added conditions (added_cond_kwargs: SDXL's text_embeds and time_ids, or image_embeds)",
    "encoder_hid_dim_type": "a projected encoder input (encoder_hid_proj: image or text projection embeddings)",
    "time_cond_proj_dim": "a timestep_cond input (a guidance-scale embedding, as in LCM)",
    "class_embed_type": "float class conditioning (class_embed_type timestep / identity / projection)",
    "encoder_hid_dim": "a projected encoder input (encoder_hid_proj from encoder_hid_dim)",
}
# demoDiffusion's / ModelOpt's INT8 recipe for diffusion UNets: these stay float (small, or
# sensitive, and their Q/DQ would break TensorRT's fusions: a shortcut Conv's output is a
# residual Add's skip input)
UNET_DEFAULT_FLOAT = ("time_embedding", "time_emb_proj", "class_embedding", "add_embedding", "conv_in", "conv_out",
                      "conv_shortcut", "proj_out")


class UNet2DFamily(ModelFamily):
    name = "UNet2DModel"
    unsupported = UNET_UNSUPPORTED
    default_float = UNET_DEFAULT_FLOAT

    def supported_inputs(self) -> tuple[str, ...]:
        return ("sample", "timestep", "encoder_hidden_states", "class_labels (num_class_embeds)")

    def condition_inputs(self, config: dict) -> tuple[ModelInput, ...]:
        return (ModelInput("class_labels", "int64", (None,)),) if self.num_classes(config) else ()
