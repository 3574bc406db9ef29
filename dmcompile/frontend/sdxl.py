"""SDXL's UNet: a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``. Beside
``encoder_hidden_states`` it takes ``text_embeds`` [B, P] (the second text encoder's pooled
projection) and ``time_ids`` [B, 6] (original size, crop top-left, target size, in pixels), both
passed to diffusers as ``added_cond_kwargs``; the UNet embeds each time id with ``add_time_proj``
(``addition_time_embed_dim`` wide) and feeds [text_embeds, time embeddings] to ``add_embedding``,
whose input width ``projection_class_embeddings_input_dim`` is P + 6 x that.
"""

from __future__ import annotations

from ..errors import ModelError
from .family import ModelInput
from .unet2d_condition import UNet2DConditionFamily

TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w); the refiner's 5 hold an aesthetic score


class SDXLUNetFamily(UNet2DConditionFamily):
    name = "UNet2DConditionModel (SDXL, text_time)"
    addition_embed_type = "text_time"
    text_layer = "penultimate"  # diffusers' StableDiffusionXLPipeline.encode_prompt: hidden_states[-2]
    pooled_input = "text_embeds"
    unsupported = {k: v for k, v in UNet2DConditionFamily.unsupported.items() if k != "addition_embed_type"}

    def matches(self, config: dict) -> bool:
        return config.get("addition_embed_type") == self.addition_embed_type

    def supported_inputs(self) -> tuple[str, ...]:
        return (*super().supported_inputs(), "text_embeds", "time_ids")

    def check(self, config: dict, what: str) -> None:
        super().check(config, what)
        total, step = config.get("projection_class_embeddings_input_dim"), config.get("addition_time_embed_dim")
        if not isinstance(total, int) or not isinstance(step, int) or total - TIME_IDS * step < 1:
            raise ModelError(f"{what}: addition_embed_type 'text_time' needs projection_class_embeddings_input_dim "
                             f"(got {total!r}) = pooled text width + {TIME_IDS} x addition_time_embed_dim (got "
                             f"{step!r}) with a pooled width >= 1; fix the UNet's config.json")

    def pooled_width(self, config: dict) -> int:
        """Width of ``text_embeds``: what add_embedding takes beside the time ids' embeddings."""
        return int(config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(config["addition_time_embed_dim"])

    def condition_inputs(self, config: dict) -> tuple[ModelInput, ...]:
        text, *rest = super().condition_inputs(config)
        return (text, ModelInput("text_embeds", "float32", (None, self.pooled_width(config))),
                ModelInput("time_ids", "float32", (None, TIME_IDS)), *rest)

    def condition_defaults(self, config: dict, vae_scale_factor: int) -> dict[str, list]:
        # diffusers' StableDiffusionXLPipeline: original = target = the default resolution, no crop
        h, w = (int(d) * vae_scale_factor for d in self.sample_shape(config)[1:])
        return {"time_ids": [float(h), float(w), 0.0, 0.0, float(h), float(w)]}

    def call_kwargs(self, conds: dict) -> dict:
        added = {k: conds[k] for k in ("text_embeds", "time_ids")}
        return {**{k: v for k, v in conds.items() if k not in added}, "added_cond_kwargs": added}
