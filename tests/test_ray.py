"""Calibration shards and RD probes as Ray tasks (``--ray``): the same statistics, curves and
engines, bit for bit, on a local cluster of 2 workers and on a simulated cluster of several
nodes; a worker killed mid-task, a run interrupted and resumed, a worker of another dmcompile, a
model file no node sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
from conftest import calibration_arrays

from dmcompile import api, parallel
from dmcompile.analysis import probe as probe_mod
from dmcompile.analysis.rd import _Rows, run_batch
from dmcompile.cli import main
from dmcompile.config import AnalysisConfig, BuildConfig, CalibrationConfig, MixedRecipe
from dmcompile.errors import ClusterError, ConfigError

pytestmark = pytest.mark.slow

SMALL = CalibrationConfig(size=6, steps=6, groups=3, batch_size=2)  # three shards
ANALYSIS = AnalysisConfig(samples_per_group=2, weight_bits=(2, 4, 8), act_bits=(6, 8))  # GPTQ: moments too


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    """The kill-once file: present, nothing dies; a test that removes it has its next task's worker killed."""
    path = tmp_path_factory.mktemp("ray") / "killed"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def local(marker):
    """One local Ray cluster of 2 CPUs for the module's tests (started with the kill-once hook set)."""
    os.environ[parallel.KILL_ONCE_ENV] = str(marker)
    pool = parallel.RayPool(parallel.LOCAL, workers=2)
    yield pool
    pool.close()
    os.environ.pop(parallel.KILL_ONCE_ENV, None)


@pytest.fixture(scope="module")
def serial(tiny_model_dir, tmp_path_factory):
    os.environ["DMCOMPILE_CACHE"] = str(tmp_path_factory.mktemp("serial-cache"))
    try:
        return api.analyze(str(tiny_model_dir), ANALYSIS, SMALL)
    finally:
        del os.environ["DMCOMPILE_CACHE"]


def _same(a, b) -> None:
    assert a.layers == b.layers and a.tensors == b.tensors
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.act, b.act)


def test_curves_on_two_workers_equal_the_serial_run(local, serial, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    assert serial.run == {"workers": 1, "ray": None}
    got = api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, out=tmp_path / "curves", ray=parallel.LOCAL)
    _same(got, serial)
    assert got.run == {"workers": 2, "ray": "local"}
    assert json.loads((tmp_path / "curves" / "curves.json").read_text())["run"] == {"workers": 2, "ray": "local"}


def test_calibration_shards_on_two_workers_equal_the_serial_pass(local, tiny_model_dir, tmp_path, monkeypatch):
    from dmcompile import stages

    fp = api.fp_bundle(str(tiny_model_dir))
    got = {}
    for name, pool in (("serial", parallel.SerialPool()), ("ray", local)):
        monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / name))
        result = stages.cached_calibration(fp, SMALL, moments="groups", pool=pool)
        assert result.run == pool.describe()
        got[name] = calibration_arrays(result, SMALL.groups)
    assert sorted(got["serial"]) == sorted(got["ray"]) and any(k.startswith("H:") for k in got["ray"])
    for k, v in got["serial"].items():
        np.testing.assert_array_equal(got["ray"][k], v, err_msg=k)


def test_an_interrupted_ray_calibration_resumes_after_the_folded_shards(local, tiny_model_dir, tmp_path, monkeypatch):
    from dmcompile import stages

    fp = api.fp_bundle(str(tiny_model_dir))
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "serial"))
    whole = calibration_arrays(stages.cached_calibration(fp, SMALL, moments="groups"), SMALL.groups)
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "ray"))
    folds = []

    def stop(*args):
        folds.append(args)
        if len(folds) == 2:  # after the second shard is folded and committed
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.cached_calibration(fp, SMALL, moments="groups", pool=local, progress=stop)
    partial = next((tmp_path / "ray" / "calib").glob("*.partial"))
    assert json.loads((partial / "state" / "state.json").read_text())["done"] == 2 * SMALL.batch_size
    said = []
    resumed = stages.cached_calibration(fp, SMALL, moments="groups", pool=local, progress=lambda *a: said.append(a))
    assert any("resuming after 4 of 6" in str(a[0]) for a in said)
    got = calibration_arrays(resumed, SMALL.groups)
    assert sorted(got) == sorted(whole)
    for k, v in whole.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_interrupted_ray_run_resumes_with_the_jobs_done(local, serial, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    seen = []

    def stop(stage, i, n):
        if stage == "rd curves":
            seen.append(i)
            if len(seen) == 6:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, ray=parallel.LOCAL, progress=stop)
    assert list((tmp_path / "cache" / "rd").glob("*.partial/partial.npz"))
    again = []
    resumed = api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, ray=parallel.LOCAL,
                          progress=lambda s, i, n: s == "rd curves" and again.append(i))
    assert again[0] > 6  # the jobs done before the interruption were not run again
    _same(resumed, serial)


def test_a_worker_killed_mid_task_is_retried(local, serial, marker, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    marker.unlink()  # the next task's worker kills itself (parallel._run)
    got = api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, ray=parallel.LOCAL)
    pid = int(marker.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # that worker is gone: Ray ran its task again elsewhere
    _same(got, serial)


def test_a_worker_of_another_dmcompile_is_refused(local, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(parallel, "identity", lambda: "dmcompile 9.9 (source 000000000000)")
    with pytest.raises(ClusterError, match="install the same dmcompile on every node"):
        api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, ray=parallel.LOCAL)
    out = tmp_path / "curves"
    assert main(["analyze", str(tiny_model_dir), "-o", str(out), "--ray", "--calib-size", "4", "--calib-steps", "6",
                 "--groups", "3", "--rd-samples", "2", "--rd-weight-bits", "2", "4", "8", "--rounding", "rtn"]) == 2
    assert "the driver dmcompile 9.9" in capsys.readouterr().err and not out.exists()


def test_workers_read_a_big_model_from_the_shared_path(local, serial, tiny_model_dir, tmp_path, monkeypatch):
    """Past SHIP_BYTES the probe graph is not shipped: workers open the export's model file."""
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    shipped = []
    real = probe_mod.Probe.for_workers
    monkeypatch.setattr(probe_mod.Probe, "for_workers",
                        lambda self, ship_bytes=0: shipped.append(real(self, 0)) or shipped[-1])
    got = api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, ray=parallel.LOCAL)
    assert shipped and shipped[0].fp is None and Path(shipped[0].source).is_file()
    _same(got, serial)


def test_mixed_build_on_ray_writes_the_same_engines(local, tiny_model_dir, tmp_path, monkeypatch):
    from dmcompile.budget import parse_budget

    built = {}
    for name, address in (("serial", None), ("ray", parallel.LOCAL)):
        monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / f"cache-{name}"))
        cfg = BuildConfig(recipe=MixedRecipe(budget=parse_budget("6bits")), calibration=SMALL, analysis=ANALYSIS,
                          eval_samples=0, correction=False, speed_check=False, ray=address)
        built[name] = api.build(str(tiny_model_dir), tmp_path / name, cfg)
    files = sorted(p.name for p in built["serial"].path.iterdir() if p.suffix in (".onnx", ".npz", ".data"))
    assert files
    for f in files:
        assert (built["serial"].path / f).read_bytes() == (built["ray"].path / f).read_bytes(), f
    assert built["ray"].manifest["plan"]["curves"]["run"] == {"workers": 2, "ray": "local"}
    assert built["ray"].manifest["build"]["calibration_run"] == {"workers": 2, "ray": "local"}
    assert built["serial"].manifest["plan"]["curves"]["run"] == {"workers": 1, "ray": None}


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("euler-a", 0.0)])
def test_eval_sampling_on_two_workers_equals_the_serial_run(local, tiny_model_dir, tmp_path_factory, monkeypatch,
                                                            sampler, eta):
    """Deterministic and stochastic samplers: shards of batch_size rows, noise drawn for the whole
    batch and sliced, so the bundle's and the reference's samples are the same arrays."""
    from dmcompile.config import EvalConfig, SampleConfig

    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path_factory.getbasetemp() / "eval-cache"))
    out = tmp_path_factory.getbasetemp() / "eval-bundle"
    if not (out / "manifest.json").is_file():
        api.build(str(tiny_model_dir), out, BuildConfig(calibration=SMALL, eval_samples=0, correction=False,
                                                        speed_check=False, analysis=ANALYSIS))
    cfg = EvalConfig(sample=SampleConfig(n=7, batch_size=2, steps=5, eta=eta, sampler=sampler))
    serial = api.evaluate(out, cfg, progress=None)
    seen = []
    got = api.evaluate(out, cfg, progress=lambda s, i, n: seen.append((s, i, n)), ray=parallel.LOCAL)
    np.testing.assert_array_equal(got.images, serial.images)
    assert got.report["paired_vs_fp"] == serial.report["paired_vs_fp"]
    assert got.report["run"] == {"workers": 2, "ray": "local"} and serial.report["run"] == {"workers": 1, "ray": None}
    assert ("bundle", 4, 4) in seen and ("fp reference", 4, 4) in seen  # 7 rows in shards of 2


def test_curves_on_a_cluster_of_several_nodes_equal_the_serial_run(local, serial, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    from ray.cluster_utils import Cluster

    local.close()  # one Ray per process: this test runs last and brings up its own
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        assert len([n for n in ray.nodes() if n["Alive"]]) == 3
        got = api.analyze(str(tiny_model_dir), ANALYSIS, SMALL, ray=cluster.address)
        assert got.run == {"workers": 3, "ray": cluster.address}
        _same(got, serial)
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_without_ray_nothing_imports_it(tiny_model_dir, tmp_path):
    code = ("import sys, dmcompile.api as api\n"
            "from dmcompile.config import AnalysisConfig, CalibrationConfig\n"
            f"api.analyze({str(tiny_model_dir)!r}, AnalysisConfig(samples_per_group=2, weight_bits=(4, 8), "
            "act_bits=(8,), rounding='rtn'), CalibrationConfig(size=2, steps=4, groups=2, batch_size=2), progress=None)\n"
            "assert 'ray' not in sys.modules, 'ray imported'\nprint('ok')\n")
    env = {**os.environ, "DMCOMPILE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_ray_missing_and_bad_addresses_are_clear(monkeypatch):
    with pytest.raises(ConfigError, match="ray"):
        BuildConfig(ray="")
    with pytest.raises(ConfigError, match="ray_workers"):
        BuildConfig(ray="local", ray_workers=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r"pip install 'dmcompile\[ray\]'"):
        parallel.RayPool(parallel.LOCAL)


def test_probes_run_on_one_thread_count_everywhere():
    """ONNX Runtime's output with weights fed as inputs depends on its thread count (ddpm-cifar10-32:
    1.1e-6 between 1 and 2 threads): workers run the probe on the driver's count."""
    from dmcompile.analysis.rd import measure_curves

    p = probe_mod.Probe(None, (), {}, (), {}, {}, threads=3)
    assert p.for_workers().threads == 3
    with pytest.raises(IndexError):  # no layers: it stops at the reference, after fixing the count
        measure_curves(p, np.zeros((1, 1, 1)), np.zeros((1, 1)), {}, ANALYSIS, [(0, 1000)], {})
    q = probe_mod.Probe(None, (), {}, (), {}, {})
    with pytest.raises(IndexError):
        measure_curves(q, np.zeros((1, 1, 1)), np.zeros((1, 1)), {}, ANALYSIS, [(0, 1000)], {})
    assert p.threads == 3 and q.threads == parallel.default_threads() >= 1


def test_a_model_file_no_node_sees_is_a_clear_error(tmp_path):
    p = probe_mod.Probe(None, (), {}, (), {}, {}, source=tmp_path / "gone" / "model.onnx")
    rows = _Rows(np.zeros((1, 1)), np.zeros(1), None, 1, 1, np.zeros((1, 1)), np.zeros((1, 1)), "mse", 1, False)
    with pytest.raises(ClusterError, match="DMCOMPILE_CACHE"):
        run_batch((p, rows), {"jobs": [("w", 0, 0)], "weights": [{}]})
