"""The tensorrt target, checked on the CPU: the per-group engine ONNX keeps TensorRT's explicit-
quantization rules, is strongly typed FP16 outside its quantized ops, carries INT4 weight-only
blocks for 4-bit MatMul/Gemm (4-bit Conv stored INT8), and ONNX Runtime running those same graphs
matches the simulated quantized model. TensorRT itself never runs here."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from conftest import ROOT, build_for
from dmcompile import inspect as dm_inspect
from dmcompile.backends.tensorrt import TensorRTBackend
from dmcompile.backends.tensorrt_rules import check_explicit_quantization, differ_only_in_scales
from dmcompile.config import BuildConfig, CalibrationConfig, MixedRecipe, Override, W8A8Recipe
from dmcompile.lowering.fp16 import to_float16, to_float32
from dmcompile.lowering.qdq import to_opset
from dmruntime import Bundle, DDIMSampler


def build(model, out, **kw):
    return build_for("tensorrt", model, out, **kw)


@pytest.fixture(scope="module")
def w8(trt_bundle):
    return trt_bundle


@pytest.fixture(scope="module")
def w4(tiny_model_dir, tmp_path_factory):
    recipe = MixedRecipe(overrides=(Override("*", 4),))
    return build(tiny_model_dir, tmp_path_factory.mktemp("trt") / "w4", recipe=recipe).path


def engines(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    return m, [bundle / name for name in m["engine"]["tensorrt"]["onnx"]]


def load(path):
    return onnx.load(str(path))  # with weights.bin


def types(model):
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}


@pytest.mark.parametrize("which", ["w8", "w4"])
def test_engine_graphs_keep_tensorrt_rules(which, request):
    bundle = request.getfixturevalue(which)
    m, files = engines(bundle)
    assert m["engine"]["runtime"] == "tensorrt" and len(files) == 4  # one engine per group
    for path in files:
        onnx.checker.check_model(str(path))  # the file, its external data in weights.bin
        model = load(path)
        assert check_explicit_quantization(model) == []
        g = model.graph
        inits = {i.name: i for i in g.initializer}
        qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
        assert qdq
        for n in qdq:  # symmetric: every zero point absent or 0
            assert len(n.input) < 3 or not numpy_helper.to_array(inits[n.input[2]]).any()
        # activations per tensor, weights per channel on TensorRT's axis (or INT4 blocks)
        for n in qdq:
            scale = numpy_helper.to_array(inits[n.input[1]])
            if n.input[0] in inits:
                assert scale.size > 1
            else:
                assert scale.size == 1
        # biases float: nothing dequantized feeds input 2 of a Conv/Gemm
        producer = {o: n for n in g.node for o in n.output}
        for n in g.node:
            if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2]:
                assert n.input[2] in inits and inits[n.input[2]].data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        # attention float: the activation x activation MatMuls read no DequantizeLinear
        act_matmuls = [n for n in g.node if n.op_type == "MatMul" and not any(
            i in inits or (i in producer and producer[i].op_type == "DequantizeLinear"
                           and producer[i].input[0] in inits) for i in n.input)]
        assert act_matmuls
        for n in act_matmuls:
            assert all(producer[i].op_type != "DequantizeLinear" for i in n.input if i in producer)


def test_group_models_differ_only_in_scales(w8):
    _, files = engines(w8)
    models = [load(p) for p in files]
    for other in models[1:]:
        assert differ_only_in_scales(models[0], other) == []
    scales = [{i.name: numpy_helper.to_array(i) for i in m.graph.initializer if i.name.endswith("q_scale")}
              for m in models]
    assert any(not np.array_equal(scales[0][k], scales[-1][k]) for k in scales[0])  # per-group calibration
    # one copy of the weights on disk for the four engines: each engine points at the same bytes
    def external(path):
        m = onnx.load(str(path), load_external_data=False)
        return {i.name: tuple((e.key, e.value) for e in i.external_data) for i in m.graph.initializer
                if i.data_location == TensorProto.EXTERNAL}

    first = external(files[0])
    assert len(first) > 10 and all(external(p) == first for p in files[1:])


def test_strongly_typed_fp16_with_fp32_time_embedding(w8):
    _, files = engines(w8)
    model = load(files[0])
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21
    t = types(model)
    g = model.graph
    assert [t[i.name] for i in g.input] == [TensorProto.FLOAT, TensorProto.INT64]
    assert [t[o.name] for o in g.output] == [TensorProto.FLOAT]
    by_op = {}
    for n in g.node:
        by_op.setdefault(n.op_type, set()).add(t.get(n.output[0]))
    assert by_op["Conv"] == {TensorProto.FLOAT16} and by_op["Softmax"] == {TensorProto.FLOAT16}
    # the sinusoidal timestep embedding stays FP32 (t up to 1000: FP16's spacing there is 0.5)
    assert by_op["Sin"] == {TensorProto.FLOAT} and by_op["Cos"] == {TensorProto.FLOAT}
    # activation scales of FP16 tensors are FP16 (DequantizeLinear's output type is its scale's)
    q_scales = {n.input[1] for n in g.node if n.op_type == "QuantizeLinear"}
    inits = {i.name: i for i in g.initializer}
    assert {inits[s].data_type for s in q_scales} == {TensorProto.FLOAT16}


def test_default_float_layers_and_overrides(w8, tiny_model_dir, tmp_path):
    m = json.loads((w8 / "manifest.json").read_text())
    act = {l["module"]: l["activation"] for l in m["precision"]["layers"]}
    # demoDiffusion's recipe: these stay float on tensorrt
    for module in ("conv_in", "conv_out", "time_embedding.linear_1", "down_blocks.1.resnets.0.conv_shortcut"):
        assert act[module] == "float", module
    assert act["down_blocks.0.resnets.0.conv1"] == "int8"
    # an override naming the module quantizes it; an op-type rule does not reach the defaults
    b = build(tiny_model_dir, tmp_path / "o", recipe=W8A8Recipe(overrides=(Override("conv_in", 8),
                                                                           Override("Gemm", "float"))))
    act = {l["module"]: l["activation"] for l in b.manifest["precision"]["layers"]}
    assert act["conv_in"] == "int8" and act["conv_out"] == "float"
    model = load(b.path / "unet_e00.onnx")
    assert check_explicit_quantization(model) == []
    conv_in = next(n for n in model.graph.node if n.name == "/conv_in/Conv")
    assert conv_in.input[1].endswith(".dq")


def test_int4_weight_only_matmul_gemm_and_int8_conv(w4, tmp_path):
    m, files = engines(w4)
    model = load(files[0])
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    int4 = int8 = 0
    for n in g.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or n.input[1] not in producer:
            continue
        dq = producer[n.input[1]]
        if dq.op_type != "DequantizeLinear":
            continue
        w = inits[dq.input[0]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        if n.op_type == "Conv":  # 4-bit values on the int8 grid, run INT8
            q = numpy_helper.to_array(w)
            assert w.data_type == TensorProto.INT8 and np.abs(q).max() <= 7
            int8 += 1
        else:  # INT4 blocks along the input dimension, the input itself float (weight-only)
            assert w.data_type == TensorProto.INT4 and attrs["block_size"] in (16, 32, 64, 128)
            assert producer.get(n.input[0]) is None or producer[n.input[0]].op_type != "DequantizeLinear"
            int4 += 1
    assert int4 and int8
    fusion = m["build"]["fusion"]["engines"]["unet_e00.onnx"]
    assert sum(fusion["int4_weight_only"].values()) == int4
    # the plan and inspect say that 4-bit Convs are stored INT8 here
    stored = m["plan"]["stored_int8"]
    assert stored["layers"] and all("Conv" in n for n in stored["layers"])
    layers = {l["node"]: l for l in m["precision"]["layers"] if l.get("weight_bits")}
    conv = layers[stored["layers"][0]]
    assert conv["weight_bits"][0] == 4 and conv["storage_bits"][0] == 8
    # BOPs count grid bits, as on every target (ort-cpu also runs 4-bit weights on int8 kernels);
    # a weight-only layer's activations count as float
    assert conv["bops"][0] == conv["macs"] * 4 * 8
    assert mm_bops_float_activation(layers)
    mm = next(l for l in layers.values() if l.get("weight_only_groups"))
    assert mm["op_type"] in ("MatMul", "Gemm") and mm["storage_bits"][0] == 4
    report = dm_inspect.bundle_report(Bundle.open(w4, device="cpu"))
    rows = {r["node"]: r for r in report["accounting"]["layers"]}
    first_gemm = next(l for l in m["precision"]["layers"] if l["op_type"] == "Gemm")  # time MLP: float
    assert first_gemm["activation"] == "float" and rows[first_gemm["node"]]["weight_bytes_on_disk"] == \
        2 * first_gemm["params"]  # FP16 weights in the engine
    text = dm_inspect.format_report(report)
    assert "stored 8" in text and "INT4 weight-only" in text


def mm_bops_float_activation(layers) -> bool:
    wo = [l for l in layers.values() if l.get("weight_only_groups")]
    return bool(wo) and all(l["bops"][0] == l["macs"] * 4 * 32 for l in wo)


def test_onnx_runtime_runs_the_engine_graphs_close_to_the_simulated_model(w8, tmp_path):
    """ONNX Runtime (CPU) over the FP16 engine graphs vs the same graphs in FP32 arithmetic (the
    simulated quantized model) vs the fp32 export, one UNet call at timesteps across the groups.
    Each QuantizeLinear of an FP16 engine reads an FP16 tensor: FP16's rounding flips some int8
    codes by one step (measured: rounding the simulated model's Q inputs to FP16 alone gives 90% of
    the difference), so the engines sit about as far from the simulated model as it sits from
    fp32 (measured here, per call: 0.76x, and engines vs fp32 1.0x simulated vs fp32, before the
    residual stream was quantized too); errors of that kind add in quadrature. A typing bug (an FP16
    timestep, a scale left FP32) shows as an error many times the quantization's."""
    bundle = Bundle.open(w8, device="cpu")
    assert bundle.device == "cpu"
    sim = TensorRTBackend().reference(bundle, tmp_path)
    fp = Bundle.open(_fp_export(w8))
    x = np.random.default_rng(0).standard_normal((8, *bundle.sample_shape)).astype(np.float32)

    def rel(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))

    eng_fp, sim_fp, eng_sim = [], [], []
    for t in (999, 700, 400, 100, 10):
        e, s, f = bundle.predict(x, t), sim.predict(x, t), fp.predict(x, t)
        eng_fp.append(rel(e, f))
        sim_fp.append(rel(s, f))
        eng_sim.append(rel(e, s))
    # the quantization itself (with the residual stream int8: measured 0.12 here, 0.044 without)
    assert 0 < np.mean(sim_fp) < 0.25
    assert np.mean(eng_sim) <= 1.2 * np.mean(sim_fp)
    assert np.mean(eng_fp) <= 1.6 * np.mean(sim_fp)  # quadrature: sqrt(1 + 1.2^2) = 1.56
    # the build's fidelity check sampled the engines the same way (a random tiny model: 50 chaotic
    # steps, so no threshold on its PSNR here; digits16 / digits-ldm figures in the README)
    fidelity = json.loads((w8 / "manifest.json").read_text())["fidelity"]
    assert fidelity["samples"] == 4 and np.isfinite(fidelity["psnr_db_mean"])


def _fp_export(bundle):
    from dmcompile import stages

    return stages.fp_bundle(stages.reference_model(Bundle.open(bundle, device="cpu")))


def test_fp16_pass_round_trips_and_runs(tiny_export):
    import onnxruntime as ort

    fp = to_opset(onnx.load(str(tiny_export / "model.onnx")), 21)
    half = to_float16(fp)
    back = to_float32(half)
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 2, 8, 8)).astype(np.float32), "timestep": np.array([999, 3])}

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]

    a, h, b = run(fp), run(half), run(back)
    assert h.dtype == np.float32  # FP32 at the boundary
    rel = float(np.sqrt(np.mean((h - a) ** 2) / np.mean(a**2)))
    assert 0 < rel < 5e-3  # FP16 arithmetic: close, not equal
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-4)  # back in FP32, weights rounded to FP16 once


def test_max_engines_and_build_script(tiny_model_dir, tmp_path):
    b = build(tiny_model_dir, tmp_path / "b", max_engines=2)
    m = b.manifest
    assert len({g["engine"] for g in m["groups"]}) == 2 == len(m["engine"]["tensorrt"]["onnx"])
    entry = m["engine"]["tensorrt"]
    assert entry["batch_sizes"] == [1, 2, 4, 8] and entry["guidance_batch"] is None
    assert entry["built_here"] is False  # no TensorRT in this environment
    script = (b.path / "build_engines.sh").read_text()
    assert "python -m dmruntime.tensorrt.build" in script and "build_engines.sh" in m["files"]


def _module(path: Path):
    """A module loaded from a file outside the test path (a benchmark script, the runtime's tests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_its_variants_interleaved_and_says_what_it_needs(w8):
    import subprocess
    import sys

    bench_tensorrt = _module(ROOT / "benchmarks" / "bench_tensorrt.py")
    order = []
    med = bench_tensorrt.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 4, warmup=1)
    assert set(med) == {"a", "b"} and order == ["a", "b"] * 5  # one of each per round
    from dmcompile.backends.tensorrt import tensorrt_available

    if tensorrt_available() is None:  # no TensorRT (CI, this project's machines): a clear error, exit 2
        r = subprocess.run([sys.executable, bench_tensorrt.__file__, str(w8)], capture_output=True, text=True)
        assert r.returncode == 2 and "TensorRT is not installed" in r.stderr, r.stderr


def test_weight_only_layer_beside_int8_readers_of_the_same_tensor(tiny_model_dir, tiny_export, tmp_path):
    """to_q at 4 bits (INT4 weight-only) and to_k / to_v at 8 bits read one tensor: to_q reads it
    float, the others through their own Q/DQ (a budget allocation mixes widths like this)."""
    layers = json.loads((tiny_export / "layer_map.json").read_text())["layers"]
    to_q = next(l for l in layers if l["module"].endswith("to_q"))
    recipe = MixedRecipe(overrides=(Override("*", 8), Override(to_q["module"], 4)))
    b = build(tiny_model_dir, tmp_path / "b", recipe=recipe)
    model = load(b.path / "unet_e00.onnx")
    assert check_explicit_quantization(model) == []
    nodes = {n.name: n for n in model.graph.node}
    producer = {o: n for n in model.graph.node for o in n.output}
    q = nodes[to_q["node"]]
    k = nodes[to_q["node"].replace("to_q", "to_k")]
    assert q.input[0] not in producer or producer[q.input[0]].op_type != "DequantizeLinear"
    assert producer[k.input[0]].op_type == "DequantizeLinear"
    assert producer[producer[k.input[0]].input[0]].input[0] == q.input[0]  # the same tensor, quantized for to_k


def test_build_is_deterministic(tiny_model_dir, w4, tmp_path):
    recipe = MixedRecipe(overrides=(Override("*", 4),))
    again = build(tiny_model_dir, tmp_path / "again", recipe=recipe).path
    m = json.loads((w4 / "manifest.json").read_text())
    for name in m["files"]:  # engine graphs (FP16 typing, opset conversion), INT4 blocks, weights.bin
        assert (again / name).read_bytes() == (w4 / name).read_bytes(), name


def test_bytes_budget_prices_a_4bit_conv_at_int8(tiny_export):
    from dmcompile import stages
    from dmcompile.analysis.plan import weight_bytes
    from dmcompile.targets import TENSORRT

    layers = [l for l in stages.load_layer_map(tiny_export).layers if l.weight]
    conv = next(l for l in layers if l.op_type == "Conv")
    mm = next(l for l in layers if l.op_type == "MatMul")
    assert weight_bytes(conv, 4, TENSORRT.storage_bits) == weight_bytes(conv, 8, TENSORRT.storage_bits)
    assert weight_bytes(mm, 4, TENSORRT.storage_bits) < weight_bytes(mm, 8, TENSORRT.storage_bits)


def test_build_builds_the_engines_where_tensorrt_imports(tiny_model_dir, tmp_path, monkeypatch):
    """With TensorRT importable the build hands the finished bundle to dmruntime's engine build
    (here a stand-in for TensorRT's builder: this environment has none)."""
    from dmcompile.backends import tensorrt as backend
    from dmruntime.tensorrt import build as trt_build

    calls = []

    class Builder:
        device = {"name": "Stand-in", "compute_capability": "9.0"}
        tensorrt_version = "10.9.0"

        def __init__(self, workspace_bytes=None):
            pass

        def build(self, onnx_path, profiles, cache):
            calls.append((Path(onnx_path).name, [p["sample"] for p in profiles]))
            onnx.checker.check_model(str(onnx_path))  # the file TensorRT would parse, weights beside it
            return b"plan of " + Path(onnx_path).name.encode(), cache

    monkeypatch.setattr(backend, "tensorrt_available", lambda: "10.9.0")
    monkeypatch.setattr(trt_build, "TrtBuilder", Builder)
    b = build(tiny_model_dir, tmp_path / "b", max_engines=2)
    assert b.manifest["engine"]["tensorrt"]["built_here"] is True
    assert [c[0] for c in calls] == b.manifest["engine"]["tensorrt"]["onnx"]
    assert calls[0][1] == [(n, 2, 8, 8) for n in (1, 2, 4, 8)]
    record = json.loads((b.path / "tensorrt" / "engines.json").read_text())
    assert record["manifest_sha256"] == hashlib.sha256((b.path / "manifest.json").read_bytes()).hexdigest()
    assert (b.path / "tensorrt" / "unet_e01.plan").read_bytes() == b"plan of unet_e01.onnx"


def test_fp32_fallback_where_onnx_runtime_has_no_fp16_kernel(w8, tmp_path, monkeypatch):
    """ONNX Runtime lacks some FP16 CPU kernels: then the engine graph runs widened to FP32 (the
    simulated quantized model), with a warning. Simulated here by refusing the FP16 file."""
    import onnxruntime as ort

    real = ort.InferenceSession

    def session(path, *a, **kw):
        if str(path) == str(w8 / "unet_e00.onnx"):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                               "SomeOp(21) node with name 'x' (FP16)")
        return real(path, *a, **kw)

    monkeypatch.setattr(ort, "InferenceSession", session)
    bundle = Bundle.open(w8, device="cpu")
    x = np.random.default_rng(0).standard_normal((2, *bundle.sample_shape)).astype(np.float32)
    with pytest.warns(UserWarning, match="running the same graph in FP32"):
        got = bundle.predict(x, 10)  # group 0: unet_e00.onnx
    engine = bundle.engine("unet_e00.onnx")
    assert engine.widened
    monkeypatch.setattr(ort, "InferenceSession", real)
    want = TensorRTBackend().reference(Bundle.open(w8, device="cpu"), tmp_path).predict(x, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    bundle.predict(x, 999)  # group 3: its FP16 graph loads, so it runs in FP16
    assert bundle.engine("unet_e03.onnx")._session is not None and not bundle.engine("unet_e03.onnx").widened


def test_int4_blocks_run_along_the_input_dimension_or_not_at_all():
    from dmcompile.lowering.qdq import int4_blocks

    assert int4_blocks("MatMul", False, [256, 64]) == (0, 128)  # [in, out]
    assert int4_blocks("Gemm", True, [64, 48]) == (1, 16)  # transB: [out, in]
    assert int4_blocks("Gemm", False, [48, 64]) == (0, 16)
    assert int4_blocks("MatMul", False, [24, 64]) is None  # 24 in: no block size divides it -> int8


def test_a_gemm_whose_input_dim_has_no_block_is_stored_int8(tiny_export):
    from dmcompile import stages
    from dmcompile.compiler.steps import storage_width, weight_only
    from dmcompile.frontend.layermap import Layer
    from dmcompile.targets import TENSORRT

    gemm = next(l for l in stages.load_layer_map(tiny_export).layers if l.op_type == "Gemm")
    assert not gemm.weight_transposed  # torch Linear: [out, in] with transB
    odd = Layer(**{**gemm.__dict__, "weight_shape": [64, 24]})  # 24 inputs
    even = Layer(**{**gemm.__dict__, "weight_shape": [24, 64]})  # 64 inputs, 24 outputs
    assert not weight_only(TENSORRT, odd, 4) and storage_width(TENSORRT, odd, 4) == 8
    assert weight_only(TENSORRT, even, 4) and storage_width(TENSORRT, even, 4) == 4


@pytest.mark.parametrize("which", ["cross-attention", "class", "latent"])
def test_conditional_and_latent_models(which, tiny_cond_dir, tiny_class_dir, tiny_latent_dir, tmp_path):
    """Other conditionings on tensorrt: text embeddings (a float input: FP16 after its Cast, the
    cross-attention K/V int8), class labels (an integer input: their embedding FP32 with the time
    MLP) and a latent pipeline (the decoder stays ONNX Runtime's); guided sampling, batch 2."""
    rng = np.random.default_rng(0)
    if which == "cross-attention":
        d = 12  # TINY_COND_UNET's cross_attention_dim
        np.savez(tmp_path / "c.npz", encoder_hidden_states=rng.standard_normal((4, 3, d)).astype(np.float32),
                 null_encoder_hidden_states=np.zeros((3, d), np.float32))
        cal = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4, guidance_scale=3.0,
                                conditions=str(tmp_path / "c.npz"))
        b = build(tiny_cond_dir, tmp_path / "b", calibration=cal, eval_samples=2)
        cond = {"encoder_hidden_states": rng.standard_normal((2, 3, d)).astype(np.float32)}
    elif which == "class":
        cal = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4, guidance_scale=2.0)
        b = build(tiny_class_dir, tmp_path / "b", calibration=cal, eval_samples=2, null_class=4)
        cond = {"class_labels": np.array([1, 2])}
    else:
        cal = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)
        b = build(tiny_latent_dir, tmp_path / "b", calibration=cal, eval_samples=2)
        cond = None
    m = b.manifest
    for name in m["engine"]["tensorrt"]["onnx"]:
        model = load(b.path / name)
        assert check_explicit_quantization(model) == []
        t = types(model)
        assert all(t[i.name] in (TensorProto.FLOAT, TensorProto.INT64) for i in model.graph.input)
    entry = m["engine"]["tensorrt"]
    if which != "latent":
        assert entry["guidance_batch"] == 2 and entry["batch_sizes"] == [1, 2, 4, 8, 16]
    bundle = Bundle.open(b.path, device="cpu")
    guidance = 2.0 if cond else None
    if which == "latent":  # its UNet reads text embeddings too, unguided here
        seq = bundle.conditioning.sequence_length or 3
        cond = {"encoder_hidden_states": rng.standard_normal((2, seq, 12)).astype(np.float32)}
    x = DDIMSampler(bundle, steps=4, guidance_scale=guidance).sample(2, seed=0, cond=cond)
    assert np.isfinite(x).all()
    if which == "latent":
        assert bundle.decode(x).shape[1] == 3
    if which == "cross-attention":  # the text embedding enters FP16 code through one Cast
        casts = [n for n in load(b.path / entry["onnx"][0]).graph.node
                 if n.op_type == "Cast" and n.input[0] == "encoder_hidden_states"]
        assert len(casts) == 1


def test_residual_adds_take_their_skip_through_qdq(w8, tiny_model_dir, tmp_path):
    """After an int8 Conv, a residual Add reads the Conv's output as it is and its skip input through
    Q/DQ (TensorRT fuses the Add into the Conv); the time embedding added after conv1 is no skip.
    --no-residual-int8 keeps the skips FP16, and the model closer to fp32."""
    def residuals(path):
        g = load(path).graph
        producer = {o: n for n in g.node for o in n.output}
        out = []
        for n in g.node:
            kinds = [producer[i].op_type if i in producer else "input" for i in n.input]
            if n.op_type == "Add" and "Conv" in kinds:
                out.append(kinds)
        return out

    on = residuals(w8 / "unet_e00.onnx")
    assert ["DequantizeLinear", "Conv"] in on or ["Conv", "DequantizeLinear"] in on
    # the others add the FP32 time embedding (through its Cast to FP16) after conv1
    assert all("DequantizeLinear" in k or "Cast" in k for k in on) and any("Cast" in k for k in on)
    b = build(tiny_model_dir, tmp_path / "b", residual_int8=False)
    off = residuals(b.path / "unet_e00.onnx")
    assert off and all("DequantizeLinear" not in k for k in off)
    off_model = load(b.path / "unet_e00.onnx")
    assert check_explicit_quantization(off_model, residual_skip=False) == []
    assert any("needs Q/DQ on its skip input" in p for p in check_explicit_quantization(off_model))
    assert any("residual stream was to stay FP16" in p
               for p in check_explicit_quantization(load(w8 / "unet_e00.onnx"), residual_skip=False))

    x = np.random.default_rng(0).standard_normal((8, 2, 8, 8)).astype(np.float32)
    fp = Bundle.open(_fp_export(w8))
    err = {}
    for name, path in (("on", w8), ("off", b.path)):
        with tempfile.TemporaryDirectory() as tmp:
            sim = TensorRTBackend().reference(Bundle.open(path, device="cpu"), tmp)
            err[name] = np.mean([np.linalg.norm(sim.predict(x, t) - fp.predict(x, t)) / np.linalg.norm(fp.predict(x, t))
                                 for t in (999, 500, 10)])
    assert err["off"] < err["on"]


def test_residual_int8_applies_to_tensorrt_only():
    from dmcompile.errors import ConfigError

    with pytest.raises(ConfigError, match="applies to --target tensorrt"):
        BuildConfig(profile="ort-cpu", residual_int8=False)


def test_a_graph_the_converter_cannot_take_is_a_clear_error(monkeypatch):
    from onnx import version_converter

    from dmcompile.errors import ExportError

    def refuse(model, version):
        raise RuntimeError("No Adapter For SomeOp")

    monkeypatch.setattr(version_converter, "convert_version", refuse)
    m = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match="needs this model's graph at opset 21.*No Adapter"):
        to_opset(m, 21)
    assert to_opset(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []),
                                           opset_imports=[onnx.helper.make_opsetid("", 21)]), 21) is not None


def test_gpu_benchmark_end_to_end_on_a_fake_gpu(w8, tmp_path, monkeypatch, capsys):
    """bench_tensorrt.py has never run on a GPU; here it runs whole on the runtime tests' numpy fake
    of the GPU interface (and a stand-in builder): every step but TensorRT's own work."""
    fakes = _module(ROOT / "runtimes" / "python" / "tests" / "test_tensorrt_runtime.py")
    bench_tensorrt = _module(ROOT / "benchmarks" / "bench_tensorrt.py")
    from dmruntime.tensorrt import build as trt_build

    class Builder(fakes.FakeBuilder):
        def build(self, onnx_path, profiles, cache):
            stem = Path(onnx_path).stem
            index = 99 if stem == "fp16" else int(stem[-2:])  # 99: the FP16 baseline engine
            return f"plan:{index}:{len(profiles)}".encode(), cache

    class Gpu(fakes.FakeGpu):
        def memory_info(self):
            return sum(len(m) for m in self.mem.values()), 80 << 30

    bundle = tmp_path / "b"
    import shutil

    shutil.copytree(w8, bundle)
    trt_build.build_engines(bundle, [1, 2, 4], builder=Builder())
    gpu = Gpu()
    monkeypatch.setattr(bench_tensorrt, "make_gpu", lambda: gpu)
    monkeypatch.setattr(bench_tensorrt, "make_builder", Builder)
    out = tmp_path / "r.json"
    assert bench_tensorrt.main([str(bundle), "--batch", "1", "3", "--repeats", "2", "--steps", "3",
                                "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "INT8/FP16" in text and "batch 3: per call" in text and "GPU memory" in text
    r = json.loads(out.read_text())
    assert set(r["calls"]["3"]) == {"int8 graph", "int8 direct", "fp16 graph", "fp16 direct"}
    assert set(r["runs"]["1"]) == {"int8", "fp16"}
    m = json.loads((bundle / "manifest.json").read_text())
    macs = sum(l["macs"] for l in m["precision"]["layers"])
    int8 = sum(l["macs"] for l in m["precision"]["layers"] if l["activation_bits"])
    assert r["bops"] == {"fp16": macs * 256, "int8": (macs - int8) * 256 + int8 * 64}  # W8A8 here
    engines_run = {e for e, *_ in gpu.runs}
    assert 99 in engines_run and {0, 1, 2} <= engines_run  # the FP16 engine; groups of a 3-step run
    assert {b for _, b, *_ in gpu.runs} <= {1, 2, 4}
