"""Calibration calls run in pieces (``calibration.pieces``): the same tensors, the same
histograms, moments and bundles as one run, with only a piece's recorded tensors held at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from dmcompile import api, onnxio
from dmcompile.calibration import hessian, pieces
from dmcompile.calibration.hessian import Moments
from dmcompile.calibration.trajectory import calibrate_trajectories
from dmcompile.config import BuildConfig, CalibrationConfig
from dmcompile.frontend.layermap import LayerMap
from dmcompile.targets import ORT_CPU

SMALL = CalibrationConfig(size=4, steps=6, groups=3, batch_size=4)


def _feeds(model: onnx.ModelProto, batch: int = 3) -> dict:
    shape = [int(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
    return {"sample": x, "timestep": np.array([10, 500, 990][:batch], np.int64)}


def _count_pieces(monkeypatch) -> list[int]:
    seen = []
    real = pieces.open_session

    def spy(*a, **k):
        s = real(*a, **k)
        seen.append(len(s.pieces))
        return s
    monkeypatch.setattr(pieces, "open_session", spy)
    return seen


def test_cut_balances_recorded_bytes_under_the_budget():
    nodes = [onnx.helper.make_node("Relu", [f"v{i}"], [f"v{i + 1}"]) for i in range(10)]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [], []))
    sizes = {f"v{i + 1}": b for i, b in enumerate([5, 5, 5, 5, 40, 5, 5, 5, 5, 20])}
    assert pieces.cut(model, sizes, 1000) == [0]  # fits: one piece
    starts = pieces.cut(model, sizes, 40)
    assert len(starts) == 3 and starts[0] == 0 and starts == sorted(set(starts))
    ends = [*starts[1:], 10]
    held = [sum(sizes[f"v{i + 1}"] for i in range(a, b)) for a, b in zip(starts, ends)]
    assert sum(held) == 100 and max(held) <= 40  # each within the budget
    assert pieces.cut(model, sizes, 30) == [0, 4, 5, 9]  # a tensor past the budget: a piece of its own


def test_pieces_hand_out_every_recorded_tensor_as_one_run_computes_it(tiny_export):
    model = onnxio.load(tiny_export / "model.onnx")
    lm = LayerMap.load(tiny_export / "layer_map.json")
    recorded = ORT_CPU.quantized_tensors(model, lm.layers)
    feeds = _feeds(model)
    whole = pieces.PiecewiseSession(model, recorded, [0])
    cut = pieces.PiecewiseSession(model, recorded, [0, 7, 20, len(model.graph.node) - 3])
    assert len(cut.pieces) == 4
    one = [dict(s) for s in whole.run(feeds)]
    shares = list(cut.run(feeds))
    assert len(one) == 1 and len(shares) == 4
    merged = {k: v for s in shares for k, v in s.items()}
    assert list(merged) == list(one[0])  # the same tensors in the same (producer) order
    assert set(merged) == {*recorded, "eps"} and "sample" in shares[0]  # a recorded graph input: the first share
    for name, value in one[0].items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)
    # each piece holds only what it computes and what later pieces read
    assert all(len(p.fetch) < len(recorded) for p in cut.pieces)


def test_calibration_in_pieces_equals_calibration_in_one_run(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setattr(hessian, "MOMENT_ROWS", 50)  # subsampled rows: the draws must match too
    lm = LayerMap.load(tiny_export / "layer_map.json")
    scheduler = json.loads((tiny_export / "manifest.json").read_text())["scheduler"]
    seen = _count_pieces(monkeypatch)
    one = calibrate_trajectories(tiny_export / "model.onnx", lm, scheduler, SMALL, moments="groups",
                                 work_dir=tmp_path).save(tmp_path / "one")
    monkeypatch.setattr(pieces, "PIECE_BYTES", 64 << 10)
    cut = calibrate_trajectories(tiny_export / "model.onnx", lm, scheduler, SMALL, moments="groups",
                                 work_dir=tmp_path).save(tmp_path / "cut")
    assert seen[0] == 1 and seen[1] >= 4
    assert one.ranges() == cut.ranges()
    for g in range(SMALL.groups):
        for n in one.tensors:
            a, b = one.observers[g][n].state(), cut.observers[g][n].state()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
    m1, m2 = Moments(one.moments), Moments(cut.moments)
    assert m1.files == m2.files and m1.meta["counts"] == m2.meta["counts"]
    for node in m1.files:
        np.testing.assert_array_equal(m1.matrix(node, (1,)), m2.matrix(node, (1,)))


@pytest.mark.slow
def test_guided_conditional_bundle_is_the_same_built_in_pieces(tiny_cond_dir, cond_file, tmp_path, monkeypatch):
    """Guided calibration of a cross-attention UNet (the text embeddings, graph inputs, recorded
    too), GPTQ moments: the bundle's files are the same bytes."""
    seen = _count_pieces(monkeypatch)
    cal = CalibrationConfig(size=4, steps=6, groups=3, batch_size=2, guidance_scale=3.0, conditions=str(cond_file))
    built = {}
    for name, budget in (("one", pieces.PIECE_BYTES), ("cut", 32 << 10)):
        monkeypatch.setattr(pieces, "PIECE_BYTES", budget)
        monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / f"cache-{name}"))  # calibrate each time
        built[name] = api.build(str(tiny_cond_dir), tmp_path / name, BuildConfig(calibration=cal, eval_samples=0)).path
    assert seen[0] == 1 and seen[-1] >= 4
    files = sorted(p.name for p in Path(built["one"]).iterdir() if p.suffix == ".onnx")
    assert files and files == sorted(p.name for p in Path(built["cut"]).iterdir() if p.suffix == ".onnx")
    for f in files:
        assert (Path(built["one"]) / f).read_bytes() == (Path(built["cut"]) / f).read_bytes(), f
