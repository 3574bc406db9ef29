"""A Bundle of every target can be used from several threads at once: each call's result equals
the same call made alone."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from dmruntime import Bundle, DDIMSampler

FIXTURES = Path(__file__).resolve().parents[1] / "runtimes" / "python" / "tests" / "data"
THREADS, CALLS = 4, 6


def hammer(bundle: Bundle, jobs: list) -> list:
    """Run ``jobs`` (sample, t, cond) from THREADS threads, each job CALLS times; every result."""
    results = [[None] * CALLS for _ in jobs]
    errors = []
    start = threading.Barrier(THREADS)

    def worker(w):
        start.wait()
        try:
            for c in range(CALLS):
                for j in range(w, len(jobs), THREADS):
                    x, t, cond = jobs[j]
                    results[j][c] = bundle.predict(x, t, cond)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return results


def jobs_for(bundle: Bundle, cond=None) -> list:
    rng = np.random.default_rng(0)
    ts = [g.t_start for g in bundle.groups] + [g.t_end - 1 for g in bundle.groups]
    return [(rng.standard_normal((3, *bundle.sample_shape)).astype(np.float32), t, cond) for t in ts[:8]]


@pytest.fixture(scope="module")
def opened(ov_bundle, trt_bundle, latent_bundle):
    return {"onnxruntime": lambda: Bundle.open(FIXTURES / "tiny-w4"),
            "openvino": lambda: Bundle.open(ov_bundle),
            "tensorrt-cpu": lambda: Bundle.open(trt_bundle, device="cpu"),
            "latent": lambda: Bundle.open(latent_bundle)}


@pytest.mark.parametrize("target", ["onnxruntime", "openvino", "tensorrt-cpu", "latent"])
def test_concurrent_predict_equals_sequential(target, opened):
    bundle = opened[target]()
    cond = None
    if bundle.conditioning:
        c = bundle.conditioning
        cond = {i.name: np.random.default_rng(1).standard_normal((1, *i.row_shape(c.sequence_length)))
                .astype(np.float32) for i in c.inputs}
    jobs = jobs_for(bundle, cond)
    alone = [bundle.predict(x, t, cond) for x, t, cond in jobs]
    fresh = opened[target]()  # engines created while threads race for them
    for b in (bundle, fresh):
        for j, runs in enumerate(hammer(b, jobs)):
            for out in runs:
                np.testing.assert_array_equal(out, alone[j])


def test_concurrent_samplers_on_one_openvino_bundle(ov_bundle):
    bundle = Bundle.open(ov_bundle)
    alone = DDIMSampler(bundle, steps=4).sample(2, seed=3)
    outs, errors = [None] * 3, []

    def run(i):
        try:
            outs[i] = DDIMSampler(bundle, steps=4).sample(2, seed=3)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for out in outs:
        np.testing.assert_array_equal(out, alone)
