"""Per-layer precision rules (most specific wins, whatever the order), weight-width ranges,
recipes and their schema-1 compatibility, and user errors that used to end in tracebacks."""

import json

import numpy as np
import onnx
import pytest

from dmcompile import api
from dmcompile.cli import main
from dmcompile.config import (BuildConfig, CalibrationConfig, MixedRecipe, Override, W8A8Recipe, parse_overrides)
from dmcompile.errors import ArtifactError, ConfigError, ModelError
from dmcompile.lowering.precision import resolve
from dmcompile.quant import quantize_weight

SMALL = CalibrationConfig(size=2, steps=6, groups=3, batch_size=2)


@pytest.fixture(scope="module")
def layer_map(tiny_model_dir):
    from dmcompile.frontend.layermap import LayerMap

    return LayerMap.load(api.fp_bundle(str(tiny_model_dir)) / "layer_map.json")


def bits_of(layer_map, rules):
    return resolve(layer_map, parse_overrides(rules)).pinned_bits


def node(layer_map, module):
    return next(l.node for l in layer_map.layers if l.module == module)


def test_most_specific_rule_wins_in_any_order(layer_map):
    conv_in = node(layer_map, "conv_in")
    for rules in ("Conv=4,conv_in=8", "conv_in=8,Conv=4"):
        b = bits_of(layer_map, rules)
        assert b[conv_in] == 8, rules
        assert all(v == 4 for n, v in b.items() if n != conv_in)  # every other Conv
    # node > module > longer prefix > shorter prefix > op type > *
    resnet = "down_blocks.0.resnets.0"
    rules = f"*=2,Conv=3,down_blocks=4,{resnet}=5,{resnet}.conv1=6"
    for order in (rules, ",".join(reversed(rules.split(",")))):
        b = bits_of(layer_map, order)
        mods = {l.node: l.module for l in layer_map.layers}
        assert b[node(layer_map, f"{resnet}.conv1")] == 6
        assert b[node(layer_map, f"{resnet}.conv2")] == 5
        assert all(v == 4 for n, v in b.items()
                   if mods[n].startswith("down_blocks.") and not mods[n].startswith(resnet))
        assert b[conv_in] == 3 and b[node(layer_map, "time_embedding.linear_1")] == 2
    name = next(l.node for l in layer_map.layers if l.module == "conv_in")
    assert bits_of(layer_map, f"conv_in=4,{name}=8")[conv_in] == 8  # node name beats module name


def test_equally_specific_conflicts_and_unmatched_rules_are_errors(layer_map):
    conv_in = node(layer_map, "conv_in")
    with pytest.raises(ConfigError, match="equally specifically"):
        resolve(layer_map, parse_overrides(f"first_conv=8,{conv_in}=4"))
    with pytest.raises(ConfigError, match="matches no Conv/Gemm/MatMul layer"):
        resolve(layer_map, parse_overrides("nope=4"))
    with pytest.raises(ConfigError, match="more than once"):
        W8A8Recipe(overrides=parse_overrides("conv_in=float,conv_in=8"))
    # float keeps a layer out of quantization entirely; the most specific rule decides that too
    p = resolve(layer_map, parse_overrides("Conv=float,conv_in=8"))
    other_convs = [l.node for l in layer_map.layers if l.op_type == "Conv" and l.node != conv_in]
    assert conv_in in p.quantized and not any(n in p.quantized for n in other_convs)


def test_build_applies_the_most_specific_width(tiny_model_dir, tmp_path):
    for i, rules in enumerate(("Conv=4,conv_in=8,*=8", "conv_in=8,Conv=4,*=8")):
        cfg = BuildConfig(recipe=MixedRecipe(overrides=parse_overrides(rules)), calibration=SMALL, eval_samples=0,
                          correction=False)
        m = api.build(str(tiny_model_dir), tmp_path / f"b{i}", cfg).manifest
        by_module = {l["module"]: l["weight_bits"] for l in m["precision"]["layers"]}
        assert by_module["conv_in"] == [8, 8, 8] and by_module["conv_out"] == [4, 4, 4], rules


def test_weight_widths_are_range_checked():
    w = np.array([[0.5, -1.0, 0.25]], np.float32)  # one output channel
    with pytest.raises(ValueError, match=r"weight bits must be an integer in \[2, 8\]"):
        quantize_weight(w, 0, 12)  # would wrap around in the int8 cast
    with pytest.raises(ValueError):
        quantize_weight(w, 0, 1)
    assert quantize_weight(w, 0, 8).q.tolist() == [[64, -127, 32]]
    for bad in (12, 9, 1, 0, True, "x"):
        with pytest.raises(ConfigError):
            Override("*", bad)
    assert Override("conv_in", "FLOAT").precision == "float" and Override("conv_in", "6").precision == 6
    with pytest.raises(ConfigError, match="w8a8 quantizes every weight to 8 bits"):
        W8A8Recipe(overrides=(Override("*", 4),))


def test_cli_rejects_wide_widths_with_simulated_bits(tiny_model_dir, tmp_path, capsys):
    argv = ["build", str(tiny_model_dir), "-o", str(tmp_path / "o"), "--format", "mixed", "--weight-bits", "*=12",
            "--allow-simulated-bits"]
    assert main(argv) == 2
    assert "weight bits must be in [2, 8]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_schema_1_configs_still_read():
    old = {"schema_version": 1, "format": "mixed", "profile": "ort-cpu", "float_layers": ["last_conv"],
           "calibration": CalibrationConfig(groups=4).to_dict(), "eval_samples": 16, "seed": 0, "budget": None,
           "allocator": "dp", "share_weights": True, "allow_simulated_bits": False,
           "analysis": {"schema_version": 1, "samples_per_group": 8}, "weight_bits": {"*": 4, "first_conv": 8},
           "correction": True, "correction_size": 32, "step_aware": False}
    cfg = BuildConfig.from_dict(old)
    assert cfg.recipe == MixedRecipe(overrides=(Override("last_conv", "float"), Override("*", 4),
                                                Override("first_conv", 8)))
    assert cfg.calibration.groups == 4 and cfg.analysis.samples_per_group == 8
    assert BuildConfig.from_dict(cfg.to_dict()) == cfg
    legacy = BuildConfig.from_dict({"schema_version": 1, "format": "mixed", "budget": "5bits", "share_weights": False})
    assert legacy.recipe.budget.kind == "bits" and legacy.recipe.share_weights is False and legacy.format == "mixed"
    with pytest.raises(ConfigError, match="--budget applies to --format mixed only"):
        BuildConfig.from_dict({"schema_version": 1, "budget": "5bits"})
    with pytest.raises(TypeError, match="unexpected keyword"):
        BuildConfig(nonsense=1)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['budget', 'format'\]; pass recipe="):
        BuildConfig(format="mixed", budget="5bits")  # schema 1's keywords: the constructor no longer takes them


def test_mixed_recipe_needs_a_budget_or_widths():
    with pytest.raises(ConfigError, match="needs --budget"):
        MixedRecipe()
    with pytest.raises(ConfigError, match="leaving nothing for the budget"):
        MixedRecipe(budget="5bits", overrides=(Override("*", 4),))
    from dmcompile.budget import Budget

    assert MixedRecipe(budget="5bits").budget == Budget("bits", 5.0, "5bits")  # parsed once, into a Budget


def test_groups_without_steps_fail_before_work(tiny_model_dir, tmp_path, capsys):
    """Ten groups with a 5-step calibration leave five groups without inputs for RD curves."""
    base = [str(tiny_model_dir), "-o", str(tmp_path / "o"), "--groups", "10", "--calib-steps", "5"]
    assert main(["build", *base, "--format", "mixed", "--budget", "5bits"]) == 2
    err = capsys.readouterr().err
    assert "no step of the calibration sampler (ddim 5 steps) falls in timestep group 1 [100, 200)" in err and "Traceback" not in err
    assert main(["analyze", *base]) == 2
    assert "--calib-steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # w8a8 has no such need: empty groups take the pooled ranges
    assert main(["build", *base, "--calib-size", "2", "--eval-samples", "0", "--no-correction"]) == 0


def test_artefacts_of_another_schema_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    from dmcompile.analysis.rd import RDCurves
    from dmcompile.calibration.trajectory import CalibrationResult
    from dmcompile.frontend.layermap import LayerMap

    curves = api.analyze(str(tiny_model_dir), api.AnalysisConfig(samples_per_group=1, weight_bits=(4, 8),
                                                                  act_bits=(8,)), SMALL, out=tmp_path / "c")
    meta = json.loads((tmp_path / "c" / "curves.json").read_text())
    meta["schema_version"] = 1
    (tmp_path / "c" / "curves.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="schema_version 1"):
        RDCurves.load(tmp_path / "c")
    bundle = tmp_path / "b"
    assert main(["build", str(tiny_model_dir), "-o", str(bundle), "--groups", "3", "--calib-size", "2",
                 "--calib-steps", "6", "--eval-samples", "0", "--no-correction"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(bundle), "--no-fusion", "--plots", str(tmp_path / "p"), "--curves",
                 str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "schema_version 1" in err and "dmcompile analyze" in err and "Traceback" not in err
    assert len(curves.layers) > 0

    calib = api.calibrate(str(tiny_model_dir), SMALL)
    calib.save(tmp_path / "cal")
    meta = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    meta["schema_version"] = 1
    (tmp_path / "cal" / "calibration.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="delete the folder to recalibrate"):
        CalibrationResult.load(tmp_path / "cal")

    lm = json.loads((api.fp_bundle(str(tiny_model_dir)) / "layer_map.json").read_text())
    lm["schema_version"] = 99
    (tmp_path / "lm.json").write_text(json.dumps(lm))
    with pytest.raises(ArtifactError, match="export the model again"):
        LayerMap.load(tmp_path / "lm.json")


def test_a_stale_calibration_cache_entry_is_measured_again(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    first = api.calibrate(str(tiny_model_dir), SMALL)
    (entry,) = (tmp_path / "cache" / "calib").iterdir()
    (entry / "histograms.npz").write_bytes(b"garbage")
    again = api.calibrate(str(tiny_model_dir), SMALL)
    assert again.ranges() == first.ranges()


def test_probe_of_a_batch_mixing_model_is_a_clear_error():
    from onnx import TensorProto, helper, numpy_helper

    from dmcompile.analysis.probe import make_probe
    from dmcompile.frontend.layermap import LayerMap

    g = helper.make_graph(
        [helper.make_node("ReduceSum", ["sample", "axes"], ["pooled"], keepdims=1),
         helper.make_node("Add", ["sample", "pooled"], ["eps"])], "m",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 4]),
         helper.make_tensor_value_info("timestep", TensorProto.INT64, ["b"])],
        [helper.make_tensor_value_info("eps", TensorProto.FLOAT, ["b", 4])],
        [numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    with pytest.raises(ModelError, match="does not scale with the batch"):
        make_probe(model, LayerMap("m", ()), ["pooled"], (4,))


def test_attention_matmuls_rule_names_the_activation_matmuls_only():
    """Issue 26: ``attention_matmuls=float`` keeps Q.K^T and attention.V float on ort-cpu (where they
    run as QLinearMatMul otherwise) and leaves the weighted MatMuls and everything else alone; a
    module prefix still beats it."""
    from dmcompile.frontend.layermap import LayerMap
    from dmcompile.targets import ORT_CPU

    lm = LayerMap.load(api.fp_bundle("digits16") / "layer_map.json")
    act = {l.node for l in lm.layers if l.op_type == "MatMul" and not l.weight}
    assert len(act) >= 4
    everything = resolve(lm, (), ORT_CPU).quantized
    assert act <= everything  # ort-cpu quantizes them by default
    floated = resolve(lm, parse_overrides("attention_matmuls=float"), ORT_CPU).quantized
    assert floated == everything - act
    # more specific than the op type, less than a module prefix
    q = resolve(lm, parse_overrides("MatMul=float,attention_matmuls=8"), ORT_CPU).quantized
    assert act <= q and not any(l.node in q for l in lm.layers if l.op_type == "MatMul" and l.weight)
    block = next(l.module for l in lm.layers if l.node in act)
    q = resolve(lm, parse_overrides(f"attention_matmuls=float,{block}=8"), ORT_CPU).quantized
    assert {l.node for l in lm.layers if l.node in act and l.module == block} <= q
    with pytest.raises(ConfigError, match="attention_matmuls"):  # the error names the alias
        resolve(lm, parse_overrides("no_such_layer=float"), ORT_CPU)
