"""The manifest as a schema: every single-field mutation of a valid manifest of every target either
opens (and predicts) or raises BundleError with a message, never another exception."""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from dmruntime import Bundle, BundleError
from dmruntime.schema import SCHEDULER, SchemaError, check_manifest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "runtimes" / "python" / "tests" / "data"
VALUES = [None, True, False, 0, -1, 1, 3, 2.5, -0.5, 10 ** 12, -(2 ** 63), float("nan"), float("inf"),
          -float("inf"), "", "x", "unet.onnx", "../outside.onnx", "/etc/passwd", "a" * 300, [], [0], ["x"], [None],
          {}, {"x": 1}, {"file": "x"}]
MUTATIONS_PER_BUNDLE = 900  # x 7 bundles: 6300 mutations per run
PREDICTS_PER_BUNDLE = 20  # mutations of the keys the engines read, then a prediction each


def nodes(tree, path=()):
    """Every (path, value) below the root."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        yield path + (k,), v
        yield from nodes(v, path + (k,))


class Mutator:
    """Single-node mutations of one manifest: a top-level key drawn uniformly, then a node within
    it; the copy shares every node off the mutated path."""

    def __init__(self, manifest: dict, keys: tuple[str, ...] | None = None):
        self.manifest = manifest
        self.paths = {top: [(top,)] + [(top,) + p for p, _ in nodes(manifest[top])]
                      for top in manifest if keys is None or top in keys}
        self.values = [v for _, v in nodes(manifest)]

    def __call__(self, rng: random.Random) -> tuple[dict, str]:
        path = rng.choice(self.paths[rng.choice(sorted(self.paths))])
        m = parent = dict(self.manifest)
        for k in path[:-1]:
            parent[k] = copy.copy(parent[k])
            parent = parent[k]
        key = path[-1]
        old = parent[key]
        op = rng.choice(["set", "set", "set", "other", "delete", "bump", "dup", "add-key"])
        if op == "delete":
            del parent[key]
            return m, f"delete {path}"
        if op == "bump" and isinstance(old, (int, float)) and not isinstance(old, bool):
            new = rng.choice([old + 1, old - 1, -old, old * 2 + 1, old / 3])
        elif op == "dup" and isinstance(old, list) and old:
            new = old + [rng.choice(old)]
        elif op == "add-key" and isinstance(old, dict):
            new = {**old, "zz_added": rng.choice(VALUES)}
        elif op == "other":  # a real value from elsewhere in the manifest: plausible types, wrong place
            new = rng.choice(self.values)
        else:
            op, new = "set", rng.choice(VALUES)
        parent[key] = new
        return m, f"{op} {path} = {json.dumps(new, default=str)[:80]}"


def try_open(folder: Path, manifest: dict, what: str, **kw):
    (folder / "manifest.json").write_text(json.dumps(manifest))
    try:
        return Bundle.open(folder, **kw)
    except BundleError as e:
        assert str(e).strip(), f"{what}: BundleError without a message"
        return None
    except Exception as e:  # noqa: BLE001 (the point: nothing but BundleError)
        pytest.fail(f"{what}: {type(e).__name__}: {e}")


def predict_all_groups(bundle: Bundle, what: str) -> None:
    x = np.random.default_rng(0).standard_normal((2, *bundle.sample_shape)).astype(np.float32)
    c = bundle.conditioning  # inputs exactly as the (mutated) manifest describes them
    cond = {i.name: np.zeros((2, *i.row_shape(c.sequence_length)), i.dtype) for i in c.inputs} if c else None
    try:
        for g in dict.fromkeys((bundle.groups[0], bundle.groups[-1])):
            out = bundle.predict(x, g.t_start, cond)
        if bundle.decoder is not None:
            bundle.decode(out)
        if "text" in bundle.components:
            bundle.components["text"].encode(["a cat"])
    except BundleError as e:
        assert str(e).strip(), f"{what}: BundleError without a message"
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{what}: predict raised {type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory) -> Path:
    """A text-to-image bundle (a 1000-token CLIP vocabulary: its tokenizer loads on every open)."""
    from tiny_t2i import make_pipeline

    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig

    pipe = make_pipeline(tmp_path_factory.mktemp("t2i") / "pipe", vocab_size=1000)
    return api.build(str(pipe), tmp_path_factory.mktemp("tb") / "b",
                     BuildConfig(calibration=CalibrationConfig(size=2, steps=4, groups=2, batch_size=2),
                                 eval_samples=0, correction=False), progress=None).path


@pytest.fixture(scope="module")
def bundles(request, ov_bundle, trt_bundle, latent_bundle, class_bundle, text_bundle):
    return {"ort-w4": (FIXTURES / "tiny-w4", {}), "ort-w8a8": (FIXTURES / "tiny-w8a8", {}),
            "openvino": (ov_bundle, {}), "tensorrt": (trt_bundle, {"device": "cpu"}),
            "latent": (latent_bundle, {}), "class": (class_bundle, {}), "text": (text_bundle, {})}


TARGETS = ["ort-w4", "ort-w8a8", "openvino", "tensorrt", "latent", "class", "text"]


@pytest.mark.parametrize("target", TARGETS)
def test_mutated_manifests_open_or_raise_bundle_error(target, bundles, tmp_path):
    src, kw = bundles[target]
    folder = shutil.copytree(src, tmp_path / "b")
    manifest = json.loads((src / "manifest.json").read_text())
    assert try_open(folder, manifest, "unmutated", **kw) is not None
    rng, mutate = random.Random(f"dmcompile-{target}"), Mutator(manifest)
    opened = refused = 0
    for _ in range(MUTATIONS_PER_BUNDLE):
        m, what = mutate(rng)
        if try_open(folder, m, what, verify=rng.random() < 0.2, **kw) is None:
            refused += 1
        else:
            opened += 1
    assert opened + refused == MUTATIONS_PER_BUNDLE
    assert refused > MUTATIONS_PER_BUNDLE // 4, (opened, refused)  # most mutations of read keys are errors


# what the engines and the sampler read; mutations here that still open must still predict
READ_BY_ENGINES = ("model", "scheduler", "groups", "engine", "engines", "weights", "conditioning", "correction",
                   "decoder", "text")


@pytest.mark.parametrize("target", ["ort-w4", "latent", "class", "text"])  # (OpenVINO compiles per open: too slow here)
def test_mutated_manifests_that_open_also_predict(target, bundles, tmp_path):
    src, kw = bundles[target]
    folder = shutil.copytree(src, tmp_path / "b")
    manifest = json.loads((src / "manifest.json").read_text())
    rng, mutate = random.Random(f"dmcompile-predict-{target}"), Mutator(manifest, READ_BY_ENGINES)
    predicted = 0
    while predicted < PREDICTS_PER_BUNDLE:
        m, what = mutate(rng)
        bundle = try_open(folder, m, what, verify=False, **kw)
        if bundle is not None:
            predict_all_groups(bundle, what)
            predicted += 1


def test_schema_errors_name_the_entry_and_the_fix(tmp_path):
    folder = shutil.copytree(FIXTURES / "tiny-w8a8", tmp_path / "b")
    m = json.loads((folder / "manifest.json").read_text())
    cases = [(("groups", 0, "t_end"), "x", "manifest groups[0].t_end must be an integer >= 1, got 'x'"),
             (("scheduler", "beta_end"), -1, "beta_end must be a finite number >= 0 and <= 1, got -1"),
             (("scheduler", "beta_end"), float("nan"), "beta_end must be a finite number"),
             (("model", "sample_shape"), [2, 0, 8], "model.sample_shape[1] must be an integer >= 1"),
             (("files",), [], "manifest files must be a non-empty object"),
             (("groups", 1, "index"), 0, "groups must be listed in order")]
    for path, value, expected in cases:
        bad = copy.deepcopy(m)
        node = bad
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        (folder / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(BundleError, match="rebuild") as e:
            Bundle.open(folder)
        assert expected in str(e.value), (path, str(e.value))
    bad = copy.deepcopy(m)
    del bad["groups"][0]["engine"]
    with pytest.raises(BundleError, match=r"groups\[0\]\.engine is missing"):
        check_manifest(bad)
    for version in (2, "1", True, None):
        with pytest.raises(BundleError, match="upgrade dmruntime"):
            check_manifest({**m, "schema_version": version})


def test_scheduler_spec_accepts_diffusers_configs_and_refuses_nonsense():
    SCHEDULER.check({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                     "beta_start": 0.00085, "beta_end": 0.012, "trained_betas": None, "variance_type": "fixed_small",
                     "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, "")
    for bad in ({"beta_end": -1}, {"num_train_timesteps": 1.5}, {"clip_sample": "yes"}, {"beta_start": math.inf},
                {"prediction_type": "flow"}, {"trained_betas": [0.1, "x"]}):
        with pytest.raises(SchemaError):
            SCHEDULER.check(bad, "")


def test_stored_weights_are_4_or_8_bits():
    from dmruntime.schema import WEIGHTS

    ok = {"file": "weights.npz", "tensors": {"w": {"shape": [2, 3], "storage_bits": 4, "grid_bits": 4}}}
    WEIGHTS.check(ok, "weights")
    for bits in (5, 4.0, True, "4"):
        with pytest.raises(SchemaError, match="storage_bits must be 4 or 8"):
            WEIGHTS.check({**ok, "tensors": {"w": {**ok["tensors"]["w"], "storage_bits": bits}}}, "weights")
