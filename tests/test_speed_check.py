"""Issue 26: the build times its engines against the fp32 export (``speed_check``), records the
ratio in the manifest, prints it and says what to do when the bundle is slower; ``dmcompile
bench`` runs the runtime benchmark from the command line."""

import json

import pytest

from dmcompile import api, cli
from dmcompile.config import BuildConfig, CalibrationConfig, ConfigError

SMALL = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)


def build(model, out, **kw):
    return api.build(str(model), out, BuildConfig(calibration=SMALL, eval_samples=0, correction=False, **kw),
                     progress=None)


def test_speed_check_records_both_sides_and_their_ratio(tiny_model_dir, tmp_path):
    m = build(tiny_model_dir, tmp_path / "b", speed_check=True).manifest
    s = m["speed"]
    assert s["reference"] == "fp32 ONNX export on ONNX Runtime" and "int8 features" in s["machine"]
    assert s["calls_per_batch"] == 3 * len(m["groups"])  # three passes through every group
    assert set(s["batches"]) == {"1", "8"}
    for v in s["batches"].values():
        assert v["bundle_ms"] > 0 and v["fp32_ms"] > 0
        assert v["ratio"] == pytest.approx(v["bundle_ms"] / v["fp32_ms"], rel=2e-3)
    assert s["slower"] == any(v["ratio"] > 1 for v in s["batches"].values())
    assert ("advice" in s) == s["slower"]
    text = api.format_report(api.bundle_report(api.open_bundle(tmp_path / "b"), fusion=False))
    assert "speed vs the fp32 ONNX export" in text and "batch 8:" in text


def test_speed_check_off_and_auto(tiny_model_dir, tmp_path):
    assert "speed" not in build(tiny_model_dir, tmp_path / "off", speed_check=False).manifest
    # auto: the tiny UNet is far under 1 GMAC per sample, so it is timed
    assert "speed" in build(tiny_model_dir, tmp_path / "auto").manifest
    with pytest.raises(ConfigError, match="speed_check must be"):
        BuildConfig(speed_check="yes")


def test_auto_leaves_big_models_and_gpu_targets_out(tiny_model_dir, monkeypatch):
    from dmcompile.compiler import measure

    ws = api.check_build(str(tiny_model_dir), BuildConfig())
    assert measure.wants_speed_check(BuildConfig(), ws)
    monkeypatch.setattr(measure, "SPEED_CHECK_MACS", 1)  # as if the model were big
    assert not measure.wants_speed_check(BuildConfig(), ws)
    assert measure.wants_speed_check(BuildConfig(speed_check=True), ws)
    monkeypatch.undo()
    trt = api.check_build(str(tiny_model_dir), BuildConfig(profile="tensorrt"))
    assert not measure.wants_speed_check(BuildConfig(profile="tensorrt"), trt)


def test_a_slower_bundle_is_reported_with_what_to_do(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from dmcompile.compiler import measure

    def slower(bundle, reference, batches=(1, 8), rounds=3):
        return {"reference": "fp32 ONNX export on ONNX Runtime", "machine": "CPU: test", "calls_per_batch": 9,
                "batches": {"1": {"bundle_ms": 3.0, "fp32_ms": 2.0, "ratio": 1.5}}, "slower": True}

    monkeypatch.setattr(measure, "speed_check", slower)
    out = tmp_path / "slow"
    rc = cli.main(["build", str(tiny_model_dir), "-o", str(out), "--groups", "3", "--calib-size", "4",
                   "--calib-steps", "6", "--calib-batch-size", "4", "--eval-samples", "0", "--no-correction",
                   "--speed-check"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "batch 1: 1.50x" in printed and "SLOWER than fp32 here" in printed and "--groups 1" in printed
    advice = json.loads((out / "manifest.json").read_text())["speed"]["advice"]
    assert "--groups 1" in advice and "--target openvino-cpu" in advice and "tensorrt" not in advice and "=float" in advice


def test_bench_command(tiny_model_dir, tiny_export, tmp_path, capsys):
    bundle = build(tiny_model_dir, tmp_path / "tiny-w8a8", speed_check=False).path
    rc = cli.main(["bench", str(bundle), "--compare", str(tiny_export), "--batch", "2", "--steps", "3",
                   "--repeats", "2", "--runs", "1", "--no-memory"])
    out = capsys.readouterr().out
    assert rc == 0 and "int8 features" in out
    rows = [l for l in out.splitlines() if l.startswith("| tiny-w8a8 |")]
    assert len(rows) == 2 and rows[1].split("|")[5].strip() == "1.00x"  # the first bundle is the reference
    assert sum(l.startswith(f"| {tiny_export.name} |") for l in out.splitlines()) == 2
    assert cli.main(["bench", str(tmp_path / "missing")]) == 2
    assert cli.main(["bench", str(bundle), "--repeats", "0"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--repeats must be >= 1" in err


def test_speed_check_visits_every_group_s_engine():
    """Each pass of the build's speed check calls the bundle once per group (7 groups included,
    which the runtime benchmark's stride of 7 steps would not cycle through)."""
    from types import SimpleNamespace

    from dmruntime.bench import speed_check

    class Fake:
        def __init__(self, k):
            self.groups = [SimpleNamespace(t_start=100 * g, t_end=100 * g + 100) for g in range(k)]
            self.sample_shape, self.conditioning, self.seen = (1, 2, 2), None, []

        def predict(self, x, t, cond=None):
            self.seen.append(t)
            return x

    for k in (7, 10):
        b, ref = Fake(k), Fake(1)
        record = speed_check(b, ref, batches=(1,), rounds=2)
        timed = b.seen[k:]  # after the warm-up call of every group
        assert sorted(set(timed)) == [100 * g + 50 for g in range(k)] and len(timed) == 2 * k
        assert record["calls_per_batch"] == 2 * k
