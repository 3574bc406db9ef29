"""Conditional UNets: class labels and cross-attention embeddings through export, calibration,
build and the runtime; classifier-free guidance against diffusers' arithmetic; bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import D, L, embeddings, run_without_torch
from diffusers import DDIMScheduler
from dmruntime import Bundle, DDIMSampler, InputError

from dmcompile import api
from dmcompile.backends.onnxruntime import ort_fusion_report
from dmcompile.cli import main
from dmcompile.config import BuildConfig, CalibrationConfig
from dmcompile.errors import ConfigError, ModelError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("which", ["cond", "class"])
def test_export_parity_and_inputs(which, tiny_cond_dir, tiny_class_dir, tmp_path):
    folder = tiny_cond_dir if which == "cond" else tiny_class_dir
    res = api.export(str(folder), tmp_path / "e")
    assert res.parity_max_abs_err <= 1e-4  # parity runs at another batch size and sequence length than the trace
    m = json.loads((tmp_path / "e" / "manifest.json").read_text())
    names = [i["name"] for i in m["model"]["inputs"]]
    if which == "cond":
        assert names == ["sample", "timestep", "encoder_hidden_states"] and m["model"]["class"] == "UNet2DConditionModel"
        assert m["conditioning"]["inputs"][0]["shape"] == [None, None, D]
        # the layer map covers the cross-attention projections; to_k / to_v read the conditioning
        lm = res.layer_map
        kv = [l for l in lm.layers if l.module.endswith(("attn2.to_k", "attn2.to_v"))]
        assert kv and all(l.op_type == "MatMul" and l.weight for l in kv)
        assert all(l.activation_input == "encoder_hidden_states" for l in kv)
    else:
        assert names == ["sample", "timestep", "class_labels"] and m["conditioning"]["num_classes"] == 5


def diffusers_guided(unet, scheduler_config, x, steps, scale, cond, null):
    """Reference: diffusers' DDIMScheduler and the pipelines' guidance, [null; cond] in one batch."""
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    x = torch.from_numpy(x)
    both = torch.from_numpy(np.concatenate([null, cond]))
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=both).sample
            u, c = out.chunk(2)
            x = sched.step(u + scale * (c - u), t, x).prev_sample
    return x.numpy()


def test_guided_ddim_matches_diffusers(tiny_cond_dir, tmp_path):
    """The runtime's guided DDIM tracks diffusers' scheduler and pipeline guidance over 50 steps,
    over the PyTorch UNet and over its ONNX export. Guidance 4 amplifies float32 rounding along the
    trajectory, by how much depends on the CPU's kernels, so the bound is measured: diffusers'
    own run from x_T moved by one float32 ulp."""
    from dmcompile.frontend.torch_model import TorchEpsModel

    exp = api.export(str(tiny_cond_dir), tmp_path / "e").path
    loaded = api.load_model(str(tiny_cond_dir))
    n = 3
    cond, null = embeddings(n, 1), np.zeros((1, L, D), np.float32)
    x_T = np.random.default_rng(2).standard_normal((n, 4, 8, 8)).astype(np.float32)
    nulls = np.repeat(null, n, 0)
    want = diffusers_guided(loaded.unet, loaded.scheduler_config, x_T, 50, 4.0, cond, nulls)
    nudged = diffusers_guided(loaded.unet, loaded.scheduler_config, np.nextafter(x_T, np.inf), 50, 4.0, cond, nulls)
    floor = float(np.abs(nudged - want).max())
    assert 0 < floor < 1e-3  # rounding noise, not a different trajectory
    same_unet = DDIMSampler(TorchEpsModel(loaded, null={"encoder_hidden_states": null[0]}), steps=50,
                            guidance_scale=4.0).run(x_T, cond={"encoder_hidden_states": cond})
    sampler = DDIMSampler(Bundle.open(exp), steps=50, guidance_scale=4.0, null_cond={"encoder_hidden_states": null[0]})
    got = sampler.run(x_T, cond={"encoder_hidden_states": cond})
    for ours in (same_unet, got):
        assert np.abs(ours - want).max() <= 4 * floor, (np.abs(ours - want).max(), floor)


def test_conditional_bundles_run_integer_kernels(cond_bundle, class_bundle):
    for b in (cond_bundle, class_bundle):
        rep = ort_fusion_report(b / "unet.onnx")
        assert rep["float"] == {} and rep["ratio"] == 1.0, rep
    m = json.loads((cond_bundle / "manifest.json").read_text())
    assert m["conditioning"]["null"] == {"file": "null_condition.npz"} and "null_condition.npz" in m["files"]
    assert m["calibration"]["guidance_scale"] == 3.0 and m["fidelity"]["guidance_scale"] == 3.0
    nulls = np.load(class_bundle / "null_condition.npz")
    assert int(nulls["class_labels"]) == 4


def _trajectory(model, cond, n, guidance, null):
    """(x_t, t) of every step of a guided fp run."""
    seen = []

    class Rec:
        sample_shape, schedule, conditioning = model.sample_shape, model.schedule, model.conditioning

        def predict(self, x, t, c=None):
            seen.append((x[len(x) // 2:].copy(), t))  # the conditional half
            return model.predict(x, t, c)

    DDIMSampler(Rec(), steps=10, guidance_scale=guidance, null_cond=null).sample(n, seed=3, cond=cond)
    return seen


def test_quantized_conditional_bundles_track_fp(cond_bundle, class_bundle, tiny_cond_dir, tiny_class_dir):
    """Per UNet call along guided fp trajectories, the W8A8 engines stay within 10% relative
    error of fp32, and the conditioning changes the output."""
    cases = [(cond_bundle, tiny_cond_dir, {"encoder_hidden_states": embeddings(2, 5)}, 3.0),
             (class_bundle, tiny_class_dir, {"class_labels": np.array([0, 3])}, 2.0)]
    for bundle, folder, cond, scale in cases:
        q, fp = Bundle.open(bundle, correction=False), Bundle.open(api.fp_bundle(str(folder)))
        errs = []
        for x, t in _trajectory(fp, cond, 2, scale, q.conditioning.null):
            a, b = q.predict(x, t, cond), fp.predict(x, t, cond)
            errs.append(np.linalg.norm(a - b) / np.linalg.norm(b))
        assert np.median(errs) < 0.1, errs
        x, t = _trajectory(fp, cond, 2, scale, q.conditioning.null)[5]
        other = {k: v[::-1].copy() for k, v in cond.items()}
        assert not np.allclose(fp.predict(x, t, cond), fp.predict(x, t, other))


def test_calibration_records_both_guided_branches(tiny_class_dir):
    """Guided calibration sees twice the rows of unguided calibration at every step."""
    plain = api.calibrate(str(tiny_class_dir), CalibrationConfig(size=2, steps=6, groups=3, batch_size=2))
    fp = api.fp_bundle(str(tiny_class_dir))
    from dmcompile import stages

    guided = stages.cached_calibration(fp, CalibrationConfig(size=2, steps=6, groups=3, batch_size=2, guidance_scale=2.0),
                              null_class=4)
    for a, b in zip(plain.observers, guided.observers):
        assert b["sample"].count == 2 * a["sample"].count


def test_runtime_samples_conditional_bundles_without_torch(cond_bundle, class_bundle, tmp_path):
    run_without_torch(f"""
        import numpy as np
        from dmruntime import Bundle, DDIMSampler
        e = np.random.default_rng(0).standard_normal((1, {L}, {D})).astype(np.float32)
        x = DDIMSampler(Bundle.open({str(cond_bundle)!r}), steps=5, guidance_scale=3.0).sample(
            2, seed=0, cond={{"encoder_hidden_states": e}})
        y = DDIMSampler(Bundle.open({str(class_bundle)!r}), steps=5, eta=1.0, guidance_scale=2.0).sample(
            3, seed=0, cond={{"class_labels": np.array([0, 1, 2])}})
        assert x.shape == (2, 4, 8, 8) and y.shape == (3, 2, 8, 8) and np.isfinite(x).all() and np.isfinite(y).all()
    """, tmp_path)


def test_bad_conditioning_is_a_clear_error(cond_bundle, class_bundle, tiny_export):
    b, k = Bundle.open(cond_bundle), Bundle.open(class_bundle)
    x = np.zeros((2, 4, 8, 8), np.float32)
    with pytest.raises(InputError, match="axis 2 has size 16, the model wants 12"):
        b.predict(x, 5, {"encoder_hidden_states": np.zeros((2, L, 16), np.float32)})
    with pytest.raises(InputError, match="3 axes needed, 2 given"):  # the sequence axis is missing
        b.predict(x, 5, {"encoder_hidden_states": np.zeros((2, D), np.float32)})
    with pytest.raises(InputError, match="needs conditioning"):
        b.predict(x, 5)
    with pytest.raises(InputError, match="must be float32"):
        b.predict(x, 5, {"encoder_hidden_states": np.zeros((2, L, D), np.int64)})
    xk = np.zeros((2, 2, 8, 8), np.float32)
    with pytest.raises(InputError, match=r"class labels must be in \[0, 5\)"):
        k.predict(xk, 5, {"class_labels": np.array([0, 5])})
    with pytest.raises(InputError, match="unknown conditioning input"):
        k.predict(xk, 5, {"class_labels": np.array([0, 1]), "text": np.zeros(2)})
    with pytest.raises(InputError, match="this bundle has none"):  # a plain export has no null condition
        DDIMSampler(Bundle.open(api.fp_bundle(b.manifest["model"]["source"])), steps=2, guidance_scale=2.0).sample(
            1, cond={"encoder_hidden_states": np.zeros((1, L, D), np.float32)})
    with pytest.raises(InputError, match="unconditional"):
        Bundle.open(tiny_export).predict(np.zeros((1, 2, 8, 8), np.float32), 5, {"class_labels": np.array([1])})


def test_cli_conditional_sampling_and_errors(cond_bundle, class_bundle, tiny_export, tmp_path, capsys):
    assert main(["sample", str(class_bundle), "--class", "3", "--guidance", "2.5", "-n", "2", "--steps", "3",
                 "-o", str(tmp_path / "k.png")]) == 0
    assert "guidance 2.5" in capsys.readouterr().out
    assert main(["sample", str(class_bundle), "--class", "3", "-n", "2", "--steps", "3",
                 "-o", str(tmp_path / "k.png")]) == 0
    assert "guidance 2" in capsys.readouterr().out  # the scale the bundle was calibrated with
    np.savez(tmp_path / "e.npz", encoder_hidden_states=embeddings(1))
    assert main(["sample", str(cond_bundle), "--conditions", str(tmp_path / "e.npz"), "--guidance", "3", "-n", "2",
                 "--steps", "3", "-o", str(tmp_path / "c.png")]) == 0
    capsys.readouterr()
    assert main(["sample", str(class_bundle), "--class", "7", "-n", "2", "--steps", "3", "-o",
                 str(tmp_path / "x.png")]) == 2
    assert "class labels must be in [0, 5)" in capsys.readouterr().err
    np.savez(tmp_path / "wide.npz", encoder_hidden_states=np.zeros((1, L, 16), np.float32))
    assert main(["sample", str(cond_bundle), "--conditions", str(tmp_path / "wide.npz"), "-n", "2", "--steps", "3",
                 "-o", str(tmp_path / "y.png")]) == 2
    assert "the model wants 12" in capsys.readouterr().err
    assert main(["sample", str(cond_bundle), "-n", "2", "--steps", "3", "-o", str(tmp_path / "z.png")]) == 2
    assert "pass them with --conditions" in capsys.readouterr().err
    assert main(["sample", str(tiny_export), "--class", "1", "-n", "2", "-o", str(tmp_path / "u.png")]) == 2
    assert "not a conditional bundle" in capsys.readouterr().err
    assert not any((tmp_path / f).exists() for f in ("x.png", "y.png", "z.png", "u.png"))


def test_cli_build_rejects_bad_conditions(tiny_cond_dir, tiny_class_dir, tmp_path, capsys):
    np.savez(tmp_path / "wide.npz", encoder_hidden_states=np.zeros((2, L, 16), np.float32))
    base = ["--groups", "2", "--calib-size", "2", "--calib-steps", "3", "--eval-samples", "0"]
    assert main(["build", str(tiny_cond_dir), "-o", str(tmp_path / "a"), "--calib-conditions",
                 str(tmp_path / "wide.npz"), *base]) == 2
    assert "the model wants 12" in capsys.readouterr().err
    assert main(["build", str(tiny_cond_dir), "-o", str(tmp_path / "b"), "--guidance", "2", *base]) == 2
    assert "needs a null condition" in capsys.readouterr().err
    assert main(["build", str(tiny_class_dir), "-o", str(tmp_path / "c"), "--null-class", "9", *base]) == 2
    assert "outside the model's classes [0, 5)" in capsys.readouterr().err
    assert not any((tmp_path / f).exists() for f in "abc")


def test_rd_inputs_carry_both_guided_branches_and_are_fed(tiny_class_dir):
    """RD curves and the step-aware check see the conditions the guided sampler produces
    ([null; cond] rows), and the probe really feeds them: its fp32 output on those rows is the
    export's output for the same conditions, not for some other class."""
    from dmcompile import stages
    from dmcompile.config import AnalysisConfig
    from dmcompile.targets import ORT_CPU

    cal = CalibrationConfig(size=3, steps=6, groups=2, batch_size=4, guidance_scale=2.0)
    fp = api.fp_bundle(str(tiny_class_dir))
    conditions = stages.conditioning(fp, cal, null_class=4)
    calib = stages.cached_calibration(fp, cal, conditions=conditions, moments="pooled")  # GPTQ rounds the probe's weights
    probe, X, T, C, bundle = stages.probe_inputs(fp, ORT_CPU.layer_input_tensors, calib,
                                                 AnalysisConfig(samples_per_group=6), conditions)
    labels = C["class_labels"]
    assert labels.shape == X.shape[:2] == T.shape
    assert 4 in labels and set(np.unique(labels)) - {4}  # both branches: the null class and the asked ones
    x, t, c = X[0], T[0], {"class_labels": labels[0]}
    out = probe.run(x, t, cond=c)
    want = np.concatenate([bundle.predict(x[i:i + 1], int(t[i]), {"class_labels": c["class_labels"][i:i + 1]})
                           for i in range(len(x))])
    np.testing.assert_allclose(out, want, atol=1e-5)
    other = probe.run(x, t, cond={"class_labels": (c["class_labels"] + 1) % 5})
    assert np.abs(other - out).max() > 1e-3
    with pytest.raises(ModelError, match="takes conditioning"):
        probe.run(x, t)


def test_rd_cache_keys_on_the_conditions(tiny_class_dir):
    from dmcompile import stages
    from dmcompile.config import AnalysisConfig

    cal = CalibrationConfig(size=3, steps=6, groups=2, guidance_scale=2.0)
    fp = api.fp_bundle(str(tiny_class_dir))
    calib = type("C", (), {"config": cal})()
    a = stages.rd_record(calib, AnalysisConfig(), stages.conditioning(fp, cal, null_class=4))
    b = stages.rd_record(calib, AnalysisConfig(), stages.conditioning(fp, cal, null_class=3))
    assert a["conditions"] != b["conditions"] and stages.rd_key(a) != stages.rd_key(b)
    plain = stages.rd_record(calib, AnalysisConfig(), None)
    assert "conditions" not in plain


def test_mixed_and_step_aware_builds_of_a_guided_cross_attention_model(tiny_cond_dir, cond_file, tmp_path):
    """RD allocation under a budget and PTQD's step-aware check on a guided conditional model:
    the plan meets the budget, the cross-attention projections get widths, it samples."""
    cal = CalibrationConfig(size=4, steps=6, groups=2, batch_size=4, guidance_scale=3.0, conditions=str(cond_file))
    from dmcompile.config import AnalysisConfig, MixedRecipe

    cfg = BuildConfig(calibration=cal, recipe=MixedRecipe(budget="6bits"), step_aware=True, eval_samples=0,
                      correction=False, analysis=AnalysisConfig(samples_per_group=4))
    res = api.build(str(tiny_cond_dir), tmp_path / "b", cfg)
    m = res.manifest
    assert max(m["plan"]["average_weight_bits"]) <= 6.0 + 1e-9
    assert "conditions" in m["plan"]["curves"]["config"]
    kv = [l for l in m["precision"]["layers"] if l["node"].endswith(("to_k/MatMul", "to_v/MatMul"))
          and "attn2" in l["node"]]
    assert kv and all(set(l["weight_bits"]) <= {4, 8} for l in kv)
    sa = m["step_aware_activation"]["groups"]
    assert len(sa) == 2 and all(np.isfinite(float(v)) for g in sa for v in g["quantized_snr_db"].values())
    b = Bundle.open(res.path)
    x = DDIMSampler(b, steps=4, guidance_scale=3.0).sample(2, cond={"encoder_hidden_states": embeddings(2)})
    assert x.shape == (2, *b.sample_shape) and np.isfinite(x).all()


@pytest.mark.parametrize("key,value,needle", [
    ("addition_embed_type", "image", "added_cond_kwargs image_embeds"),
    ("addition_embed_type", "image_hint", "image_embeds and hint"),
    ("addition_embed_type", "text_time", "projection_class_embeddings_input_dim"),  # SDXL's, without its widths
    ("time_cond_proj_dim", 8, "timestep_cond"),
    ("encoder_hid_dim_type", "text_proj", "encoder_hid_proj"),
])
def test_unsupported_conditional_features_name_the_missing_input(key, value, needle, tiny_cond_dir, tmp_path):
    import shutil

    d = shutil.copytree(tiny_cond_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=needle):
        api.load_model(str(d))


def test_unconditional_models_refuse_conditions(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="unconditional"):
        api.build(str(tiny_model_dir), tmp_path / "o", BuildConfig(null_class=1, calibration=CalibrationConfig(
            size=2, steps=3, groups=1)))
    assert not (tmp_path / "o").exists()


def test_class_accuracy_counts_requested_classes(monkeypatch):
    """class_accuracy compares the classifier's top class with the requested labels."""
    from dmcompile import api as dm

    probs = np.eye(10)[[3, 3, 7, 1]]
    monkeypatch.setattr(dm, "_scorer", lambda: (lambda images: (None, probs)))
    assert dm.class_accuracy(np.zeros((4, 1, 16, 16), np.float32), np.array([3, 2, 7, 1])) == 0.75


def test_eval_reports_class_accuracy_for_class_conditional_digits(tmp_path):
    """A 16x16 one-channel class-conditional model is scored by the digit classifier."""
    from conftest import make_model_folder

    cfg = {"sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
           "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "num_class_embeds": 11}
    folder = make_model_folder(tmp_path / "m", cfg)
    exp = api.export(str(folder), tmp_path / "e").path
    res = api.evaluate(exp, api.EvalConfig(sample=api.SampleConfig(n=4, steps=2)),
                       cond={"class_labels": np.array([0, 1, 2, 3])})
    d = res.report["digits"]
    assert 0.0 <= d["class_accuracy"] <= 1.0 and d["class_accuracy"] == d["fp_class_accuracy"]
