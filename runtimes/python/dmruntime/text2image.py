"""Prompt in, image out: a text-to-image bundle's tokenizers and text encoders, its UNet
engines under classifier-free guidance, and its decoder, with numpy only.

    from dmruntime import Bundle, Text2Image
    pipe = Text2Image(Bundle.open("out/"))
    images = pipe.generate(["a handwritten seven", "the number 2"], n=4, seed=0)  # [8, 3, H, W] in [-1, 1]
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .sampler import DEFAULT_BATCH, SamplingLoop
from .text import check_prompts

# diffusers' StableDiffusionPipeline default, for bundles calibrated without guidance
DEFAULT_GUIDANCE = 7.5


class Text2Image:
    """Generates images from prompts with a bundle that ships text encoders (``bundle.components
    ["text"]``). ``sampler``/``steps``/``karras``/``eta``: as :class:`dmruntime.SamplingLoop`
    (default: the bundle's calibrated sampler and steps). ``guidance_scale``: default the scale
    the bundle was calibrated with, else 7.5 (diffusers'); as in diffusers, a scale <= 1 runs the
    conditional branch alone. ``negative_prompt`` (and ``negative_prompt_2`` for a second encoder):
    the null branch's prompt; None is diffusers' default (the empty prompt, or zeros where the
    pipeline forces them: SDXL). Prompt encodings are cached: a prompt is encoded once per object."""

    def __init__(self, bundle, sampler=None, *, steps: int | None = None, karras: bool | None = None,
                 eta: float = 0.0, guidance_scale: float | None = None, batch_size: int = DEFAULT_BATCH,
                 negative_prompt: str | None = None, negative_prompt_2: str | None = None):
        text = bundle.components.get("text")
        if text is None:
            raise InputError("this bundle has no text encoder, so it cannot take prompts; pass its conditions "
                             "instead (--conditions FILE.npz, or --class K for a class table), or build the bundle "
                             "from a text-to-image pipeline folder (tokenizer/ and text_encoder/)")
        if bundle.decoder is None:
            raise InputError("this text bundle has no decoder; rebuild it from a pipeline folder with vae/")
        self.bundle, self.text = bundle, text
        self.sampler, self.steps, self.karras, self.eta = sampler, steps, karras, eta
        if guidance_scale is None:
            guidance_scale = (bundle.manifest.get("conditioning") or {}).get("calibration_guidance_scale")
        self.guidance_scale = DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        self.batch_size = batch_size
        self.negative_prompt = _one(negative_prompt)
        self.negative_prompt_2 = _one(negative_prompt_2)
        self._cache: dict[tuple, dict] = {}

    def encode(self, prompts, prompts_2=None) -> dict[str, np.ndarray]:
        """The UNet conditions of ``prompts`` (one row each; ``prompts_2``: the second encoder's,
        default the same), encoded once and cached."""
        prompts = check_prompts(prompts)
        prompts_2 = self.text.check_second(prompts, prompts_2)
        pairs = list(zip(prompts, prompts_2 if prompts_2 is not None else [None] * len(prompts)))
        todo = list(dict.fromkeys(q for q in pairs if q not in self._cache))
        for second in (False, True):  # the pairs without a second prompt, then those with one
            part = [q for q in todo if (q[1] is not None) == second]
            if part:
                enc = self.text.encode([q[0] for q in part], prompts_2=[q[1] for q in part] if second else None)
                for i, q in enumerate(part):
                    self._cache[q] = {k: v[i] for k, v in enc.items()}
        rows = [self._cache[q] for q in pairs]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def null_condition(self, negative_prompt: str | None = None, negative_prompt_2: str | None = None) -> dict:
        """The null branch's condition, one row per input (no batch axis): the negative prompts' encoding
        (default the object's), as diffusers makes it."""
        neg = self.negative_prompt if negative_prompt is None else _one(negative_prompt)
        neg2 = self.negative_prompt_2 if negative_prompt_2 is None else _one(negative_prompt_2)
        key = ("<negative>", neg, neg2)
        if key not in self._cache:
            self._cache[key] = self.text.encode_negative(neg, neg2)
        return self._cache[key]

    def time_ids(self, original_size=None, crops_coords_top_left=None, target_size=None) -> dict:
        """SDXL's size conditioning as a condition row (``{"time_ids": [6]}``); each part defaults as
        in diffusers (original = target = the bundle's resolution, crop (0, 0)); {} when none is given."""
        given = {"original_size": original_size, "crops_coords_top_left": crops_coords_top_left,
                 "target_size": target_size}
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            return {}
        spec = self.bundle.conditioning
        if "time_ids" not in spec.names:
            raise InputError(f"{', '.join(given)} set(s) SDXL's time_ids, and this bundle's UNet takes none (it "
                             f"takes {', '.join(spec.describe())}); leave them out")
        default = np.asarray(spec.defaults["time_ids"], np.float32)
        parts = []
        for k, at in (("original_size", 0), ("crops_coords_top_left", 2), ("target_size", 4)):
            crop = k == "crops_coords_top_left"
            try:
                v = np.asarray(given.get(k, default[at:at + 2]), dtype=np.float64).ravel()
            except (TypeError, ValueError):
                v = np.array([np.nan])
            if v.shape != (2,) or not np.isfinite(v).all() or (v < 0).any() or (not crop and (v == 0).any()):
                raise InputError(f"{k} must be two numbers ({'top, left' if crop else 'height, width'}, "
                                 f"{'>= 0' if crop else '> 0'}), got {given.get(k)!r}")
            parts.append(v)
        return {"time_ids": np.concatenate(parts).astype(np.float32)[None]}

    def loop(self, guidance_scale: float | None = None) -> SamplingLoop:
        """The sampling loop a run takes (its sampler, steps, guidance)."""
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        return SamplingLoop(self.bundle, self.sampler, batch_size=self.batch_size,
                            guidance_scale=None if s <= 1.0 else s, steps=self.steps, karras=self.karras,
                            eta=self.eta)

    def generate(self, prompts, n: int = 1, seed: int | list[int] = 0, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, latents: np.ndarray | None = None, progress=None,
                 output: str = "images", *, prompts_2=None, negative_prompt_2: str | None = None,
                 original_size=None, crops_coords_top_left=None, target_size=None) -> np.ndarray:
        """Images for ``prompts`` (a string or a list), ``n`` per prompt, in prompt order
        (prompt i's images at rows i*n .. i*n+n-1): float32 [P*n, 3, H, W] in [-1, 1], or with
        ``output="latents"`` the sampled latents. The initial noise is drawn for all rows from
        ``numpy.random.default_rng(seed)``, or given as ``latents`` [P*n, C, h, w] (standard
        normal; scaled by the sampler's initial sigma, as diffusers' pipelines do). SDXL bundles:
        ``prompts_2`` / ``negative_prompt_2`` for the second text encoder (default the first's),
        ``original_size`` / ``crops_coords_top_left`` / ``target_size`` (height, width) for its
        time_ids (default: the bundle's resolution, no crop; the null branch takes the same)."""
        prompts = check_prompts(prompts)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n (images per prompt) must be an integer >= 1, got {n!r}")
        if output not in ("images", "latents"):
            raise InputError(f"output must be 'images' or 'latents', got {output!r}")
        rows = [p for p in prompts for _ in range(n)]
        rows_2 = self.text.check_second(prompts, prompts_2)
        sizes = self.time_ids(original_size, crops_coords_top_left, target_size)
        loop = self.loop(guidance_scale)
        cond = {**self.encode(rows, None if rows_2 is None else [p for p in rows_2 for _ in range(n)]), **sizes}
        if loop.guidance_scale is not None:
            loop.null_cond = self.null_condition(negative_prompt, negative_prompt_2)
        if latents is None:
            x, rng = loop.initial_noise(len(rows), seed)
        else:
            latents = np.asarray(latents)
            want = (len(rows), *self.bundle.sample_shape)
            if latents.shape != want or latents.dtype != np.float32:
                raise InputError(f"latents must be float32 of shape {list(want)}, got {latents.dtype} "
                                 f"{list(latents.shape)}")
            sigma = np.float32(loop.sampler.init_noise_sigma)
            x, rng = (latents * sigma).astype(np.float32), np.random.default_rng(seed)
        z = loop.run(x, rng, progress=progress, cond=cond)
        return z if output == "latents" else self.bundle.decode(z, self.batch_size)


def _one(prompt: str | None) -> str | None:
    """One prompt string (or None)."""
    return None if prompt is None else check_prompts(prompt)[0]
