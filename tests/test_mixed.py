"""Mixed precision: RD curves (cached, resumable), allocation into real 4-bit bundles,
simulated widths, accounting and plots."""

import json

import numpy as np
import onnx
import pytest
from dmruntime import Bundle, DDIMSampler

from dmcompile import api
from dmcompile.backends.onnxruntime import ort_fusion_report
from dmcompile.cli import main
from dmcompile.config import AnalysisConfig, BuildConfig, CalibrationConfig, MixedRecipe, parse_overrides
from dmcompile.errors import BudgetError

SMALL = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)
ANALYSIS = AnalysisConfig(samples_per_group=2, weight_bits=(2, 4, 8), act_bits=(6, 8))


@pytest.fixture(scope="module")
def curves(tiny_model_dir):
    return api.analyze(str(tiny_model_dir), ANALYSIS, SMALL)


def mixed(tiny_model_dir, out, weight_bits=None, **kw):
    recipe = MixedRecipe(overrides=parse_overrides(weight_bits), **kw)
    cfg = BuildConfig(recipe=recipe, calibration=SMALL, eval_samples=0, analysis=ANALYSIS)
    return api.build(str(tiny_model_dir), out, cfg)


def test_curves_shape_and_monotone(tiny_model_dir, curves):
    from dmcompile.frontend.layermap import LayerMap
    from dmcompile.targets import ORT_CPU

    fp = api.fp_bundle(str(tiny_model_dir))
    proto, lm = onnx.load(str(fp / "model.onnx")), LayerMap.load(fp / "layer_map.json")
    inputs = ORT_CPU.layer_input_tensors(proto, lm.layers)
    # no reader-less Conv outputs among them
    assert curves.tensors == inputs and len(inputs) < len(ORT_CPU.quantized_tensors(proto, lm.layers))
    assert curves.groups == [(0, 333), (333, 667), (667, 1000)] and curves.config["calibration"]["groups"] == 3
    G, L, B = curves.weight.shape
    assert (G, B) == (3, 3) and L == len(curves.layers) > 5
    assert curves.act.shape == (3, len(curves.tensors), 2)
    assert np.isfinite(curves.weight).all() and (curves.weight >= 0).all()
    # fewer bits distort more, for nearly every layer and group
    assert (curves.weight[:, :, 0] > curves.weight[:, :, 2]).mean() > 0.95
    assert (curves.act[:, :, 0] >= curves.act[:, :, 1]).mean() > 0.9


def test_curves_resume_after_interrupt(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    calls = []

    def stop_early(stage, i, n):
        if stage == "rd curves":
            calls.append(i)
            if len(calls) == 5:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, progress=stop_early)
    assert list((tmp_path / "cache" / "rd").glob("*.partial/partial.npz"))
    seen = []
    resumed = api.analyze(str(tiny_model_dir), ANALYSIS, SMALL,
                          progress=lambda s, i, n: s == "rd curves" and seen.append(i))
    assert seen[0] > 5  # picked up where it stopped
    assert not list((tmp_path / "cache" / "rd").glob("*.partial"))
    shutil.rmtree(tmp_path / "cache" / "rd")
    fresh = api.analyze(str(tiny_model_dir), ANALYSIS, SMALL)
    # every job is measured in the same batch however the run was split: the same bytes
    np.testing.assert_array_equal(resumed.weight, fresh.weight)
    np.testing.assert_array_equal(resumed.act, fresh.act)


def test_model_sweep_fills_unmeasured_widths(tiny_model_dir):
    modelled = api.analyze(str(tiny_model_dir), AnalysisConfig(samples_per_group=2, weight_bits=(2, 4, 8),
                                                                act_bits=(8,), sweep="model", model_bits=(2, 8)), SMALL)
    assert modelled.measured[:, [0, 2]].all() and not modelled.measured[:, 1].any()
    assert np.isfinite(modelled.weight).all()
    mid = modelled.weight[:, :, 1]
    assert ((mid < modelled.weight[:, :, 0]) & (mid > modelled.weight[:, :, 2])).mean() > 0.95


def test_explicit_bits_store_4bit_packed_and_keep_int8_kernels(tiny_model_dir, tmp_path):
    w4 = mixed(tiny_model_dir, tmp_path / "w4", weight_bits="*=4,first_conv=8").path
    w8 = api.build(str(tiny_model_dir), tmp_path / "w8", BuildConfig(calibration=SMALL, eval_samples=0)).path
    m = json.loads((w4 / "manifest.json").read_text())
    layers = [l for l in m["precision"]["layers"] if l["weight_bits"]]
    first = next(i for i, l in enumerate(layers) if l["op_type"] == "Conv")
    layers.insert(0, layers.pop(first))
    assert layers[0]["weight_bits"] == [8, 8, 8] and all(l["weight_bits"] == [4, 4, 4] for l in layers[1:])
    assert all(l["storage_bits"] == [4, 4, 4] for l in layers[1:])
    stored = m["weights"]["tensors"]
    assert sum(t["storage_bits"] == 4 for t in stored.values()) == len(layers) - 1
    # the engine holds no weight bytes; the packed file is about half the int8 one
    engine = onnx.load(str(w4 / "unet.onnx"), load_external_data=False)
    ext = [i for i in engine.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(ext) == len(layers)
    b = Bundle.open(w4)
    assert ort_fusion_report(w4 / "unet.onnx", b.engine("unet.onnx").external)["ratio"] == 1.0
    # what the runtime hands the session is the 4-bit grid of each weight, GPTQ-rounded (the default)
    from dmcompile import stages
    from dmcompile.frontend.layermap import LayerMap

    fp_dir = api.fp_bundle(str(tiny_model_dir))
    fp = onnx.load(str(fp_dir / "model.onnx"))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in fp.graph.initializer}
    rounder = stages.rounder(stages.cached_calibration(fp_dir, SMALL, moments="pooled"), "gptq")
    lm = {l.node: l for l in LayerMap.load(fp_dir / "layer_map.json").layers}
    for l in layers[1:]:
        got = b.engine("unet.onnx").external[f"{l['weight']}.q"]
        want = rounder.quantize(lm[l["node"]], inits[l["weight"]], 4).q
        assert np.array_equal(got, want) and got.min() >= -7 and got.max() <= 7
    x = DDIMSampler(b, steps=5).sample(3, seed=1)
    y = DDIMSampler(Bundle.open(w8), steps=5).sample(3, seed=1)
    assert np.isfinite(x).all() and 0 < np.abs(x - y).max() < 0.5


def test_mixed_all_8_bits_equals_w8a8(tiny_model_dir, tmp_path):
    a = mixed(tiny_model_dir, tmp_path / "m8", weight_bits="*=8").path
    b = api.build(str(tiny_model_dir), tmp_path / "w8", BuildConfig(calibration=SMALL, eval_samples=0)).path
    x = DDIMSampler(Bundle.open(a), steps=6).sample(4, seed=3)
    y = DDIMSampler(Bundle.open(b), steps=6).sample(4, seed=3)
    np.testing.assert_array_equal(x, y)


def test_simulated_widths_need_the_flag(tiny_model_dir, tmp_path):
    with pytest.raises(BudgetError, match="--allow-simulated-bits"):
        mixed(tiny_model_dir, tmp_path / "s", weight_bits="*=2")
    assert not (tmp_path / "s").exists()
    out = mixed(tiny_model_dir, tmp_path / "s", weight_bits="*=2", allow_simulated_bits=True).path
    m = json.loads((out / "manifest.json").read_text())
    assert all(t["grid_bits"] == 2 and t["storage_bits"] == 4 for t in m["weights"]["tensors"].values())


def test_budget_build_meets_the_budget(tiny_model_dir, curves, tmp_path):
    m = mixed(tiny_model_dir, tmp_path / "b6", budget="6bits").manifest
    avg = m["plan"]["average_weight_bits"]
    assert all(4 < a <= 6 for a in avg) and m["plan"]["allocator"] == "dp"
    bits = {b for l in m["precision"]["layers"] if l["weight_bits"] for b in l["weight_bits"]}
    assert bits == {4, 8}
    assert len({g["engine"] for g in m["groups"]}) == 1  # shared weights: one engine
    lag = mixed(tiny_model_dir, tmp_path / "l6", budget="6bits", allocator="lagrange").manifest
    # shared weights minimise the sum over the groups
    assert sum(lag["plan"]["predicted_distortion"]) >= sum(m["plan"]["predicted_distortion"]) - 1e-12
    with pytest.raises(BudgetError, match="smallest feasible budget is 4.000 average weight bits"):
        mixed(tiny_model_dir, tmp_path / "b3", budget="3bits")
    # found before any curve is measured (a fresh cache would otherwise spend minutes first)
    import dmcompile.stages as stages

    def no_curves(*a, **k):
        raise AssertionError("curves measured for an infeasible budget")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages, "rd_curves", no_curves)
        with pytest.raises(BudgetError, match="infeasible"):
            mixed(tiny_model_dir, tmp_path / "b3", budget="3bits")


def test_per_group_allocation_and_size_budget(tiny_model_dir, curves, tmp_path):
    m = mixed(tiny_model_dir, tmp_path / "pg", budget="5bits", share_weights=False).manifest
    engines = {g["engine"] for g in m["groups"]}
    # per-group weights, GPTQ-rounded on each group's own moments: one engine per group, one
    # fusion count per engine and the smallest ratio on top
    assert len(engines) == 3 and engines == {"unet_0.onnx", "unet_1.onnx", "unet_2.onnx"}
    assert set(m["build"]["fusion"]["engines"]) == engines and m["build"]["fusion"]["ratio"] == 1.0
    per_layer = [l["weight_bits"] for l in m["precision"]["layers"] if l["weight_bits"]]
    assert len({tuple(col) for col in zip(*per_layer)}) > 1  # this seeded model's groups get different widths
    b = Bundle.open(tmp_path / "pg")
    assert np.isfinite(DDIMSampler(b, steps=6).sample(2, seed=0)).all()
    w8 = sum(4 * l["params"] for l in m["precision"]["layers"]) / 4  # int8 bytes of all weights
    sized = mixed(tiny_model_dir, tmp_path / "sz", budget=f"{int(w8 * 0.8)}B").manifest
    assert sized["plan"]["spent"][0] <= int(w8 * 0.8)


def test_inspect_accounting_and_plots(tiny_model_dir, curves, tmp_path, capsys):
    out = mixed(tiny_model_dir, tmp_path / "i", budget="6bits").path
    assert main(["inspect", str(out), "--plots", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "BOPs per sample" in text and "Conv/Gemm/MatMul layers on disk" in text and "plan: dp allocation" in text
    assert (tmp_path / "plots" / "bits_heatmap.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "rd_curves.png").stat().st_size > 1000
    from dmcompile.inspect import accounting

    acc = accounting(json.loads((out / "manifest.json").read_text()))
    assert acc["weight_size_ratio"] < 0.25 and all(r > 16 for r in acc["bops_reduction"])


def test_cli_analyze_and_bad_budget(tiny_model_dir, tmp_path, capsys):
    assert main(["analyze", str(tiny_model_dir), "-o", str(tmp_path / "c"), "--groups", "3", "--calib-size", "4",
                 "--calib-steps", "6", "--rd-samples", "2", "--rd-weight-bits", "2", "4", "8"]) == 0
    assert (tmp_path / "c" / "curves.json").is_file() and (tmp_path / "c" / "rd_curves.png").is_file()
    assert main(["build", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--format", "mixed",
                 "--budget", "lots"]) == 2
    assert "cannot read budget" in capsys.readouterr().err


def test_bad_stored_weights_are_clear_errors(tiny_model_dir, tmp_path):
    import shutil

    from dmcompile.artifacts import write_manifest
    from dmruntime import BundleError

    out = mixed(tiny_model_dir, tmp_path / "w", weight_bits="*=4").path
    m = json.loads((out / "manifest.json").read_text())
    body = {k: v for k, v in m.items() if k not in ("schema_version", "kind", "files", "dmcompile_version")}

    bad = tmp_path / "garbage"
    shutil.copytree(out, bad)
    (bad / "weights.npz").write_bytes(b"not a zip file")
    write_manifest(bad, body, list(m["files"]))  # hashes match: the content is what is wrong
    with pytest.raises(BundleError, match="cannot read weights weights.npz"):
        Bundle.open(bad)

    dangling = tmp_path / "dangling"
    shutil.copytree(out, dangling)
    engine = next(iter(body["engines"]))
    name = next(iter(body["engines"][engine]["external_weights"]))
    body["engines"][engine]["external_weights"][name] = "nope@4"
    write_manifest(dangling, body, list(m["files"]))
    with pytest.raises(BundleError, match="which the manifest does not list"):
        Bundle.open(dangling)


def test_budget_allocates_around_pinned_and_float_layers(tiny_model_dir, curves, tmp_path):
    m = mixed(tiny_model_dir, tmp_path / "pin", budget="5bits", weight_bits="conv_in=8,conv_out=float").manifest
    by = {l["module"]: l for l in m["precision"]["layers"]}
    assert by["conv_in"]["weight_bits"] == [8, 8, 8]  # pinned
    assert by["conv_out"]["activation"] == "float" and by["conv_out"]["weight_bits"] is None  # kept float
    assert m["plan"]["pinned"] == {by["conv_in"]["node"]: 8}
    # the pinned 8 bits are spent from the same 5-bit average: the rest gets less than 5
    assert all(a <= 5 + 1e-9 for a in m["plan"]["average_weight_bits"])
    params = {l["node"]: l["params"] for l in m["precision"]["layers"] if l["weight_bits"]}
    rest = sum(b["weight_bits"][0] * b["params"] for b in by.values() if b["weight_bits"] and b["module"] != "conv_in")
    n_rest = sum(v for k, v in params.items() if k != by["conv_in"]["node"])
    assert rest / n_rest < 5


def test_float_goes_to_the_group_that_needs_it():
    """Joint allocation with float as a candidate: layer 0 distorts 100x more in group 0 than
    anywhere else, and the BOPs budget leaves room for one float layer; it lands there."""
    from dmcompile.analysis.plan import FLOAT_BITS, bops, plan_bits
    from dmcompile.budget import parse_budget
    from dmcompile.frontend.layermap import Layer

    layers = [Layer(f"n{i}", "Conv", f"m{i}", f"w{i}", [8, 8, 1, 1], False, "x", [1, 8, 4, 4], 1024)
              for i in range(4)]
    G, bits = 3, (4, 8)
    dist = np.tile(np.array([1.0, 0.01]), (G, len(layers), 1))  # [G, L, bits]
    dist[0, 0] *= 100
    w8 = sum(bops(l, 8, 8) for l in layers)
    extra = bops(layers[0], FLOAT_BITS, None) - bops(layers[0], 8, 8)
    # step-weighted average budget: group 0 holds a third of the steps
    budget = parse_budget(f"BOPs={w8 + extra / 3 * 1.01}")
    got, info = plan_bits(dist, layers, bits, bits, budget, "dp", share=False, allow_float=True,
                          group_weights=[1, 1, 1])
    assert got[0, 0] == FLOAT_BITS and (got[0, 1:] == 8).all() and (got[1:] == 8).all()
    assert info["float"] == [["n0"], [], []] and info["joint"]
    assert info["spent_step_weighted"] <= budget.value and info["spent"][0] > budget.value  # group 0 over, the mean under
    # without float the same budget buys nothing more than W8
    got, info = plan_bits(dist, layers, bits, bits, budget, "dp", share=False, group_weights=[1, 1, 1])
    assert (got == 8).all() and "float" not in info


def test_allow_float_bundle(tiny_model_dir, curves, tmp_path, capsys):
    """A budget a little above W8A8 with float allowed: the chosen layers run float in their
    groups' engines (float Conv after fusion), the others stay integer; it samples."""
    from dmcompile.analysis.plan import FLOAT_BITS

    base = mixed(tiny_model_dir, tmp_path / "w8", "*=8").manifest
    w8 = sum(l["bops"][0] for l in base["precision"]["layers"])
    m = mixed(tiny_model_dir, tmp_path / "f", budget=f"BOPs={w8 * 1.1:.0f}", share_weights=False,
              allow_float=True).manifest
    plan = m["plan"]
    assert plan["joint"] and FLOAT_BITS in plan["allowed_bits"] and any(plan["float"])
    assert plan["spent_step_weighted"] <= w8 * 1.1
    layers = {l["node"]: l for l in m["precision"]["layers"]}
    for g, names in enumerate(plan["float"]):
        for n in names:
            assert layers[n]["weight_bits"][g] == FLOAT_BITS and g in layers[n]["float_groups"]
            assert layers[n]["bops"][g] == layers[n]["macs"] * 32 * 32
    # engines: one per distinct plan; an engine whose groups keep layers float has float kernels
    by_engine = {}
    for g in m["groups"]:
        by_engine.setdefault(g["engine"], []).append(g["index"])
    fusion = m["build"]["fusion"].get("engines", {m["engine"]["file"]: m["build"]["fusion"]})
    for engine, groups in by_engine.items():
        floats = len(plan["float"][groups[0]])
        n_float = sum(fusion[engine]["float"].values())
        assert (n_float > 0) == (floats > 0), (engine, floats, fusion[engine])
    assert np.isfinite(DDIMSampler(Bundle.open(tmp_path / "f"), steps=6).sample(2, seed=0)).all()
    # inspect marks the groups that keep a layer float
    assert main(["inspect", str(tmp_path / "f"), "--no-fusion"]) == 0
    text = capsys.readouterr().out
    name = next(n for names in plan["float"] for n in names)
    assert any(name[-56:] in line and "f" in line.split(" w", 1)[1].split()[0] for line in text.splitlines())
    with pytest.raises(Exception, match="needs --budget"):
        MixedRecipe(overrides=parse_overrides("*=4"), allow_float=True)
    assert main(["build", str(tiny_model_dir), "-o", str(tmp_path / "x"), "--allow-float"]) == 2
    assert "--allow-float applies to --format mixed only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_probe_shapes_inferred_equal_the_shape_runs(tiny_cond_dir, monkeypatch):
    """The probe's ranks and batch ratios from symbolic shape inference (SD 1.5's shape runs with
    every tensor as an output passed 22 GB) equal those of the runs it falls back to."""
    from dmcompile import stages
    from dmcompile.analysis import probe as probe_mod

    fp = api.fp_bundle(str(tiny_cond_dir))
    spec, _ = stages.conditioning(fp, SMALL)
    proto, lm = stages.load_graph(fp), stages.load_layer_map(fp)
    tensors = stages.ORT_CPU.layer_input_tensors(proto, lm.layers)
    shape = tuple(stages.Bundle.open(fp).sample_shape)
    feeds = {"sample": np.zeros((2, *shape), np.float32), "timestep": np.zeros(2, np.int64), **spec.dummy(2)}
    assert set(tensors) - set(feeds) <= set(probe_mod.inferred_shapes(proto, feeds, fp))  # inference knows them all
    inferred = probe_mod.make_probe(proto, lm, tensors, shape, conditioning=spec, base_dir=fp)
    monkeypatch.setattr(probe_mod, "inferred_shapes", lambda *a: {})  # as for an op inference does not know
    ran = probe_mod.make_probe(proto, lm, tensors, shape, conditioning=spec, base_dir=fp)
    assert set(inferred.ratio) == set(tensors) and {3, 4} <= set(inferred.ranks.values())  # attention and convs
    assert inferred.ratio == ran.ratio and inferred.ranks == ran.ranks
