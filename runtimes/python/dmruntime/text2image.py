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
    conditional branch alone. Prompt encodings are cached: a prompt is encoded once per object."""

    def __init__(self, bundle, sampler=None, *, steps: int | None = None, karras: bool | None = None,
                 eta: float = 0.0, guidance_scale: float | None = None, batch_size: int = DEFAULT_BATCH,
                 negative_prompt: str = ""):
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
        self.negative_prompt = check_prompts(negative_prompt)[0]
        self._cache: dict[tuple[str, bool], dict] = {}

    def encode(self, prompts, negative: bool = False) -> dict[str, np.ndarray]:
        """The UNet conditions of ``prompts`` (one row each), encoded once and cached."""
        prompts = check_prompts(prompts)
        todo = list(dict.fromkeys(p for p in prompts if (p, negative) not in self._cache))
        if todo:
            enc = self.text.encode(todo, negative=negative)
            for i, p in enumerate(todo):
                self._cache[(p, negative)] = {k: v[i] for k, v in enc.items()}
        rows = [self._cache[(p, negative)] for p in prompts]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def loop(self, guidance_scale: float | None = None) -> SamplingLoop:
        """The sampling loop a run takes (its sampler, steps, guidance)."""
        s = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        return SamplingLoop(self.bundle, self.sampler, batch_size=self.batch_size,
                            guidance_scale=None if s <= 1.0 else s, steps=self.steps, karras=self.karras,
                            eta=self.eta)

    def generate(self, prompts, n: int = 1, seed: int | list[int] = 0, negative_prompt: str | None = None,
                 guidance_scale: float | None = None, latents: np.ndarray | None = None, progress=None,
                 output: str = "images") -> np.ndarray:
        """Images for ``prompts`` (a string or a list), ``n`` per prompt, in prompt order
        (prompt i's images at rows i*n .. i*n+n-1): float32 [P*n, 3, H, W] in [-1, 1], or with
        ``output="latents"`` the sampled latents. The initial noise is drawn for all rows from
        ``numpy.random.default_rng(seed)``, or given as ``latents`` [P*n, C, h, w] (standard
        normal; scaled by the sampler's initial sigma, as diffusers' pipelines do)."""
        prompts = check_prompts(prompts)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n (images per prompt) must be an integer >= 1, got {n!r}")
        if output not in ("images", "latents"):
            raise InputError(f"output must be 'images' or 'latents', got {output!r}")
        rows = [p for p in prompts for _ in range(n)]
        loop = self.loop(guidance_scale)
        cond = self.encode(rows)
        if loop.guidance_scale is not None:
            neg = self.negative_prompt if negative_prompt is None else check_prompts(negative_prompt)[0]
            null = {k: v[0] for k, v in self.encode([neg], negative=True).items()}
            loop.null_cond = null
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
