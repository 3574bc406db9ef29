"""dmcompile build: per-group int8 bundles, 100% integer kernels, shared weights, atomic output."""

import json
import shutil

import numpy as np
import onnx
import pytest
from dmruntime import Bundle

from dmcompile import api
from dmcompile.backends.onnxruntime import ort_fusion_report
from dmcompile.cli import main
from dmcompile.config import AnalysisConfig, BuildConfig, CalibrationConfig, W8A8Recipe, parse_overrides
from dmcompile.errors import ConfigError

SMALL = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)


@pytest.fixture(scope="module")
def tiny_bundle(tiny_model_dir, tmp_path_factory):
    # constant Conv parameters asked for: "auto" would pick per-group on an AMX build machine
    return api.build(str(tiny_model_dir), tmp_path_factory.mktemp("b") / "tiny-w8a8",
                     BuildConfig(calibration=SMALL, eval_samples=4, constant_conv_params=True)).path


def test_bundle_layout_and_manifest(tiny_bundle):
    assert sorted(p.name for p in tiny_bundle.iterdir()) == [
        "group_00.npz", "group_01.npz", "group_02.npz", "manifest.json", "unet.onnx"]
    m = json.loads((tiny_bundle / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["format"] == "w8a8" and m["profile"] == "ort-cpu"
    assert [(g["t_start"], g["t_end"]) for g in m["groups"]] == [(0, 333), (333, 667), (667, 1000)]
    assert {g["engine"] for g in m["groups"]} == {"unet.onnx"}
    assert m["calibration"]["groups"] == 3 and m["calibration"]["size"] == 4
    layers = m["precision"]["layers"]
    assert layers and all(l["activation"] == "uint8" for l in layers)
    assert all(l["weight_bits"] == [8, 8, 8] for l in layers if l["params"])
    # the fidelity check is what sampling the bundle and the fp32 export with the same seeds gives,
    # with the sampler the bundle was calibrated on (and samples with by default)
    from dmcompile.eval.metrics import psnr, ssim

    assert m["sampler"] == {"name": "ddim", "steps": SMALL.steps, "karras": False}
    cfg = api.SampleConfig(n=4, seed=0).resolved(Bundle.open(tiny_bundle))
    assert (cfg.sampler, cfg.steps) == ("ddim", SMALL.steps)
    assert (m["fidelity"]["sampler"], m["fidelity"]["steps"]) == ("ddim", SMALL.steps)
    got = api.sample_model(Bundle.open(tiny_bundle), cfg)
    want = api.sample_model(Bundle.open(api.fp_bundle(m["model"]["source"])), cfg)
    assert m["fidelity"]["samples"] == 4
    assert m["fidelity"]["ssim_mean"] == pytest.approx(float(np.mean(ssim(got, want))), rel=1e-6)
    assert m["fidelity"]["psnr_db_mean"] == pytest.approx(float(np.mean(np.minimum(psnr(got, want), 200))), rel=1e-6)
    assert set(m["files"]) == {"unet.onnx", "group_00.npz", "group_01.npz", "group_02.npz"}
    assert m["engine"]["conv_params"] == {"mode": "constant", "why": "--conv-params constant"}


def test_engine_runs_integer_kernels(tiny_bundle):
    rep = ort_fusion_report(tiny_bundle / "unet.onnx")
    assert rep["float"] == {} and rep["ratio"] == 1.0
    assert rep["integer"]["QLinearConv"] > 0 and rep["integer"].get("QGemm", 0) > 0


def test_groups_feed_own_parameters_to_one_engine(tiny_bundle):
    model = onnx.load(str(tiny_bundle / "unet.onnx"))
    extra = {i.name for i in model.graph.input} - {"sample", "timestep"}
    params = [dict(np.load(tiny_bundle / f"group_{g:02d}.npz")) for g in range(3)]
    assert all(set(p) == extra for p in params)
    # Every integer Conv sees a constant input zero point and no fed bias (ONNX Runtime's fast
    # symmetric Conv); its bias is added in float, folded into the Add that follows where one does.
    inits = {i.name for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "QLinearConv"]
    assert convs and all(n.input[2] in inits and (len(n.input) < 9 or n.input[8] in inits) for n in convs)
    assert any(n.op_type == "Sum" for n in model.graph.node)
    # Only activation scales, zero points and int32 biases differ per group: small tensors.
    assert all(v.dtype in (np.float32, np.uint8, np.int32) and v.size <= 64 for v in params[0].values())
    assert any(not np.array_equal(params[0][k], params[2][k]) for k in extra)  # per-group calibration
    # The int8 weights live once, in the engine.
    assert sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8) > 0


def test_one_engine_matches_each_groups_own_qdq_model(tiny_model_dir, tiny_bundle):
    """The merged engine fed group g's inputs equals group g's own QDQ model, bit for bit
    (weights GPTQ-rounded, the default, on the calibration's pooled moments; the Conv inputs'
    zero points shared by the groups, the Conv biases added in float), and stays within the
    quantization's own error of the QDQ model with group g's own zero points and int32 biases."""
    import onnxruntime as ort

    from dmcompile import stages
    from dmcompile.frontend.layermap import LayerMap
    from dmcompile.lowering.groups import conv_input_pins
    from dmcompile.lowering.qdq import lower_group
    from dmcompile.targets import ORT_CPU

    fp = api.fp_bundle(str(tiny_model_dir))
    lm = LayerMap.load(fp / "layer_map.json")
    proto = onnx.load(str(fp / "model.onnx"))
    calib = stages.cached_calibration(fp, SMALL, moments="pooled")
    ranges = calib.ranges()
    nodes = {l.node for l in lm.layers}
    rounder = stages.rounder(calib, "gptq", ORT_CPU.weight_grid_bits)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    weights = {l.weight: rounder.quantize(l, inits[l.weight], 8) for l in lm.layers if l.weight}
    pins = conv_input_pins(proto, nodes, ranges)
    assert pins and len(set(pins.values())) > 1  # one zero point per Conv input, shared by the groups
    b = Bundle.open(tiny_bundle, correction=False)  # the raw engine output
    fpb = Bundle.open(fp)
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8), dtype=np.float32)

    def run(model, t):
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"sample": x, "timestep": np.full(2, t, np.int64)})[0]

    for g, t in ((0, 100), (1, 500), (2, 999)):
        want = run(lower_group(proto, lm, nodes, weights, ranges[g], ORT_CPU, pins=pins), t)
        got = b.predict(x, t)
        np.testing.assert_array_equal(got, want)
        own = run(lower_group(proto, lm, nodes, weights, ranges[g], ORT_CPU), t)  # the group's own zero points
        fp32 = fpb.predict(x, t)
        assert np.sqrt(np.mean((got - own) ** 2)) < np.sqrt(np.mean((own - fp32) ** 2))


def test_8bit_weights_sit_on_the_target_s_grid(tiny_bundle, tiny_model_dir):
    """ort-cpu rounds 8-bit weights to the 7-bit grid (u8 x s8 pairs cannot saturate int16 on x86
    without VNNI); the plan and the manifest still say 8 bits, and the manifest names the grid."""
    from dmcompile import stages
    from dmcompile.calibration.rounding import RoundToNearest
    from dmcompile.frontend.layermap import LayerMap
    from dmcompile.targets import ORT_CPU, TENSORRT

    m = onnx.load(str(tiny_bundle / "unet.onnx"))
    weights = [onnx.numpy_helper.to_array(i) for i in m.graph.initializer
               if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert weights and max(int(np.abs(w).max()) for w in weights) == 63
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert manifest["precision"]["weight_grid_bits"] == 7 == ORT_CPU.weight_grid_bits
    assert {b for l in manifest["precision"]["layers"] for b in l["weight_bits"] or []} == {8}
    assert TENSORRT.grid_bits(8) == 8 and ORT_CPU.grid_bits(8) == 7 and ORT_CPU.grid_bits(4) == 4
    lm = LayerMap.load(api.fp_bundle(str(tiny_model_dir)) / "layer_map.json")
    layer = next(l for l in lm.layers if l.weight)
    w = np.random.default_rng(0).standard_normal(layer.weight_shape).astype(np.float32)
    capped = stages.rounder(None, "rtn", 7)
    assert int(np.abs(capped.quantize(layer, w, 8).q).max()) == 63 == int(np.abs(capped.quantize(layer, w, 7).q).max())
    assert int(np.abs(RoundToNearest().quantize(layer, w, 8).q).max()) == 127


def test_runtime_switches_group_inputs(tiny_bundle):
    b = Bundle.open(tiny_bundle, correction=False)
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8), dtype=np.float32)
    assert b.group_of(332).index == 0 and b.group_of(333).index == 1
    engine = b._engines["unet.onnx"]
    # A group's parameters are calibrated for its own timesteps: t=999 with group 0's
    # parameters differs from t=999 with group 2's.
    assert not np.array_equal(engine.predict(x, 999, b.group_inputs(0)), b.predict(x, 999))
    fp = Bundle.open(api.fp_bundle(str(b.manifest["model"]["source"])))
    rel = np.linalg.norm(b.predict(x, 999) - fp.predict(x, 999)) / np.linalg.norm(fp.predict(x, 999))
    assert rel < 0.1


def _without_timings(d):
    if isinstance(d, dict):
        return {k: _without_timings(v) for k, v in d.items() if k not in ("seconds", "speed")}
    if isinstance(d, list):
        return [_without_timings(v) for v in d]
    return d


def test_build_is_deterministic_from_cold_caches(tiny_model_dir, tmp_path, monkeypatch):
    """Two builds, each with an empty cache of its own (export, calibration, correction all
    recomputed), give byte-identical files and the same manifest up to timings."""
    out = []
    for name in ("a", "b"):
        monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / f"cache-{name}"))
        out.append(api.build(str(tiny_model_dir), tmp_path / name, BuildConfig(calibration=SMALL, eval_samples=4)).path)
        assert (tmp_path / f"cache-{name}" / "calib").is_dir()  # it really calibrated into its own cache
    m1, m2 = (json.loads((o / "manifest.json").read_text()) for o in out)
    assert m1["files"] == m2["files"]
    for f in m1["files"]:
        assert (out[0] / f).read_bytes() == (out[1] / f).read_bytes()
    assert _without_timings(m1) == _without_timings(m2)


def test_cache_keys_and_configs_do_not_depend_on_the_hash_seed(tiny_model_dir, tmp_path):
    """diffusers builds ``_use_default_values`` from a set: two interpreters with different hash
    seeds must still give the same config and so the same export cache key (they did not, and
    every process re-exported the model under a new key)."""
    import os
    import shutil
    import subprocess
    import sys

    folder = shutil.copytree(tiny_model_dir, tmp_path / "m")  # a config that leaves options to their defaults
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("dropout", "add_attention", "downsample_type", "upsample_type", "time_embedding_dim",
              "resnet_time_scale_shift", "attn_norm_num_groups", "class_embed_type", "num_class_embeds"):
        cfg.pop(k, None)
    (folder / "config.json").write_text(json.dumps(cfg))
    code = ("import json; from dmcompile import stages; from dmcompile.config import ExportConfig; "
            f"m = stages.as_model({str(folder)!r}); "
            "print(stages.model_key(m, ExportConfig()), json.dumps(m.unet_config, sort_keys=True))")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2", "3")]
    outs = {p.communicate()[0] for p in procs}  # three interpreters at once: the imports dominate
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert len(outs) == 1 and "_use_default_values" in next(iter(outs))


def test_float_layers(tiny_model_dir, tmp_path):
    out = api.build(str(tiny_model_dir), tmp_path / "f",
                    BuildConfig(recipe=W8A8Recipe(overrides=parse_overrides("last_conv,time_embedding", "float")),
                                calibration=SMALL, eval_samples=0)).path
    m = json.loads((out / "manifest.json").read_text())
    floats = [l for l in m["precision"]["layers"] if l["activation"] == "float"]
    assert {l["module"] for l in floats} == {"conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}
    rep = ort_fusion_report(out / "unet.onnx")
    assert rep["float"] == {"Conv": 1, "Gemm": 2}
    with pytest.raises(ConfigError, match="matches no Conv/Gemm/MatMul layer"):
        api.build(str(tiny_model_dir), tmp_path / "g",
                  BuildConfig(recipe=W8A8Recipe(overrides=parse_overrides("nope=float")), calibration=SMALL))
    assert not (tmp_path / "g").exists()


def test_interrupted_build_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import dmcompile.backends.onnxruntime as backend

    real = backend.save_engine

    def interrupted(folder, merged, params):
        real(folder, merged, params[:1])  # half the files are on disk
        raise KeyboardInterrupt

    monkeypatch.setattr(backend, "save_engine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.build(str(tiny_model_dir), tmp_path / "out", BuildConfig(calibration=SMALL, eval_samples=0))
    assert list(tmp_path.iterdir()) == []


def test_cli_build_inspect_sample(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["build", str(tiny_model_dir), "-o", str(out), "--groups", "2", "--calib-size", "4",
                 "--calib-steps", "4", "--eval-samples", "0"]) == 0
    assert "100% of Conv/Gemm/MatMul on integer kernels" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("100.0% integer") == 1 and "groups: 2" in text
    assert main(["sample", str(out), "-n", "4", "--steps", "5", "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert main(["build", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--groups", "0"]) == 2
    assert "groups must be in [1, 1000]" in capsys.readouterr().err


def test_conv_params_choice():
    from dmcompile.targets import conv_params_choice
    from dmruntime import bench

    assert conv_params_choice(True) == (True, "--conv-params constant")
    assert conv_params_choice(False) == (False, "--conv-params per-group")
    here = "amx_int8" in bench.cpu_info()[1]
    assert conv_params_choice("auto")[0] is not here
    for value in (1, "yes"):
        with pytest.raises(ConfigError, match="constant_conv_params must be True, False or 'auto'"):
            BuildConfig(calibration=SMALL, constant_conv_params=value)


@pytest.mark.parametrize("amx", [True, False])
def test_conv_params_auto_follows_the_build_cpu(amx, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """--conv-params auto (the default): per-group zero points and biases (ONNX Runtime's generic int8
    Conv, which has an AMX kernel) where the build CPU has AMX, constants (its symmetric int8 Conv)
    elsewhere; the manifest and inspect say which and why."""
    from dmruntime import bench

    model, flags = bench.cpu_info()
    flags = (flags | {"amx_int8", "amx_tile"}) if amx else (flags - {"amx_int8", "amx_tile"})
    monkeypatch.setattr(bench, "cpu_info", lambda: (model, flags))
    out = tmp_path / "b"
    assert main(["build", str(tiny_model_dir), "-o", str(out), "--groups", "2", "--calib-size", "4",
                 "--calib-steps", "4", "--eval-samples", "0", "--no-speed-check"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["engine"]["conv_params"]["mode"] == ("per-group" if amx else "constant")
    assert m["engine"]["conv_params"]["why"].startswith("auto: the build CPU has " + ("AMX" if amx else "no AMX"))
    engine = onnx.load(str(out / "unet.onnx"))
    fed = {i.name for i in engine.graph.input}
    convs = [n for n in engine.graph.node if n.op_type == "QLinearConv"]
    assert convs and all((n.input[2] in fed) is amx for n in convs)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f"Conv zero points and biases: {m['engine']['conv_params']['mode']} (auto: " in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["build", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--conv-params", "both"])
    assert e.value.code == 2 and "invalid choice: 'both'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_corrupt_group_engine_fails_clearly(tiny_bundle, tmp_path, capsys):
    b = shutil.copytree(tiny_bundle, tmp_path / "bad")
    data = (b / "group_01.npz").read_bytes()
    (b / "group_01.npz").write_bytes(data[: len(data) // 2])
    assert main(["sample", str(b), "-n", "2", "--steps", "3", "-o", str(tmp_path / "g.png")]) == 2
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits16", "ddpm-cifar10-32", "digits-ldm"])
def test_full_integer_fusion_on_shipped_models(name, tmp_path):
    guidance = 2.0 if name == "digits-ldm" else None  # the conditional model: guided calibration
    # fusion does not depend on how weights are rounded; GPTQ's pass on ddpm (about 2 minutes here,
    # benchmarks/README.md) is left to the benchmarks, the other two models build with it
    rounding = "rtn" if name == "ddpm-cifar10-32" else "gptq"
    cfg = BuildConfig(calibration=CalibrationConfig(size=2, steps=4, groups=2, batch_size=2, guidance_scale=guidance),
                      eval_samples=0, analysis=AnalysisConfig(rounding=rounding),
                      correction=False)  # PTQD's statistics change no graph (32 trajectories of ddpm: seconds)
    out = api.build(name, tmp_path / name, cfg).path
    rep = ort_fusion_report(out / "unet.onnx")
    assert rep["float"] == {} and rep["ratio"] == 1.0
    ops = json.loads((api.fp_bundle(name) / "manifest.json").read_text())["export"]["op_counts"]
    assert rep["integer"]["QLinearConv"] == ops["Conv"] and rep["integer"]["QGemm"] == ops["Gemm"]
    assert rep["integer"].get("QLinearMatMul", 0) + rep["integer"].get("MatMulIntegerToFloat", 0) == ops["MatMul"]


def test_corrupt_files_without_hash_check_still_fail_clearly(tiny_bundle, tmp_path):
    from dmruntime import BundleError

    b = shutil.copytree(tiny_bundle, tmp_path / "npz")
    (b / "group_02.npz").write_bytes(b"PK\x03\x04 not a zip")
    opened = Bundle.open(b, verify=False)  # group inputs are read on their group's first use
    with pytest.raises(BundleError, match="cannot read group inputs group_02.npz"):
        opened.predict(np.zeros((1, 2, 8, 8), np.float32), opened.groups[2].t_start)
    b = shutil.copytree(tiny_bundle, tmp_path / "engine")
    data = (b / "unet.onnx").read_bytes()
    (b / "unet.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="corrupt or truncated"):
        Bundle.open(b, verify=False).predict(np.zeros((1, 2, 8, 8), np.float32), 5)


def test_older_onnxruntime_is_warned_about(tiny_bundle, tmp_path):
    b = shutil.copytree(tiny_bundle, tmp_path / "v")
    m = json.loads((b / "manifest.json").read_text())
    m["engine"]["onnxruntime_version"] = "99.0.0"
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="fused by onnxruntime 99.0.0"):
        Bundle.open(b)


def test_merger_feeds_a_zero_point_beside_a_fed_bias():
    """ONNX Runtime's symmetric QLinearConv folds a constant bias when it prepacks and ignores a fed
    one: where the groups' int32 biases differ, the input zero point is fed too even when it is
    equal in every group (so that kernel is never chosen with a bias it would drop)."""
    from onnx import TensorProto, helper, numpy_helper

    from dmcompile.backends.onnxruntime import GroupMerger

    def fused(bias, zp=3, y_scale=0.5):
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "xs"),
                 numpy_helper.from_array(np.array(zp, np.uint8), "xz"),
                 numpy_helper.from_array(np.ones((2, 1, 1, 1), np.int8), "w"),
                 numpy_helper.from_array(np.full(2, 0.2, np.float32), "ws"),
                 numpy_helper.from_array(np.zeros(2, np.int8), "wz"),
                 numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
                 numpy_helper.from_array(np.array(0, np.uint8), "yz"),
                 numpy_helper.from_array(np.array(bias, np.int32), "b")]
        node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"], ["y"])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 2, 2])],
                                  [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 2, 2, 2])], inits)
        return helper.make_model(graph)

    m = GroupMerger()
    m.add(fused([1, 2]))
    m.add(fused([5, 6]))
    merged, params = m.result()
    fed = {i.name for i in merged.graph.input}
    assert {"b", "xz"} <= fed and [int(p["xz"]) for p in params] == [3, 3]
    m = GroupMerger()  # equal biases: the zero point stays a constant
    m.add(fused([1, 2], y_scale=0.5))
    m.add(fused([1, 2], y_scale=0.25))
    merged, params = m.result()
    assert {i.name for i in merged.graph.input} == {"x", "ys"}


def test_conv_biases_go_into_a_sum_without_shapes(tiny_model_dir, monkeypatch):
    """The float Conv biases join the time embedding where shape inference finds it; a graph it
    cannot take still lowers, the biases then one more input of the Add that follows (a Sum)."""
    import onnxruntime as ort

    from dmcompile import stages
    from dmcompile.frontend.layermap import LayerMap
    from dmcompile.lowering.groups import conv_input_pins
    from dmcompile.lowering.qdq import lower_group, quantize_weights
    from dmcompile.targets import ORT_CPU

    fp = api.fp_bundle(str(tiny_model_dir))
    lm = LayerMap.load(fp / "layer_map.json")
    proto = onnx.load(str(fp / "model.onnx"))
    ranges = stages.cached_calibration(fp, SMALL).ranges()
    nodes = {l.node for l in lm.layers}
    weights = quantize_weights(proto, lm.layers)
    pins = conv_input_pins(proto, nodes, ranges)
    x = np.random.default_rng(0).standard_normal((2, 2, 8, 8), dtype=np.float32)

    def lowered():
        m = lower_group(proto, lm, nodes, weights, ranges[1], ORT_CPU, pins=pins)
        out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"sample": x, "timestep": np.full(2, 500, np.int64)})[0]
        return m, out

    with_shapes, a = lowered()
    assert any(n.op_type == "Add" and "+" in n.output[0] for n in with_shapes.graph.node)  # into the embedding

    def fail(*args, **kw):
        raise RuntimeError("no shapes")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    without, b = lowered()
    assert not any(n.op_type == "Add" and "+" in n.output[0] for n in without.graph.node)
    assert sum(n.op_type == "Sum" for n in without.graph.node) > sum(n.op_type == "Sum" for n in with_shapes.graph.node)
    # the same sums in another float order: equal but for a rounding tie flipping a code somewhere
    assert np.linalg.norm(a - b) <= 0.01 * np.linalg.norm(a)
