"""Resident memory of a bundle at run time, estimated on paper (no run): what `dmcompile inspect`
prints per engine set, and what benchmarks/README.md's board estimates are made of.

    resident ~ runtime base + weights held x weight copies + batch x activation peak per sample

Each backend states its numbers as a :class:`MemoryModel` (``Backend.memory`` in
``dmcompile/backends/``); the formula lives here.

- weights held: every engine file's bytes (int8 / float initializers inside) plus the stored
  weights the runtime expands to int8 (`weights.npz`, one copy shared by the engines that use
  it); ONNX Runtime keeps the initializer and a pre-packed copy for its int8 kernels
  (2 copies; weights from weights.npz measured one copy more); each OpenVINO compiled
  model holds 22 MB + 2.5 bytes per int8 weight (fitted to two measured bundles).
- activation peak per sample: the largest set of activation tensors alive at once when the fp32
  graph runs in order, each freed after its last reader (the liveness a memory planner
  reaches). Measured on the fp32 graph, so an upper estimate for the int8 one, whose quantized
  tensors take a quarter of that.
- runtime base: Python, numpy and the runtime library, measured on x86-64 (``MemoryModel.base_mb``).

benchmarks/bench_runtime.py measures the real peak; benchmarks/README.md compares the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MemoryModel:
    """What one runtime holds, per the formula above; each backend declares its own
    (``Backend.memory``). ``weight_copies``: bytes held per int8 weight byte; ``engine_mb``: a fixed
    cost per engine; ``base_mb``: the runtime's own footprint, measured on x86-64;
    ``activation_factor``: activation bytes per fp32 liveness byte; ``shared_weights``: the file all
    engines reference (each compiled model copies it), if any."""

    weight_copies: float
    engine_mb: float = 0.0
    base_mb: float = 0.0
    activation_factor: float = 1.0
    shared_weights: str | None = None


_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}  # ONNX elem type -> bytes


def activation_peak(model_path: str | Path, free_dim: int = 1) -> dict:
    """Per sample: the peak bytes of live activation tensors when the graph runs in order, and
    the largest single tensor. Graph inputs are made concrete (batch 1, any other free dimension,
    such as a prompt's sequence length, ``free_dim``) and shapes inferred symbolically (ONNX
    Runtime's inference, which follows the Shape/Reshape arithmetic of attention). Initializers
    are not activations; graph inputs count from the start, outputs until the end."""
    import onnx
    from onnx import helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    # Weights stored outside stay there: their shapes, not their bytes, are what inference needs.
    weights = {t.name for t in g.initializer}
    for t in list(g.initializer):
        if uses_external_data(t):
            if math.prod(t.dims) <= 64:  # shape arithmetic constants: their values matter
                load_external_data_for_tensor(t, str(Path(model_path).parent))
            else:
                g.initializer.remove(t)
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for i in g.input:
        for axis, d in enumerate(i.type.tensor_type.shape.dim):
            if not (d.HasField("dim_value") and d.dim_value > 0):
                d.ClearField("dim_param")
                d.dim_value = 1 if axis == 0 else free_dim
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op it does not know: ONNX's own inference, dimensions it cannot tell count 1
        inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    size, unknown = {}, 0
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.name in weights:
            continue
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            unknown += 1
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in t.shape.dim]
        unknown += any(not (d.HasField("dim_value") and d.dim_value > 0) for d in t.shape.dim)
        size[vi.name] = math.prod(dims) * _BYTES.get(t.elem_type, 4)
    last_use = {}
    for i, n in enumerate(g.node):
        for name in n.input:
            if name:
                last_use[name] = i
    keep = {o.name for o in g.output}
    live = {i.name: size.get(i.name, 0) for i in g.input if i.name not in weights}
    peak = current = sum(live.values())
    for i, n in enumerate(g.node):
        for o in n.output:
            if o and o not in live:
                live[o] = size.get(o, 0)
                current += live[o]
        peak = max(peak, current)
        for name in set(n.input):
            if name in live and last_use.get(name) == i and name not in keep:
                current -= live.pop(name)
    return {"peak_bytes": int(peak), "largest_bytes": int(max(size.values(), default=0)), "unknown_shapes": unknown}


def weights_held(manifest: dict, model: MemoryModel) -> dict[str, int]:
    """Bytes of weights each engine file holds once loaded (its own initializers, plus the
    int8 expansion of the stored weights it takes from weights.npz, counted once per key; an
    openvino-cpu engine: also the shared weights.bin, which each compiled model copies)."""
    files = manifest["files"]
    engines = sorted({g["engine"] for g in manifest["groups"]})
    stored = (manifest.get("weights") or {}).get("tensors", {})
    shared = {}
    for name, spec in (manifest.get("engines") or {}).items():
        for key in spec.get("external_weights", {}).values():
            shared.setdefault(key, name)  # counted with the first engine that uses it
    held = {e: int(files[e]["bytes"]) if e in files else 0 for e in engines}
    if model.shared_weights and model.shared_weights in files:
        for e in held:  # one weights.bin on disk, one copy in each compiled model
            held[e] += int(files[model.shared_weights]["bytes"])
    for key, engine in shared.items():
        if engine in held and key in stored:
            held[engine] += int(math.prod(stored[key]["shape"]))  # expanded to one int8 per value
    return held


def resident_weight_bytes(model: MemoryModel, held: list[int], expanded: int = 0) -> float:
    """Weight bytes resident for engines holding ``held`` bytes each (weights_held), ``expanded``
    of them int8 arrays expanded from weights.npz (measured: one copy more)."""
    return sum(held) * model.weight_copies + model.engine_mb * 1e6 * len(held) + expanded


def resident_estimate(manifest: dict, batch: int, model: MemoryModel, components: MemoryModel) -> dict:
    """The estimate for running the bundle at ``batch`` (guidance doubles the UNet batch) on the
    runtime ``model`` describes (``components``: the runtime of the decoder):
    {"base_mb", "weights_mb", "activations_mb", "total_mb", "engines"}. Needs the manifest's
    ``memory`` entry (written by the build) for activations; without it they are left out."""
    runtime = manifest.get("engine", {}).get("runtime", "onnxruntime")
    held = weights_held(manifest, model)
    stored = (manifest.get("weights") or {}).get("tensors", {})
    weights = resident_weight_bytes(model, list(held.values()), sum(math.prod(t["shape"]) for t in stored.values()))
    mem = manifest.get("memory") or {}
    guided = 2 if (manifest.get("conditioning") or {}).get("calibration_guidance_scale") else 1
    act = batch * guided * mem.get("activation_peak_bytes_per_sample", 0) * model.activation_factor
    dec = manifest.get("decoder") or {}
    if dec and mem.get("decoder_activation_peak_bytes_per_sample"):
        act = max(act, batch * mem["decoder_activation_peak_bytes_per_sample"])  # decoded after sampling
        weights += resident_weight_bytes(components, [int(manifest["files"].get(dec["file"], {}).get("bytes", 0))])
    base = model.base_mb
    return {"runtime": runtime, "batch": batch, "engines": len(held), "base_mb": base, "weights_mb": weights / 1e6,
            "activations_mb": act / 1e6, "total_mb": base + (weights + act) / 1e6, "activations_known": bool(mem)}


def memory_entry(fp_dir: Path, decoder_file: str | None = None, sequence_length: int | None = None) -> dict:
    """The manifest's ``memory`` entry, from the fp32 export's graphs (cross-attention models at
    their reference prompt length)."""
    unet = activation_peak(Path(fp_dir) / "model.onnx", free_dim=sequence_length or 1)
    entry = {"activation_peak_bytes_per_sample": unet["peak_bytes"],
             "largest_activation_bytes_per_sample": unet["largest_bytes"],
             "unknown_shapes": unet["unknown_shapes"],  # counted as 1 element per unknown dimension
             "method": "liveness of the fp32 graph's activations in graph order (float32; an upper estimate)"}
    if decoder_file:
        entry["decoder_activation_peak_bytes_per_sample"] = activation_peak(Path(fp_dir) / decoder_file)["peak_bytes"]
    return entry


def board_estimate(params: int, act_peak: int, engines: int, batch: int, model: MemoryModel,
                   stored_weights: bool = False) -> float:
    """Estimated resident MB of a bundle that does not exist yet (README's board estimates):
    ``params`` int8 weights in each of ``engines`` engines (``stored_weights``: from weights.npz,
    as 4-bit bundles keep them), ``batch`` x ``act_peak`` activation bytes."""
    weights = resident_weight_bytes(model, [params] * engines, params if stored_weights else 0)
    return model.base_mb + (weights + batch * act_peak) / 1e6


__all__ = ["MemoryModel", "activation_peak", "board_estimate", "memory_entry", "resident_estimate", "resident_weight_bytes",
           "weights_held"]
