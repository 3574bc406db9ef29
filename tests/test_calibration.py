"""Calibration: observers, groups, and statistics along trajectories."""

import json

import numpy as np
import pytest

from conftest import calibration_arrays

from dmcompile.calibration.observers import HistogramObserver
from dmcompile.quant import fake_quant, qparams
from dmcompile.calibration.trajectory import equal_groups
from dmcompile.config import CalibrationConfig
from dmcompile.errors import ConfigError
from dmruntime import SamplerChoice, group_lookup


def test_equal_groups_partition():
    for k in (1, 3, 10):
        groups = equal_groups(1000, k)
        table = group_lookup(groups, 1000)
        assert len(groups) == k and groups[0].t_start == 0 and groups[-1].t_end == 1000
        assert all(a.t_end == b.t_start for a, b in zip(groups, groups[1:]))
        assert table[0] == 0 and table[999] == k - 1
    assert [(g.t_start, g.t_end) for g in equal_groups(1000, 10)][3] == (300, 400)


def test_histogram_observer_tracks_range_and_quantiles():
    rng = np.random.default_rng(0)
    obs = HistogramObserver(bins=2048)
    chunks = [rng.standard_normal(20000) * s + m for s, m in ((0.1, 0.0), (1.0, 2.0), (3.0, -5.0))]
    for c in chunks:  # the range grows: bins are merged, counts kept
        obs.update(c)
    allv = np.concatenate(chunks)
    assert obs.lo == allv.min() and obs.hi == allv.max()
    assert obs.hist.sum() == pytest.approx(allv.size)
    assert obs.hist.shape == (2048,)  # bounded memory, whatever the number of values
    lo, hi = obs.range_percentile(99.0)
    width = obs.width
    assert lo == pytest.approx(np.percentile(allv, 1.0), abs=3 * width)
    assert hi == pytest.approx(np.percentile(allv, 99.0), abs=3 * width)


def test_histogram_resolution_survives_many_range_extensions():
    """Regression: the window once doubled on every extension (1e7x too wide after 50 updates)."""
    rng = np.random.default_rng(3)
    obs = HistogramObserver(bins=2048)
    for i in range(50):
        obs.update(rng.standard_normal(10000) * (0.1 + 0.05 * i))
    assert obs.width * obs.bins <= 4 * (obs.hi - obs.lo)
    lo, hi = obs.range_percentile(99.0)
    assert -7 < lo < -2 and 2 < hi < 7


def test_subsampled_updates_keep_counts():
    rng = np.random.default_rng(1)
    v = rng.standard_normal(100000)
    obs = HistogramObserver()
    obs.update(v, subsample=v[rng.integers(0, v.size, 5000)])
    assert obs.hist.sum() == pytest.approx(v.size)
    assert obs.lo == v.min() and obs.hi == v.max()


def test_mse_range_beats_minmax_on_heavy_tails():
    rng = np.random.default_rng(2)
    v = rng.standard_t(2, 200000)  # heavy tails: min-max wastes the grid on rare values
    obs = HistogramObserver()
    obs.update(v)
    mm, mse = obs.range_minmax(), obs.range_mse(6)
    err = lambda r: np.mean((v - fake_quant(v, *r, bits=6)) ** 2)  # noqa: E731
    assert mse[1] < mm[1] and err(mse) < 0.7 * err(mm)
    assert mse[0] <= 0 <= mse[1]
    # No symmetric shrink of the min-max range does clearly better than the search.
    best = min(err((mm[0] * f, mm[1] * f)) for f in np.geomspace(0.005, 1, 200))
    assert err(mse) <= 1.05 * best


def test_qparams_grid_holds_zero():
    scale, zp = qparams(-0.3, 4.0)
    assert 0 <= zp <= 255 and fake_quant(np.array([0.0]), -0.3, 4.0)[0] == 0.0
    scale, zp = qparams(-2.0, 1.0, symmetric=True)
    assert zp == 0 and scale == pytest.approx(2.0 / 127)


def test_a_zero_point_shared_by_groups_holds_every_group_s_range():
    """quant.pinned_zero_point / qparams_at (issue 26): each group's grid around the shared zero
    point holds its range (and zero), as tight as that zero point allows; one range alone gets
    its own zero point back; ranges on one side of zero pin the zero point to that end."""
    from dmcompile.quant import pinned_zero_point, qparams_at

    ranges = [(-0.28, 3.0), (-0.28, 5.0), (-0.28, 1.0), (-1.5, 2.0)]
    z = pinned_zero_point(ranges)
    for lo, hi in ranges:
        s = qparams_at(lo, hi, z)
        assert -z * s <= lo + 1e-9 and hi <= (255 - z) * s + 1e-9
        assert s == pytest.approx(max(-lo / z, hi / (255 - z)))  # the tightest grid at z
    cost = lambda zz: sum(np.log(qparams_at(lo, hi, zz)) for lo, hi in ranges)  # noqa: E731
    assert all(cost(z) <= cost(other) + 1e-12 for other in range(256))
    for lo, hi in ranges:
        own = qparams(lo, hi)
        assert abs(pinned_zero_point([(lo, hi)]) - own[1]) <= 1
        assert qparams_at(lo, hi, own[1]) == pytest.approx(own[0], rel=0.01)
    assert pinned_zero_point([(0.0, 1.0), (0.2, 2.0)]) == 0 and pinned_zero_point([(-2.0, -1.0), (-1.0, 0.0)]) == 255
    assert qparams_at(-1.0, 1.0, 0) == float("inf")  # no room below zero


def test_calibration_config_errors():
    with pytest.raises(ConfigError, match="observer"):
        CalibrationConfig(observer="kl")
    with pytest.raises(ConfigError, match="groups"):
        CalibrationConfig(groups=0)
    assert CalibrationConfig.from_dict(CalibrationConfig(groups=3).to_dict()) == CalibrationConfig(groups=3)


def test_stage_configs_roundtrip():
    from dmcompile.config import BuildConfig, EvalConfig, SampleConfig

    from dmcompile.config import MixedRecipe, Override, W8A8Recipe

    b = BuildConfig(recipe=W8A8Recipe(overrides=(Override("last_conv", "float"),)),
                    calibration=CalibrationConfig(groups=4, observer="minmax"))
    assert BuildConfig.from_dict(b.to_dict()) == b
    b = BuildConfig(recipe=MixedRecipe(budget="20MB", allocator="lagrange", overrides=(Override("conv_in", 8),)))
    assert BuildConfig.from_dict(b.to_dict()) == b
    e = EvalConfig(sample=SampleConfig(n=7, eta=0.5))
    assert EvalConfig.from_dict(e.to_dict()) == e
    with pytest.raises(ConfigError, match="has no option"):
        BuildConfig.from_dict({"groups": 3})


CAL = CalibrationConfig(size=3, steps=6, groups=3, batch_size=3)


def test_steps_are_bucketed_into_the_right_groups(tiny_export):
    """Independent of equal_groups / group_lookup: run the same DDIM trajectories, bucket each
    step by hand (K = 3 over T = 1000: [0, 333), [333, 667), [667, 1000)), and compare what
    calibration recorded for the UNet input per group: value counts and exact min / max."""
    from dmcompile import stages
    from dmcompile.calibration.trajectory import CALIB_STREAM
    from dmruntime import Bundle, DDIMSampler

    fp = Bundle.open(tiny_export)
    seen = {0: [], 1: [], 2: []}

    class Recorder:
        sample_shape, schedule = fp.sample_shape, fp.schedule

        def predict(self, x, t):
            seen[0 if t < 333 else 1 if t < 667 else 2].append((t, x.copy()))
            return fp.predict(x, t)

    DDIMSampler(Recorder(), steps=CAL.steps, eta=0.0, batch_size=CAL.batch_size).sample(CAL.size, seed=[CAL.seed,
                                                                                                       CALIB_STREAM])
    # leading spacing, 6 steps: 830, 664, 498, 332, 166, 0
    assert {g: sorted(t for t, _ in v) for g, v in seen.items()} == {0: [0, 166, 332], 1: [498, 664], 2: [830]}
    calib = stages.cached_calibration(tiny_export, CAL)
    per_row = int(np.prod(fp.sample_shape))
    for g, obs in enumerate(calib.observers):
        xs = np.concatenate([x for _, x in seen[g]])
        assert obs["sample"].count == len(seen[g]) * CAL.size * per_row
        np.testing.assert_allclose([obs["sample"].lo, obs["sample"].hi], [xs.min(), xs.max()], rtol=1e-5)


def test_ptq4dm_records_one_step_per_trajectory(tiny_export):
    from dmcompile import stages

    cal = CalibrationConfig(size=8, steps=10, groups=10, batch_size=8, timesteps="ptq4dm")
    calib = stages.cached_calibration(tiny_export, cal)
    counts = [obs["sample"].count for obs in calib.observers]
    per_row = 2 * 8 * 8
    assert sum(counts) == cal.size * per_row  # one recorded step per trajectory, not 10
    # draws from N(0.4 T, 0.2 T): the middle groups get them, some groups none
    assert counts.index(max(counts)) in range(2, 7) and 0 in counts
    # an empty group falls back to the range pooled over all groups
    ranges = calib.ranges()
    empty = counts.index(0)
    pooled = (min(o["sample"].lo for o in calib.observers), max(o["sample"].hi for o in calib.observers))
    assert ranges[empty]["sample"] == (min(pooled[0], 0.0), max(pooled[1], 0.0))


@pytest.mark.parametrize("observer", ["percentile", "minmax"])
def test_observer_choice_reaches_the_bundle(tiny_model_dir, tmp_path, observer):
    """End to end: the scale a bundle feeds for the UNet input in each group is the chosen
    observer's range of that group, on the 8-bit asymmetric grid whose zero point the groups share
    (the UNet input feeds a Conv: ort-cpu keeps Conv zero points constant in its shared engine)."""
    import onnx

    from dmcompile import api
    from dmcompile.config import BuildConfig
    from dmcompile.quant import pinned_zero_point, qparams_at

    cal = CalibrationConfig(size=3, steps=6, groups=3, batch_size=3, observer=observer)
    out = api.build(str(tiny_model_dir), tmp_path / observer, BuildConfig(calibration=cal, eval_samples=0,
                                                                          correction=False)).path
    calib = api.calibrate(str(tiny_model_dir), cal)
    ranges = calib.ranges()
    mse = api.calibrate(str(tiny_model_dir), CalibrationConfig(size=3, steps=6, groups=3, batch_size=3)).ranges()
    engine = {i.name: i for i in onnx.load(str(out / "unet.onnx"), load_external_data=False).graph.initializer}
    zp = int(onnx.numpy_helper.to_array(engine["sample.q_zero_point"]))
    assert zp == pinned_zero_point([r["sample"] for r in ranges])
    for g in range(3):
        got = np.load(out / f"group_{g:02d}.npz")
        lo, hi = calib.observers[g]["sample"].range(observer, 8, cal.percentile)
        assert got["sample.q_scale"] == pytest.approx(qparams_at(lo, hi, zp), rel=1e-6)
        assert "sample.q_zero_point" not in got.files
        assert (lo, hi) == ranges[g]["sample"]
    differ = [t for t in calib.tensors for g in range(3) if ranges[g][t] != mse[g][t]]
    assert len(differ) > len(calib.tensors) // 2  # the observer changed the ranges


@pytest.mark.parametrize("stop_after", [1, 2])
def test_an_interrupted_calibration_resumes_to_the_same_result(tiny_export, tmp_path, monkeypatch, stop_after):
    """Stopped after a chunk (Ctrl-C in the middle of the next one), then run again: it skips the
    committed chunks and ends with the histograms and second moments of a pass never stopped."""
    from dmcompile import stages

    # three chunks of two trajectories; tensors subsampled, so the random state must carry over too
    cfg = CalibrationConfig(size=6, steps=4, groups=2, batch_size=2, sample_per_tensor=1024)
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "whole"))
    whole = calibration_arrays(stages.cached_calibration(tiny_export, cfg, moments="pooled"))

    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "stopped"))
    calls = []

    def interrupt(*args):
        calls.append(args)
        if len(calls) == stop_after * cfg.steps + 2:  # two steps into the next chunk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.cached_calibration(tiny_export, cfg, progress=interrupt, moments="pooled")
    partial = next((tmp_path / "stopped" / "calib").glob("*.partial"))
    assert json.loads((partial / "state" / "state.json").read_text())["done"] == 2 * stop_after
    seen = []
    resumed = stages.cached_calibration(tiny_export, cfg, moments="pooled", progress=lambda *a: seen.append(a))
    assert any("resuming after" in str(a[0]) for a in seen)
    assert sum(1 for a in seen if len(a) == 2) == (3 - stop_after) * cfg.steps  # only the chunks left ran
    got = calibration_arrays(resumed)
    assert sorted(got) == sorted(whole)
    for k in whole:
        np.testing.assert_array_equal(got[k], whole[k], err_msg=k)
    assert not partial.exists()  # the saved calibration replaces the checkpoint


def test_chunked_recording_equals_one_pass_when_the_chunk_holds_every_trajectory(tiny_export, tmp_path):
    from dmcompile.calibration.recorder import record_chunk, record_trajectories
    from dmruntime import Bundle

    fp = Bundle.open(tiny_export)

    def recorder(key):
        return lambda x, t, c, got: calls[key].append((t, x.copy()))

    def run(x, t, c):
        return {"eps": fp.predict(x, t)}

    for sampling in (SamplerChoice("ddim", 3), SamplerChoice("dpmpp-2m", 3)):
        calls = {"one": [], "chunks": []}
        record_trajectories(run, fp.schedule, fp.sample_shape, [recorder("one")], n=4, sampling=sampling, seed=5,
                            batch_size=4)
        record_chunk(run, fp.schedule, fp.sample_shape, [recorder("chunks")], n=4, sampling=sampling, seed=5,
                     chunk=4, index=0)
        assert [t for t, _ in calls["one"]] == [t for t, _ in calls["chunks"]]
        for (_, a), (_, b) in zip(calls["one"], calls["chunks"]):
            np.testing.assert_array_equal(a, b)


def test_a_stochastic_sampler_records_the_same_chunks_in_any_order(tiny_export):
    """Euler ancestral draws noise every step: each chunk (a calibration shard) draws from a stream
    of its own, so chunk 1 run alone, in another order or process, records what a run of both does."""
    from dmcompile.calibration.recorder import record_chunk
    from dmruntime import Bundle

    fp = Bundle.open(tiny_export)
    runs = {"both": [], "alone": []}

    def run(x, t, c):
        return {"eps": fp.predict(x, t)}

    for key, chunks in (("both", (0, 1)), ("alone", (1,))):
        for index in chunks:
            record_chunk(run, fp.schedule, fp.sample_shape, [lambda x, t, c, got, k=key: runs[k].append(x.copy())],
                         n=4, sampling=SamplerChoice("euler-a", 4), seed=5, chunk=2, index=index)
    assert len(runs["both"]) == 2 * len(runs["alone"]) == 8
    for a, b in zip(runs["both"][4:], runs["alone"]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs["both"][0], runs["alone"][0])  # chunk 0's rows are other trajectories


def test_a_pass_whose_checkpoint_another_pass_holds_records_without_one(tiny_export, tmp_path, monkeypatch):
    import os

    from dmcompile import scratch, stages

    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "c"))
    cfg = CalibrationConfig(size=4, steps=4, groups=2, batch_size=2)
    path = stages.cache_dir() / "calib" / f"{tiny_export.name}-{stages.calibration_key(cfg, stages.ORT_CPU, None, None)}"
    partial = path.with_name(path.name + ".partial")
    partial.mkdir(parents=True)
    fd = scratch.try_lock(partial)  # as a concurrent pass of the same entry would
    try:
        result = stages.cached_calibration(tiny_export, cfg, moments="pooled")
        assert result.moments is not None and (path / "calibration.json").is_file()
        assert scratch.try_lock(partial) is None  # still the other pass's, untouched by this one
    finally:
        os.close(fd)
