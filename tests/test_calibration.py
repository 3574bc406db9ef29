"""Calibration: observers, groups, and statistics along trajectories."""

import numpy as np
import pytest

from dmcompile.calibration.observers import HistogramObserver, fake_quant, qparams
from dmcompile.calibration.trajectory import equal_groups
from dmcompile.config import CalibrationConfig
from dmcompile.errors import ConfigError
from dmruntime import group_lookup


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


def test_calibration_config_errors():
    with pytest.raises(ConfigError, match="observer"):
        CalibrationConfig(observer="kl")
    with pytest.raises(ConfigError, match="groups"):
        CalibrationConfig(groups=0)
    assert CalibrationConfig.from_dict(CalibrationConfig(groups=3).to_dict()) == CalibrationConfig(groups=3)


def test_stage_configs_roundtrip():
    from dmcompile.config import BuildConfig, EvalConfig, SampleConfig

    b = BuildConfig(float_layers=("last_conv",), calibration=CalibrationConfig(groups=4, observer="minmax"))
    assert BuildConfig.from_dict(b.to_dict()) == b
    e = EvalConfig(sample=SampleConfig(n=7, eta=0.5))
    assert EvalConfig.from_dict(e.to_dict()) == e
    with pytest.raises(ConfigError, match="has no option"):
        BuildConfig.from_dict({"groups": 3})
