"""Trace a UNet to fp32 ONNX, check parity with PyTorch, and write an export folder.

The export folder is a bundle with one fp32 engine serving every timestep (one group),
so the runtime samples from it the same way as from a quantized bundle. It also holds
the layer map that later stages use.

Exporter choice: the TorchScript exporter (``dynamo=False``). Both exporters match
PyTorch to ~1e-6 on diffusers UNets; the TorchScript one takes seconds on the 35.7 M
preset, and its node names carry the module path (``/down_blocks.0/resnets.0/conv1/Conv``)
that the layer map needs, and its initializer names do not collide with the names ONNX
Runtime's quantizer generates.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import onnxio
from ..artifacts import BUNDLE, atomic_dir, write_manifest
from ..config import ExportConfig
from ..errors import ExportError
from .layermap import LayerMap, build_layer_map
from .load import PROMPTS_FILE, LoadedModel
from .passes import check_graph, name_anonymous_weights, strip_wrapper_prefix
from .text import export_text
from .torch_model import conditioning_of


def _conditioning_entry(model: LoadedModel, folder: Path, config: ExportConfig,
                        text: dict | None = None) -> tuple[dict, list[str]]:
    """The manifest's "conditioning" entry and the files it names: a pipeline's own
    conditions.npz gives the null condition and a class table (stored as the bundle stores them);
    a text-to-image pipeline's null condition is its encoders' encoding of the empty prompt."""
    from dmruntime import InputError
    from dmruntime.conditioning import NULL_FILE, TABLE_FILE, read_conditions
    from dmruntime.text import TextEncoders

    spec = conditioning_of(model, sequence_length=text["encoders"][0]["max_length"] if text else config.sequence_length)
    null = table = None
    if text:
        encoders = TextEncoders(folder, text, ())
        null = encoders.encode_negative(None)  # diffusers' default negative prompt
    if model.default_conditions:
        try:
            _, given, table = read_conditions(model.default_conditions, spec)
            null = given if given is not None else null
        except InputError as e:
            raise ExportError(f"{model.default_conditions}: {e}") from None
    files = []
    if null:
        np.savez(folder / NULL_FILE, **{k: np.asarray(v) for k, v in sorted(null.items())})
        files.append(NULL_FILE)
    if table is not None:
        np.savez(folder / TABLE_FILE, class_table=table)
        files.append(TABLE_FILE)
    return spec.to_manifest(NULL_FILE if null else None, TABLE_FILE if table is not None else None), files


def _dummy_conditions(model: LoadedModel, sequence_length: int) -> dict[str, np.ndarray]:
    """One row of each conditioning input (shape probing at batch 1)."""
    return conditioning_of(model, sequence_length=sequence_length).dummy(1)

ENGINE_FILE = "model.onnx"
DECODER_FILE = "decoder.onnx"
LAYER_MAP_FILE = "layer_map.json"
WRAPPER_ATTR = "unet"


@dataclass(frozen=True)
class ExportResult:
    """Where the export folder is and what was measured while writing it."""

    path: Path
    parity_max_abs_err: float
    export_seconds: float
    onnx_bytes: int
    layer_map: LayerMap


def _wrapper(unet, cond_names: tuple[str, ...], family):
    import torch

    class EpsWrapper(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            setattr(self, WRAPPER_ATTR, unet)

        def forward(self, sample, timestep, *conds):
            kw = family.call_kwargs(dict(zip(cond_names, conds)))
            return getattr(self, WRAPPER_ATTR)(sample, timestep, return_dict=False, **kw)[0]

    return EpsWrapper(unet).eval()


def example_inputs(model: LoadedModel, n: int, seed: int, sequence_length: int) -> dict[str, np.ndarray]:
    """Seeded inputs of every engine input (the model family's ``example_inputs``)."""
    T = int(model.scheduler_config.get("num_train_timesteps", 1000))
    return model.family.example_inputs(model.unet_config, T, n, seed, sequence_length)


def trace_to_onnx(model: LoadedModel, path: Path, config: ExportConfig):
    """Export to ``path`` (its weights in ``<name>.data`` past protobuf's 2 GB limit); returns
    the cleaned onnx.ModelProto's graph with the weights left on disk (see :mod:`onnxio`)."""
    import tempfile

    import torch

    names = [i.name for i in model.inputs]
    ex = example_inputs(model, 2, config.seed, config.sequence_length)
    args = tuple(torch.from_numpy(ex[n]) for n in names)
    dyn = model.family.dynamic_axes(model.unet_config)
    cond_names = tuple(names[2:])
    # The exporter writes a big model's weights as one file per tensor: trace into a scratch
    # folder, then write the cleaned graph (and one data file) to ``path``.
    with warnings.catch_warnings(), torch.no_grad(), tempfile.TemporaryDirectory(prefix="dmcompile-trace-") as d:
        warnings.simplefilter("ignore")  # TracerWarnings from diffusers' shape asserts
        traced = Path(d) / "traced.onnx"
        try:
            torch.onnx.export(_wrapper(model.unet, cond_names, model.family), args, str(traced), input_names=names,
                              output_names=["eps"], dynamic_axes=dyn, opset_version=config.opset,
                              do_constant_folding=True, dynamo=False)
        except Exception as e:
            raise ExportError(f"tracing {model.id} to ONNX failed: {e}") from e
        check_graph(onnxio.load(traced, weights=False), "export", traced)
        # the passes rename; they run on the graph, the weights stay on disk until written once
        proto = onnxio.load(traced, weights=False)
        proto = strip_wrapper_prefix(proto, WRAPPER_ATTR)
        proto = name_anonymous_weights(proto)
        onnxio.save(onnxio.load_data(proto, d), path, keep=False)
        del proto  # 3.4 GB for SD: the later stages read the weights from disk when they need them
    graph = onnxio.load(path, weights=False)
    check_graph(graph, "clean", path)
    return graph


def parity_error(model: LoadedModel, onnx_path: Path, config: ExportConfig) -> float:
    """Max |ONNX Runtime - PyTorch| over a seeded batch at timesteps spread over [0, T), one row per
    call: batch 1 differs from the traced batch (so it proves the dynamic axis) and keeps the
    activations of big UNets small (an SDXL-sized one's attention at batch 3 did not fit in 24 GB)."""
    import onnxruntime as ort
    import torch

    n = config.parity_batch + 1
    # a sequence length other than the traced one proves the free L axis
    feeds = example_inputs(model, n, config.seed + 1, config.sequence_length + 1)
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False  # give the activations back before PyTorch's run
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0] for i in range(n)])
    del sess
    want = []
    for i in range(n):
        row = {k: torch.from_numpy(v[i:i + 1]) for k, v in feeds.items()}
        kw = model.family.call_kwargs({k: v for k, v in row.items() if k not in ("sample", "timestep")})
        with torch.no_grad():
            want.append(model.unet(row["sample"], row["timestep"], return_dict=False, **kw)[0].numpy())
    want = np.concatenate(want)
    return float(np.max(np.abs(got - want)))


# Peak resident memory of an export over the model's fp32 weights: 8.7 GB for the SDXL half-width
# UNet's 2.91 GB (benchmarks/README.md, "SDXL"); the TorchScript trace holds the weights in PyTorch,
# in its traced graph and in the ONNX proto at once.
EXPORT_MEMORY_FACTOR = 3.0


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def warn_memory(model: LoadedModel) -> None:
    """Say before minutes of tracing when the export will likely not fit in this machine's memory
    (the loaded weights are resident already: the rest must be available)."""
    params = model.num_parameters()
    weights = 4 * params
    need, have = EXPORT_MEMORY_FACTOR * weights, available_memory()
    if have is not None and need - weights > have:
        warnings.warn(f"exporting {model.id} ({params / 1e9:.2f} B parameters) needs about "
                      f"{need / 2**30:.0f} GB of memory in all ({EXPORT_MEMORY_FACTOR}x its fp32 weights, as measured at "
                      f"SDXL's half width), {(need - weights) / 2**30:.0f} GB more than its loaded weights, and {have / 2**30:.0f} GB "
                      "are available: it will likely be killed for memory. Export on a machine with more memory and "
                      "copy the export folder (benchmarks/README.md, \"SDXL\")", UserWarning, stacklevel=2)


def export_model(model: LoadedModel, out: Path, config: ExportConfig = ExportConfig()) -> ExportResult:
    """Trace ``model`` to ONNX and write the export folder ``out`` atomically.

    Raises ExportError when ONNX Runtime and PyTorch differ by more than ``config.parity_tol``.
    """
    t0 = time.perf_counter()
    warn_memory(model)
    with atomic_dir(Path(out), BUNDLE) as tmp:
        proto = trace_to_onnx(model, tmp / ENGINE_FILE, config)
        err = parity_error(model, tmp / ENGINE_FILE, config)
        if not err <= config.parity_tol:
            raise ExportError(f"ONNX export of {model.id} differs from PyTorch by {err:.3g} "
                              f"(> parity_tol {config.parity_tol}); report this model config")
        module_names = {n for n, _ in model.unet.named_modules()}
        layer_map = build_layer_map(proto, model.id, model.sample_shape, module_names,
                                    extra_feeds=_dummy_conditions(model, config.sequence_length), base_dir=tmp)
        layer_map.save(tmp / LAYER_MAP_FILE)
        seconds = time.perf_counter() - t0
        T = int(model.scheduler_config.get("num_train_timesteps", 1000))
        body = {
            "format": "fp32",
            "model": model.describe(),
            "scheduler": model.scheduler_config,
            "groups": [{"index": 0, "t_start": 0, "t_end": T, "engine": ENGINE_FILE}],
            "export": {"config": config.to_dict(), "parity_max_abs_err": err, "seconds": round(seconds, 2),
                       "op_counts": layer_map.counts(), "total_macs_per_sample": layer_map.total_macs},
        }
        files = [*onnxio.files_of(tmp / ENGINE_FILE), LAYER_MAP_FILE]
        if model.text:
            fam = model.family
            body["text"], extra = export_text(model.text, tmp, config.opset, config.clip_skip, config.parity_tol,
                                              fam.text_layer, fam.pooled_input, model.force_zeros_for_empty_prompt)
            files += extra
            if model.default_prompts is not None:  # the pipeline's own calibration prompts travel with the export
                (tmp / PROMPTS_FILE).write_bytes(Path(model.default_prompts).read_bytes())
                body["calibration_prompts"] = PROMPTS_FILE
                files.append(PROMPTS_FILE)
        elif config.clip_skip is not None:
            raise ExportError(f"clip_skip applies to text-to-image pipelines; {model.id} has no text encoder")
        if model.condition_inputs:
            body["conditioning"], extra = _conditioning_entry(model, tmp, config, body.get("text"))
            files += extra
        if model.vae is not None:
            body["decoder"] = export_decoder(model, tmp / DECODER_FILE, config)
            files.append(DECODER_FILE)
        write_manifest(tmp, body, files)
        nbytes = sum((tmp / f).stat().st_size for f in onnxio.files_of(tmp / ENGINE_FILE))
    return ExportResult(Path(out), err, seconds, nbytes, layer_map)


def export_decoder(model: LoadedModel, path: Path, config: ExportConfig) -> dict:
    """Trace the VAE's decoder (input ``latents`` [B, C, h, w] in the UNet's latent space,
    divided by the scaling factor inside the graph; output ``image`` [B, 3, H, W] in [-1, 1])
    to ``path``, check parity, return the manifest's "decoder" entry."""
    import onnx
    import onnxruntime as ort
    import torch

    s = model.scaling_factor

    class Decoder(torch.nn.Module):
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents / s).sample

    rng = np.random.default_rng(config.seed + 2)
    z = rng.standard_normal((2, *model.sample_shape), dtype=np.float32)
    dec = Decoder(model.vae).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(dec, (torch.from_numpy(z),), str(path), input_names=["latents"], output_names=["image"],
                              dynamic_axes={"latents": {0: "batch"}, "image": {0: "batch"}},
                              opset_version=config.opset, do_constant_folding=True, dynamo=False)
        except Exception as e:
            raise ExportError(f"tracing the decoder of {model.id} to ONNX failed: {e}") from e
        check_graph(onnx.load(str(path)), "export decoder")
        z3 = rng.standard_normal((3, *model.sample_shape), dtype=np.float32)
        want = dec(torch.from_numpy(z3)).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"latents": z3})[0]
    err = float(np.max(np.abs(got - want)))
    # numpy.allclose's form (rtol = atol = parity_tol): pixels near +-1 carry fp32 rounding of their
    # size, and at 512 x 512 ORT's and PyTorch's convolutions differ by ~1e-4 there (SD 1.5's VAE)
    rel = float(np.max(np.abs(got - want) / (1.0 + np.abs(want))))
    if not rel <= config.parity_tol:
        raise ExportError(f"ONNX export of the decoder of {model.id} differs from PyTorch by {err:.3g} "
                          f"(relative to 1 + |value|: {rel:.3g} > parity_tol {config.parity_tol})")
    return {"file": path.name, "class": model.vae_config.get("_class_name"), "scaling_factor": s,
            "latent_shape": list(model.sample_shape), "image_shape": list(want.shape[1:]), "parity_max_abs_err": err,
            "precision": "fp32"}
