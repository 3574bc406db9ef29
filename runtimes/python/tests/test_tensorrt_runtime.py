"""dmruntime.tensorrt without TensorRT: the engine build and the GPU runtime around a numpy fake
of their narrow GPU interface (``gpu.CudaGpu``'s methods). What the fake cannot show, TensorRT's
and CUDA's own behaviour, has not run in this project (no TensorRT builder installable, no GPU).

The bundles here are synthetic: the fixture bundle's model and schedule, two engine files whose
bytes the fake never reads, and a TensorRT manifest entry as dmcompile writes it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dmruntime import Bundle, BundleError, DDIMSampler, InputError
from dmruntime.tensorrt import build as trt_build
from dmruntime.tensorrt import runtime as trt_runtime
from dmruntime.tensorrt.record import TensorRTUnavailable, io_specs, profile_for

DATA = Path(__file__).resolve().parent / "data"
ENGINES = ("unet_e00.onnx", "unet_e01.onnx")
SIZES = [1, 2, 4, 8]


def _sha(p: Path) -> dict:
    return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}


def make_bundle(root: Path, *, classes: bool = False, sizes=SIZES) -> Path:
    """A tensorrt bundle: two groups, one engine each; with ``classes``, class-conditional
    with a null class (guidance runs both branches in one call)."""
    src = json.loads((DATA / "tiny-w8a8" / "manifest.json").read_text())
    root.mkdir(parents=True)
    files = {}
    for i, name in enumerate(ENGINES):
        (root / name).write_bytes(f"onnx of engine {i}".encode())
        files[name] = _sha(root / name)
    m = {k: src[k] for k in ("schema_version", "kind", "model", "scheduler")}
    m["groups"] = [{"index": 0, "t_start": 0, "t_end": 500, "engine": ENGINES[0], "inputs": None},
                   {"index": 1, "t_start": 500, "t_end": 1000, "engine": ENGINES[1], "inputs": None}]
    m["engine"] = {"file": ENGINES[0], "runtime": "tensorrt", "group_inputs": [],
                   "tensorrt": {"version_required": ">=10.0", "strongly_typed": True, "batch_sizes": sizes,
                                "guidance_batch": 2 if classes else None, "onnx": list(ENGINES),
                                "plans_folder": "tensorrt", "built_here": False}}
    if classes:
        np.savez(root / "null_condition.npz", class_labels=np.asarray(3, np.int64))
        files["null_condition.npz"] = _sha(root / "null_condition.npz")
        m["conditioning"] = {"inputs": [{"name": "class_labels", "dtype": "int64", "shape": [None]}],
                             "num_classes": 4, "sequence_length": None, "null": {"file": "null_condition.npz"},
                             "class_table": None}
    m["files"] = files
    (root / "manifest.json").write_text(json.dumps(m))
    return root


class FakeBuilder:
    """TrtBuilder's interface: a 'plan' names its engine; the timing cache grows per build."""

    device = {"name": "Fake GPU", "compute_capability": "9.0"}
    tensorrt_version = "10.9.0"

    def __init__(self):
        self.calls = []

    def build(self, onnx_path, profiles, cache):
        self.calls.append((Path(onnx_path).name, profiles, cache))
        return f"plan:{ENGINES.index(Path(onnx_path).name)}:{len(profiles)}".encode(), cache + b"+"


class FakeEngine:
    def __init__(self, index, profiles):
        self.index, self.profiles = index, profiles


class FakeContext:
    def __init__(self, engine, profile, shapes, addresses):
        self.engine, self.profile, self.shapes, self.addresses = engine, profile, shapes, addresses
        self.memory = None


class FakeGpu:
    """CudaGpu's interface over numpy "device memory". An engine's eps is its index + 10 x the
    timestep row + sample, so a test sees which engine ran, on which rows."""

    device = FakeBuilder.device
    tensorrt_version = FakeBuilder.tensorrt_version

    def __init__(self, inputs=("sample", "timestep")):
        self.inputs = list(inputs)
        self.mem, self.next = {}, 1000
        self.runs, self.captured, self.launched = [], [], []

    def alloc(self, n):
        ptr, self.next = self.next, self.next + 1
        self.mem[ptr] = bytearray(n)
        return ptr

    def free(self, ptr):
        del self.mem[ptr]

    def upload(self, ptr, host):
        data = np.ascontiguousarray(host).tobytes()
        assert len(data) == len(self.mem[ptr]), "upload size differs from the buffer"
        self.mem[ptr][:] = data

    def download(self, host, ptr):
        host[...] = np.frombuffer(bytes(self.mem[ptr]), host.dtype).reshape(host.shape)

    def synchronize(self):
        pass

    def load(self, plan):
        _, index, profiles = plan.decode().split(":")
        return FakeEngine(int(index), int(profiles))

    def io_names(self, engine):
        return list(self.inputs), ["eps"]

    def dtype(self, engine, name):
        return {"timestep": "int64", "class_labels": "int64"}.get(name, "float32")

    def num_profiles(self, engine):
        return engine.profiles

    def context(self, engine, profile, shapes, addresses):
        return FakeContext(engine, profile, shapes, addresses), 100 * (profile + 1) + engine.index

    def set_memory(self, ctx, ptr, n):
        ctx.memory = (ptr, n)

    def _read(self, ctx, name, dtype):
        shape = ctx.shapes[name]
        return np.frombuffer(bytes(self.mem[ctx.addresses[name]]), dtype).reshape(shape)

    def run(self, ctx):
        x = self._read(ctx, "sample", np.float32)
        t = self._read(ctx, "timestep", np.int64)
        eps = x + ctx.engine.index + 10.0 * t.reshape(-1, *[1] * (x.ndim - 1))
        labels = self._read(ctx, "class_labels", np.int64) if "class_labels" in ctx.shapes else None
        self.runs.append((ctx.engine.index, x.shape[0], t.copy(), labels))
        self.mem[ctx.addresses["eps"]][:] = eps.astype(np.float32).tobytes()

    def capture(self, ctx):
        self.captured.append(ctx)
        return ctx

    def launch(self, graph):
        self.launched.append(graph)
        self.run(graph)


@pytest.fixture
def built(tmp_path):
    root = make_bundle(tmp_path / "b")
    trt_build.build_engines(root, builder=FakeBuilder())
    return root


def _open(root, monkeypatch, gpu=None):
    gpu = gpu or FakeGpu()
    monkeypatch.setattr(trt_runtime, "default_gpu", lambda: gpu)
    return Bundle.open(root), gpu


def test_build_writes_static_profiles_and_a_record(tmp_path):
    root = make_bundle(tmp_path / "b")
    builder = FakeBuilder()
    record = trt_build.build_engines(root, [4, 1, 2], builder=builder)
    assert record["batch_sizes"] == [1, 2, 4]
    # one build per engine; min = opt = max per profile: the shapes of each batch size
    assert [c[0] for c in builder.calls] == list(ENGINES)
    profiles = builder.calls[0][1]
    assert [p["sample"] for p in profiles] == [(b, 2, 8, 8) for b in (1, 2, 4)]
    assert [p["timestep"] for p in profiles] == [(1,), (2,), (4,)]
    # the timing cache is shared: the second engine starts from the first one's
    assert builder.calls[0][2] == b"" and builder.calls[1][2] == b"+"
    plans = root / "tensorrt"
    assert (plans / "timing.cache").read_bytes() == b"++"
    on_disk = json.loads((plans / "engines.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    for name in ENGINES:
        plan = root / record["plans"][name]["plan"]
        assert hashlib.sha256(plan.read_bytes()).hexdigest() == record["plans"][name]["sha256"]
    assert record["manifest_sha256"] == hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    # a second build starts from the kept timing cache and replaces the first
    again = FakeBuilder()
    trt_build.build_engines(root, builder=again)
    assert again.calls[0][2] == b"++"
    assert json.loads((plans / "engines.json").read_text())["batch_sizes"] == SIZES
    assert not [p for p in root.iterdir() if p.name.startswith(".tensorrt")]  # no temporary folders left


def test_build_refuses_a_folder_that_is_not_ours(tmp_path):
    root = make_bundle(tmp_path / "b")
    (root / "tensorrt").mkdir()
    (root / "tensorrt" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not an engine build"):
        trt_build.build_engines(root, builder=FakeBuilder())
    assert (root / "tensorrt" / "notes.txt").read_text() == "mine"


def test_build_without_tensorrt_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    root = make_bundle(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    assert trt_build.main([str(root)]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "dmruntime[tensorrt]" in err
    assert not (root / "tensorrt").exists()


def test_build_checks_the_bundle_before_tensorrt(tmp_path, capsys):
    assert trt_build.main([str(tmp_path / "missing")]) == 2
    assert "not a readable bundle" in capsys.readouterr().err
    src = make_bundle(tmp_path / "ort")
    m = json.loads((src / "manifest.json").read_text())
    m["engine"] = {"file": ENGINES[0], "runtime": "onnxruntime"}
    (src / "manifest.json").write_text(json.dumps(m))
    assert trt_build.main([str(src)]) == 2
    assert "not a TensorRT bundle" in capsys.readouterr().err


def test_each_step_runs_its_groups_engine_through_a_cuda_graph(built, monkeypatch):
    bundle, gpu = _open(built, monkeypatch)
    # one context and one captured graph per engine and batch size, all on one activation buffer
    assert len(gpu.captured) == len(ENGINES) * len(SIZES)
    assert {c.memory for c in gpu.captured} == {(bundle.engine(ENGINES[0]).engines._activations,
                                                 100 * len(SIZES) + 1)}
    x = DDIMSampler(bundle, steps=10).sample(3, seed=0)
    assert x.shape == (3, 2, 8, 8)
    assert len(gpu.runs) == 10 and len(gpu.launched) == 10
    for engine, batch, t, _ in gpu.runs:
        assert engine == (1 if t[0] >= 500 else 0)  # the group holding t
        assert batch == 4  # 3 rows padded up to the batch-4 profile
        assert (t[:3] == t[0]).all() and t[3] == 0  # padding rows are zeros


def test_predict_pads_and_slices(built, monkeypatch):
    bundle, gpu = _open(built, monkeypatch)
    x = np.random.default_rng(0).standard_normal((5, 2, 8, 8)).astype(np.float32)
    bundle.predict(np.ones((8, 2, 8, 8), np.float32), 700)  # fills every row of the batch-8 buffers
    eps = bundle.predict(x, 700)
    np.testing.assert_allclose(eps, x + 1 + 7000.0)  # engine 1, only the 5 real rows
    assert gpu.runs[-1][1] == 8 and (gpu.runs[-1][2][5:] == 0).all()  # padding rows zeroed again
    again = bundle.predict(x, 700)
    np.testing.assert_array_equal(again, eps)
    assert again is not eps and not np.shares_memory(again, eps)  # results do not alias the host buffer
    with pytest.raises(InputError, match="larger than the engines' largest batch size 8"):
        bundle.predict(np.zeros((9, 2, 8, 8), np.float32), 10)
    with pytest.raises(InputError, match="shape"):
        bundle.predict(np.zeros((2, 3, 8, 8), np.float32), 10)


def test_without_cuda_graphs_contexts_run_directly(built, monkeypatch):
    gpu = FakeGpu()
    from dmruntime.bundle import MANIFEST
    from dmruntime.conditioning import Conditioning

    manifest = json.loads((built / MANIFEST).read_text())
    engines = trt_runtime.TensorRTEngines.load(built, manifest, (2, 8, 8), Conditioning(), gpu=gpu, cuda_graphs=False)
    engines.predict(ENGINES[0], np.zeros((2, 2, 8, 8), np.float32), 5)
    assert not gpu.captured and not gpu.launched and len(gpu.runs) == 1
    engines.close()
    assert gpu.mem == {}  # every buffer freed


def test_guidance_runs_both_branches_in_one_call(tmp_path, monkeypatch):
    root = make_bundle(tmp_path / "c", classes=True)
    trt_build.build_engines(root, builder=FakeBuilder())
    bundle, gpu = _open(root, monkeypatch, FakeGpu(("sample", "timestep", "class_labels")))
    sampler = DDIMSampler(bundle, steps=4, guidance_scale=2.0)
    sampler.sample(2, seed=0, cond={"class_labels": np.array([1, 2])})
    assert len(gpu.runs) == 4
    for _, batch, _, labels in gpu.runs:
        assert batch == 4 and labels.tolist() == [3, 3, 1, 2]  # null branch, then the conditions


def test_engines_must_be_built_here_for_this_bundle(built, monkeypatch, tmp_path):
    gpu = FakeGpu()
    gpu.device = {"name": "Other GPU", "compute_capability": "8.6"}
    with pytest.raises(TensorRTUnavailable, match="built on Fake GPU"):
        _open(built, monkeypatch, gpu)
    gpu = FakeGpu()
    gpu.tensorrt_version = "10.3.0"
    with pytest.raises(TensorRTUnavailable, match="built with TensorRT 10.9.0"):
        _open(built, monkeypatch, gpu)
    plan = built / "tensorrt" / "unet_e01.plan"
    plan.write_bytes(b"plan:1:3")
    with pytest.raises(BundleError, match="does not match its sha256"):
        _open(built, monkeypatch)


def test_engines_of_another_model_are_refused(built, monkeypatch):
    with pytest.raises(BundleError, match="built from another model"):
        _open(built, monkeypatch, FakeGpu(("sample", "timestep", "encoder_hidden_states")))


def test_unbuilt_bundle_says_what_to_do(tmp_path, monkeypatch):
    root = make_bundle(tmp_path / "b")
    monkeypatch.setattr(trt_runtime, "default_gpu", lambda: pytest.fail("no GPU needed to find the engines missing"))
    with pytest.raises(TensorRTUnavailable, match=r"python -m dmruntime.tensorrt.build .*device='cpu'"):
        Bundle.open(root)


def test_manifest_entry_is_validated(tmp_path):
    root = make_bundle(tmp_path / "b", sizes=[0, 2])
    with pytest.raises(BundleError, match="batch_sizes"):
        Bundle.open(root, device="cpu")
    with pytest.raises(InputError, match="device must be one of"):
        Bundle.open(make_bundle(tmp_path / "c"), device="gpu")
    with pytest.raises(InputError, match="applies to --target tensorrt"):
        Bundle.open(DATA / "tiny-w8a8", device="cuda")


def test_missing_tensorrt_or_cuda_is_a_clear_error(monkeypatch):
    from dmruntime.tensorrt import gpu

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"pip install 'dmruntime\[tensorrt\]'"):
        gpu.CudaGpu()


def test_profile_choice_and_shapes():
    assert [profile_for(b, [1, 2, 4, 8]) for b in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    from dmruntime.conditioning import CondInput, Conditioning

    cond = Conditioning((CondInput("encoder_hidden_states", "float32", (None, None, 32)),), None, 77)
    inputs, out = io_specs((4, 64, 64), cond, 2)
    assert [(s.name, s.shape) for s in inputs] == [("sample", (2, 4, 64, 64)), ("timestep", (2,)),
                                                   ("encoder_hidden_states", (2, 77, 32))]
    assert out.shape == (2, 4, 64, 64) and inputs[2].nbytes == 2 * 77 * 32 * 4


def test_the_tensorrt_runtime_loads_no_torch():
    code = ("import sys\n"
            "import dmruntime.tensorrt.runtime, dmruntime.tensorrt.build, dmruntime.tensorrt.gpu\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'dmcompile')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_cli_samples_with_the_engines_largest_profile(built, monkeypatch, tmp_path, capsys):
    from dmruntime import cli

    gpu = FakeGpu()
    monkeypatch.setattr(trt_runtime, "default_gpu", lambda: gpu)
    out = tmp_path / "x.npy"
    assert cli.main([str(built), "-o", str(out), "-n", "10", "--steps", "2"]) == 0
    assert np.load(out).shape == (10, 2, 8, 8)
    assert [r[1] for r in gpu.runs] == [8, 2, 8, 2]  # 8 + 2 rows per step, batch 2 on its own profile
    monkeypatch.setattr(trt_runtime, "default_gpu", lambda: pytest.fail("device cpu needs no GPU"))
    assert cli.main([str(built), "-o", str(tmp_path / "y.npy"), "--device", "cpu", "-n", "1"]) == 2
    assert "cannot load engine" in capsys.readouterr().err  # the synthetic engines are not ONNX
