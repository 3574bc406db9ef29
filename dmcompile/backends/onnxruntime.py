"""ONNX Runtime backend: one fused integer engine for all timestep groups.

Each group's QDQ model is optimised offline by ONNX Runtime (level EXTENDED: the QDQ
fusions into QLinearConv / QGemm / MatMulIntegerToFloat / QLinearMatMul, which need
constant scales to fire). The fused graphs of all groups are then identical except for a
few hundred small tensors: activation scales, zero points and int32 biases. Those become
graph inputs, stored per group in ``group_XX.npz``; the runtime feeds the current group's
values with each call. Measured on digits16: bit-identical outputs to the per-group
models, no slowdown, one session (weights prepacked once) instead of one per group.
Fusing first is what makes this work: feeding scales as inputs to the unfused QDQ model
stops fusion (measured on ddpm-cifar10-32: 55 ms instead of 13-16 ms per call).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .. import onnxio
from ..memory import MemoryModel
from ..quant import FLOAT_BITS, encode
from ..targets import conv_params_choice
from .base import Backend, EngineJob, EngineSet, StoredWeights, write_group_inputs

ENGINE_FILE = "unet.onnx"
WEIGHTS_FILE = "weights.npz"
# ConstantSharing merges initializers that happen to hold equal values (two scales that are
# equal in one group), which makes the fused graphs of different groups differ.
DISABLED_OPTIMIZERS = ["ConstantSharing"]


def optimize_for_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX Runtime's EXTENDED optimisations (portable across CPUs, unlike the layout
    transforms of level ALL, which the session applies at load), initializers kept inline."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "opt.onnx"
        onnxio.save(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(dst)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
        # inline unless the graph is past protobuf's limit (then read back from opt.bin)
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                    str(1 << 40 if onnxio.fits(model) else 1024))
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS)
        return onnx.load(str(dst))


def _structure(model: onnx.ModelProto) -> list:
    return [(n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))
            for n in model.graph.node]


class GroupMerger:
    """One graph for the groups that share weights, taken one fused graph at a time: the
    first is kept whole, each later one only for the initializers whose values differ from
    the first's (so K groups of an SD-sized engine do not sit in memory together)."""

    def __init__(self):
        self.first: onnx.ModelProto | None = None
        self.diffs: list[dict[str, np.ndarray]] = []

    def add(self, model: onnx.ModelProto) -> None:
        if self.first is None:
            self.first, self._shape = model, _structure(model)
            self._inits = {i.name: i for i in model.graph.initializer}
            self.diffs.append({})
            return
        if _structure(model) != self._shape:
            raise AssertionError(f"fused graph of group {len(self.diffs)} differs in structure from group 0")
        assert [i.name for i in model.graph.initializer] == list(self._inits)
        diff = {}
        for i in model.graph.initializer:
            base = self._inits[i.name]
            if i.raw_data and i.data_type == base.data_type and i.raw_data == base.raw_data:
                continue  # same bytes: the common case, without converting big weights
            a = numpy_helper.to_array(i)
            if not np.array_equal(a, numpy_helper.to_array(base)):
                diff[i.name] = a
        self.diffs.append(diff)

    def result(self) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
        """The merged graph (varying initializers turned into graph inputs, in the first
        graph's order) and, per group, the values to feed."""
        varying = [n for n in self._inits if any(n in d for d in self.diffs)]
        # A QLinearConv whose input zero point is constant but whose int32 bias is fed would lose
        # that bias: ONNX Runtime's symmetric Conv folds a constant bias when it prepacks and
        # ignores a fed one. Such a zero point (equal in every group by chance) is fed too.
        fed = set(varying)
        varying += [n.input[2] for n in self.first.graph.node if n.op_type == "QLinearConv" and len(n.input) > 8
                    and n.input[8] in fed and n.input[2] in self._inits and n.input[2] not in fed]
        varying = list(dict.fromkeys(varying))
        base = {n: numpy_helper.to_array(self._inits[n]) for n in varying}
        merged = self.first
        g = merged.graph
        for name in varying:
            i = self._inits[name]
            g.input.append(onnx.helper.make_tensor_value_info(name, i.data_type, list(i.dims)))
        kept = [i for i in g.initializer if i.name not in set(varying)]
        del g.initializer[:]
        g.initializer.extend(kept)
        return merged, [{n: d.get(n, base[n]) for n in varying} for d in self.diffs]


def save_engine(folder: Path, engines: dict[str, onnx.ModelProto], params: list[dict[str, np.ndarray]]) -> list[str]:
    """Write the engine files (with external data past protobuf's limit) and one .npz of group
    inputs per group; returns the file names."""
    files = []
    for name, model in engines.items():
        files += onnxio.save(model, Path(folder) / name)
    return [*files, *write_group_inputs(folder, params)]


def externalize_weights(model: onnx.ModelProto, bits: dict[str, int], stored: dict, tag: str = "") -> dict[str, str]:
    """Move the quantized weights (``<weight>.q`` for each weight in ``bits``) out of the engine:
    the initializers keep name, type and shape but are marked external (dmruntime hands them to
    the session from weights.npz, 4-bit ones unpacked). ``stored`` collects key -> (int8 array,
    grid bits); a key names one weight at one width (plus ``tag``: weights rounded for one
    group only), so engines share it. Returns name -> key."""
    from onnx.external_data_helper import set_external_data

    mapping = {}
    wanted = {f"{w}.q": b for w, b in bits.items()}
    for init in model.graph.initializer:
        b = wanted.get(init.name)
        if b is None:
            continue
        arr = numpy_helper.to_array(init)
        key = f"{init.name}@{int(b)}{tag}"
        if key in stored:
            assert np.array_equal(stored[key][0], arr), f"{key} differs between engines"
        else:
            stored[key] = (arr, int(b))
        set_external_data(init, location=WEIGHTS_FILE, offset=0, length=arr.nbytes)
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        mapping[init.name] = key
    missing = sorted(set(wanted) - set(mapping))
    assert not missing, f"quantized weights not found in the fused engine: {missing[:3]}"
    return mapping


INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger"}
FLOAT_OPS = {"Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm", "FusedMatMul"}


def ort_fusion_report(model: Path | onnx.ModelProto, external: dict | None = None) -> dict:
    """Op counts after ONNX Runtime's graph optimisation: how many quantizable nodes run as
    integer kernels. ``external``: arrays of initializers stored outside the file.
    Returns {"integer": {op: n}, "float": {op: n}, "ratio": integer / all}."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, onnx.ModelProto):
            onnxio.save(model, Path(tmp) / "in.onnx")
            model_path = Path(tmp) / "in.onnx"
        else:
            model_path = model
        so = ort.SessionOptions()
        if external:
            values = [ort.OrtValue.ortvalue_from_numpy(v) for v in external.values()]
            so.add_external_initializers(list(external), values)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.bin")
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        ops = Counter(n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx"), load_external_data=False).graph.node)
    integer = {k: v for k, v in ops.items() if k in INTEGER_OPS}
    floats = {k: v for k, v in ops.items() if k in FLOAT_OPS}
    total = sum(integer.values()) + sum(floats.values())
    return {"integer": integer, "float": floats, "ratio": (sum(integer.values()) / total) if total else 1.0}


class OnnxRuntimeBackend(Backend):
    """ort-cpu: each group's QDQ graph fused offline; groups with the same weights share one engine
    and feed it their scales (group_XX.npz); mixed-precision weights stored outside it."""

    name = "onnxruntime"
    # The initializer and its pre-packed copy for the int8 kernels; weights from weights.npz measured
    # one int8 copy more than the same weights inside the engine (ddpm-cifar10-32: 273 vs 229 MB; not
    # profiled further), which resident_estimate adds as the expanded size.
    memory = MemoryModel(weight_copies=2.0, base_mb=68.0)
    fusion_note = "integer kernels after ONNX Runtime optimisation (per engine file; groups feed it their own scales)"

    def emit(self, folder: Path, job: EngineJob, progress=None) -> EngineSet:
        """Fuse each group's QDQ graph; groups with the same weights (equal keys: byte-identical
        weights) become one engine whose per-group constants are inputs; count the integer kernels
        of each engine; with ``job.store_weights`` take the quantized weights out into weights.npz."""
        K = job.groups
        sets: dict[tuple, tuple[GroupMerger, list[int]]] = {}
        # groups that share an engine: Conv zero points and biases constant (ONNX Runtime's fast Conv)
        shared = K > 1 and job.profile.constant_conv_params
        for g, key, model in job.lower([[g] for g in range(K)], job.ranges, constant_conv_params=shared):
            merger, members = sets.setdefault(key, (GroupMerger(), []))
            merger.add(optimize_for_cpu(model))
            members.append(g)
            del model
        engines, engine_of, params, first = {}, {}, {}, {}
        for i, (merger, members) in enumerate(sets.values()):
            merged, ps = merger.result()
            name = ENGINE_FILE if len(sets) == 1 else f"unet_{i}.onnx"
            engines[name], first[name] = merged, members[0]
            for g, p in zip(members, ps):
                engine_of[g], params[g] = name, p
        fusion = {name: ort_fusion_report(model) for name, model in engines.items()}
        stored = self._store_weights(engines, first, job) if job.store_weights else None
        files = save_engine(folder, engines, [params[g] for g in range(K)])
        if stored is not None:
            arrays = {key: encode(q, b)[0] for key, (q, b) in sorted(stored.tensors.items())}
            with open(Path(folder) / WEIGHTS_FILE, "wb") as f:
                np.savez(f, **arrays)
            files.append(WEIGHTS_FILE)
        return EngineSet(tuple(engines), tuple(engine_of[g] for g in range(K)), tuple(params[g] for g in range(K)),
                         first, fusion, files, stored)

    def engine_entry(self, engines: EngineSet, guided: bool, config) -> dict:
        # which Conv path a shared engine runs, and why (the build CPU decides by default)
        if len(engines.engines) == len(engines.engine_of):
            return {}
        constant, why = conv_params_choice(config.constant_conv_params)
        return {"conv_params": {"mode": "constant" if constant else "per-group", "why": why}}

    @staticmethod
    def _store_weights(engines: dict, first: dict, job: EngineJob) -> StoredWeights:
        """Take the quantized weights out of the engines (marked external, no bytes) into one
        store that the runtime expands (4-bit ones unpacked) and hands every engine; the float
        weights of layers a group keeps float stay in its engine."""
        tensors: dict = {}
        external = {}
        for name, model in engines.items():
            g = first[name]
            widths = {l.weight: b for l, b in zip(job.weight_layers, job.bits[g]) if b != FLOAT_BITS}
            # per-group rounding: one engine per group, its own weights
            external[name] = externalize_weights(model, widths, tensors, f"/g{g}" if job.per_group_rounding else "")
        return StoredWeights(tensors, external)

    def fusion(self, bundle, engine: str) -> dict:
        return ort_fusion_report(bundle.root / engine, bundle.engine(engine).external)
