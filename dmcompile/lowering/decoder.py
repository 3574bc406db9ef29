"""W8A8 lowering of a latent model's VAE decoder: the UNet's lowering (same profile, per-channel
int8 weights, calibrated 8-bit activations, ONNX Runtime's QDQ fusion) on a graph with one input,
``latents``. The decoder runs once per image, not once per step, so what it buys is small next to
the UNet's; what it costs in fidelity is measured against the fp32 decoder on latents it was not
calibrated on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from .. import onnxio
from ..calibration.observers import HistogramObserver
from ..frontend.layermap import build_layer_map
from ..quant import quantize_weight, weight_axis
from ..targets import TargetProfile
from .qdq import lower_group


def decoder_ranges(model: onnx.ModelProto, names: list[str], latents: np.ndarray, base_dir: Path, kind: str,
                   percentile: float, bins: int, batch: int = 16, sample_per_tensor: int = 65536,
                   seed: int = 0) -> dict[str, tuple[float, float]]:
    """8-bit clipping range of each of ``names`` over the decoder run on ``latents``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
    sess = onnxio.session(m, base_dir=base_dir)
    obs = {n: HistogramObserver(bins) for n in names}
    rng = np.random.default_rng(seed)
    for i in range(0, len(latents), batch):
        for n, v in zip(names, sess.run(names, {"latents": latents[i:i + batch]})):
            flat = v.ravel()
            sub = flat[rng.integers(0, flat.size, sample_per_tensor)] if flat.size > sample_per_tensor else None
            obs[n].update(flat, sub)
    return {n: obs[n].range(kind, 8, percentile) for n in names}


def lower_decoder(path: Path, latents: np.ndarray, profile: TargetProfile, kind: str = "mse",
                  percentile: float = 99.99, bins: int = 2048) -> tuple[onnx.ModelProto, int]:
    """The int8 decoder's QDQ graph (an onnx.ModelProto; the caller's backend fuses it) from the
    fp32 decoder at ``path``, its activation ranges observed on ``latents``; and the number of
    layers it quantizes."""
    proto = onnxio.load(path, weights=False)
    base = Path(path).parent
    layer_map = build_layer_map(proto, "decoder", tuple(latents.shape[1:]), base_dir=base,
                                feeds={"latents": np.zeros((1, *latents.shape[1:]), np.float32)})
    layers = list(layer_map.layers)
    ranges = decoder_ranges(proto, profile.quantized_tensors(proto, layers), latents, base, kind, percentile, bins)
    inits = {i.name: i for i in proto.graph.initializer}
    weights = {l.weight: quantize_weight(onnxio.array(inits[l.weight], base), weight_axis(l), profile.grid_bits(8))
               for l in layers if l.weight}
    qdq = lower_group(proto, layer_map, {l.node for l in layers}, weights, ranges, profile, base)
    return qdq, len(layers)
