"""dmcompile.memory: the activation liveness and the resident-memory estimate `inspect` prints."""

import json
import math

import onnx
import pytest
from conftest import ROOT
from onnx import TensorProto, helper

from dmcompile.backends import get_backend
from dmcompile.cli import main
from dmcompile.memory import activation_peak, board_estimate, resident_estimate, resident_weight_bytes, weights_held

ORT = get_backend("onnxruntime").memory
OV = get_backend("openvino").memory

DATA = ROOT / "runtimes" / "python" / "tests" / "data"


def test_activation_peak_follows_liveness(tmp_path):
    # x[B,8] -> a = Relu(x) [B,8] -> b = Tile(a) [B,32] -> c = ReduceSum(b) [B,1]; y = Add(a, c) [B,8]
    # Alive at once: x, a while a is made (64 B); a, b (32 + 128); a, b, c at ReduceSum (164, b then
    # freed); a, c, y at the Add (32 + 4 + 32). Peak 164 bytes per sample; x is freed after Relu.
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Tile", ["a", "reps"], ["b"]),
             helper.make_node("ReduceSum", ["b", "axes"], ["c"], keepdims=1),
             helper.make_node("Add", ["a", "c"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[helper.make_tensor("reps", TensorProto.INT64, [2], [1, 4]),
                     helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, tmp_path / "m.onnx")
    r = activation_peak(tmp_path / "m.onnx")
    assert r["peak_bytes"] == 32 + 128 + 4 and r["largest_bytes"] == 128


def test_weights_held_and_estimate_from_fixture_manifests():
    w8 = json.loads((DATA / "tiny-w8a8" / "manifest.json").read_text())
    w4 = json.loads((DATA / "tiny-w4" / "manifest.json").read_text())
    # W8A8: one engine file with its int8 initializers inside
    assert weights_held(w8, ORT) == {"unet.onnx": w8["files"]["unet.onnx"]["bytes"]}
    # 4-bit: the engine file plus weights.npz expanded to one int8 per value
    stored = w4["weights"]["tensors"]
    expanded = sum(math.prod(t["shape"]) for t in stored.values())
    assert weights_held(w4, ORT) == {"unet.onnx": w4["files"]["unet.onnx"]["bytes"] + expanded}
    peak = w8["memory"]["activation_peak_bytes_per_sample"]
    assert peak > 0
    e1, e8 = resident_estimate(w8, 1, ORT, ORT), resident_estimate(w8, 8, ORT, ORT)
    assert e1["activations_known"] and e1["engines"] == 1
    assert e8["activations_mb"] == pytest.approx(8 * e1["activations_mb"])
    assert e1["total_mb"] == pytest.approx(ORT.base_mb + e1["weights_mb"] + e1["activations_mb"])
    assert e1["weights_mb"] == pytest.approx(sum(weights_held(w8, ORT).values()) * ORT.weight_copies / 1e6)
    e4 = resident_estimate(w4, 1, ORT, ORT)  # weights from weights.npz: one int8 copy more (measured)
    assert e4["weights_mb"] == pytest.approx((sum(weights_held(w4, ORT).values()) * ORT.weight_copies + expanded) / 1e6)
    old = {k: v for k, v in w8.items() if k != "memory"}  # a bundle built before the entry existed
    assert not resident_estimate(old, 1, ORT, ORT)["activations_known"] and resident_estimate(old, 1, ORT, ORT)["activations_mb"] == 0


def test_the_build_records_activations_and_inspect_prints_the_estimate(capsys):
    w8 = json.loads((DATA / "tiny-w8a8" / "manifest.json").read_text())
    fresh = w8["memory"]
    assert fresh["activation_peak_bytes_per_sample"] >= fresh["largest_activation_bytes_per_sample"] > 0
    assert main(["inspect", str(DATA / "tiny-w8a8"), "--no-fusion"]) == 0
    out = capsys.readouterr().out
    lines = [l for l in out.splitlines() if l.startswith("resident memory, estimate")]
    assert len(lines) == 2 and "batch 1" in lines[0] and "batch 8" in lines[1]
    assert "onnxruntime base" in lines[0] and "activations" in lines[0]


def test_openvino_engines_each_hold_the_shared_weights():
    m = {"engine": {"runtime": "openvino"}, "groups": [{"engine": "unet_e00.onnx"}, {"engine": "unet_e01.onnx"},
                                                        {"engine": "unet_e01.onnx"}],
         "files": {"unet_e00.onnx": {"bytes": 100}, "unet_e01.onnx": {"bytes": 100}, "weights.bin": {"bytes": 5000}}}
    assert weights_held(m, OV) == {"unet_e00.onnx": 5100, "unet_e01.onnx": 5100}
    e = resident_estimate(m, 1, OV, ORT)
    assert e["engines"] == 2
    assert e["weights_mb"] == pytest.approx(2 * (5100 * OV.weight_copies / 1e6 + OV.engine_mb))
    assert e["base_mb"] == OV.base_mb


def test_board_estimate_uses_the_bundle_formula():
    params, peak = 10**7, 10**6
    int8 = board_estimate(params, peak, engines=1, batch=2, model=ORT)
    assert int8 == pytest.approx(ORT.base_mb + (resident_weight_bytes(ORT, [params])
                                                                   + 2 * peak) / 1e6)
    # weights from weights.npz: one int8 copy more, as resident_estimate counts them
    assert board_estimate(params, peak, 1, 2, ORT, stored_weights=True) - int8 == pytest.approx(params / 1e6)
    ov = [board_estimate(params, peak, k, 1, OV) for k in (1, 2, 3)]
    assert ov[2] - ov[1] == pytest.approx(ov[1] - ov[0])  # each compiled model costs the same
    assert ov[1] - ov[0] == pytest.approx(OV.engine_mb + params * OV.weight_copies / 1e6)
