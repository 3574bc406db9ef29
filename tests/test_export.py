"""Frontend: tracing to ONNX, parity, the layer map, atomic output."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dmcompile import api
from dmcompile.config import ExportConfig
from dmcompile.errors import ExportError
from dmcompile.frontend.layermap import LayerMap


def test_export_folder_contents(tiny_export):
    names = sorted(p.name for p in tiny_export.iterdir())
    assert names == ["layer_map.json", "manifest.json", "model.onnx"]
    m = json.loads((tiny_export / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["format"] == "fp32"
    assert m["groups"] == [{"index": 0, "t_start": 0, "t_end": 1000, "engine": "model.onnx"}]
    assert m["export"]["parity_max_abs_err"] <= 1e-4


def test_onnx_signature_and_dynamic_batch(tiny_export, tiny_model_dir):
    model = onnx.load(str(tiny_export / "model.onnx"))
    ins = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(ins) == ["sample", "timestep"]
    assert ins["sample"].elem_type == onnx.TensorProto.FLOAT
    assert ins["timestep"].elem_type == onnx.TensorProto.INT64
    assert ins["sample"].shape.dim[0].dim_param == "batch"
    assert [o.name for o in model.graph.output] == ["eps"]
    sess = ort.InferenceSession(str(tiny_export / "model.onnx"))
    unet = api.load_model(str(tiny_model_dir)).unet
    for b in (1, 5):
        x = np.random.default_rng(b).standard_normal((b, 2, 8, 8), dtype=np.float32)
        t = np.arange(b, dtype=np.int64) * 150
        got = sess.run(None, {"sample": x, "timestep": t})[0]
        want = unet(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
        assert got.shape == (b, 2, 8, 8)
        assert np.abs(got - want).max() <= 1e-4


def _torch_macs(unet, sample_shape):
    """MACs of every Conv2d / Linear module at batch 1, from forward hooks."""
    macs = {}

    def hook(name):
        def f(mod, inp, out):
            if isinstance(mod, torch.nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
                macs[name] = out.numel() * k
            else:
                macs[name] = out.numel() * mod.in_features
        return f

    hs = [m.register_forward_hook(hook(n)) for n, m in unet.named_modules()
          if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        unet(torch.zeros(1, *sample_shape), torch.tensor([500]))
    for h in hs:
        h.remove()
    return macs


def test_layer_map_covers_every_node_and_matches_torch(tiny_export, tiny_model_dir):
    lm = LayerMap.load(tiny_export / "layer_map.json")
    model = onnx.load(str(tiny_export / "model.onnx"))
    nodes = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert [l.node for l in lm.layers] == nodes
    loaded = api.load_model(str(tiny_model_dir))
    modules = dict(loaded.unet.named_modules())
    params = dict(loaded.unet.named_parameters())
    inits = {i.name: i for i in model.graph.initializer}
    torch_macs = _torch_macs(loaded.unet, loaded.sample_shape)
    with_weight = [l for l in lm.layers if l.weight]
    assert len(with_weight) == len(torch_macs)  # one weighted node per Conv2d / Linear
    for l in with_weight:
        assert l.module in modules
        assert l.weight in inits and list(inits[l.weight].dims) == l.weight_shape
        w_torch = params[l.module + ".weight"].numpy()
        w_onnx = onnx.numpy_helper.to_array(inits[l.weight])
        np.testing.assert_array_equal(w_onnx.T if l.weight_transposed else w_onnx, w_torch)
        assert l.macs == torch_macs[l.module], l.node
    attn = [l for l in lm.layers if not l.weight]
    assert attn and all(l.op_type == "MatMul" and l.macs > 0 for l in attn)
    assert not any(i.name.startswith("onnx::") for i in model.graph.initializer if i.name in {l.weight for l in lm.layers})


def test_export_error_leaves_no_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ExportError, match="differs from PyTorch"):
        api.export(str(tiny_model_dir), out, ExportConfig(parity_tol=1e-30))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary leftovers either


def test_reexport_replaces_only_our_own_folder(tiny_model_dir, tmp_path):
    from dmcompile.errors import ConfigError

    out = tmp_path / "x"
    api.export(str(tiny_model_dir), out)
    first = (out / "manifest.json").stat().st_mtime_ns
    api.export(str(tiny_model_dir), out)  # an earlier export: replaced
    assert (out / "manifest.json").stat().st_mtime_ns != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    (out / "notes.txt").write_text("mine")  # the user's file inside it: nothing is touched
    with pytest.raises(ConfigError, match="notes.txt, which dmcompile did not write"):
        api.export(str(tiny_model_dir), out)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_export_warns_when_it_will_not_fit_in_memory(tiny_model_dir, tmp_path, monkeypatch):
    """A model whose export needs more memory than is available (EXPORT_MEMORY_FACTOR x its fp32
    weights, as measured, of which the loaded weights are resident already) is warned about before
    tracing; one that fits is not."""
    import warnings

    from dmcompile.frontend import export

    assert export.available_memory() > 2**20  # this Linux machine's MemAvailable
    params = api.load_model(str(tiny_model_dir)).num_parameters()
    more = (export.EXPORT_MEMORY_FACTOR - 1) * 4 * params  # the weights are loaded already
    monkeypatch.setattr(export, "available_memory", lambda: int(more) - 1)
    with pytest.warns(UserWarning, match=r"needs about .* it will likely be killed for memory"):
        api.export(str(tiny_model_dir), tmp_path / "a")
    monkeypatch.setattr(export, "available_memory", lambda: int(more) + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        api.export(str(tiny_model_dir), tmp_path / "b")


def test_export_is_deterministic(tiny_model_dir, tmp_path):
    a = api.export(str(tiny_model_dir), tmp_path / "a")
    b = api.export(str(tiny_model_dir), tmp_path / "b")
    assert (a.path / "model.onnx").read_bytes() == (b.path / "model.onnx").read_bytes()


@pytest.mark.slow
def test_cifar10_preset_export(tmp_path):
    model = api.load_model("ddpm-cifar10-32")
    assert model.num_parameters() == 35_746_307
    res = api.export(model, tmp_path / "cifar")
    assert res.parity_max_abs_err <= 1e-4
    assert res.layer_map.counts() == {"Conv": 65, "Gemm": 24, "MatMul": 36}
    lm_modules = {l.module for l in res.layer_map.layers if l.weight}
    assert "down_blocks.1.attentions.0.to_q" in lm_modules and "conv_in" in lm_modules


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_cond_dir"])
def test_inferred_layer_shapes_equal_probed_ones(which, request, tmp_path):
    """The layer map's shapes come from symbolic shape inference (an SDXL-sized UNet run with every
    probed tensor as an output did not fit in memory): they equal what running the graph gives."""
    from dmcompile.frontend import layermap
    from dmcompile.frontend.torch_model import conditioning_of
    from dmcompile.stages import fp_bundle

    fp = fp_bundle(str(request.getfixturevalue(which)))
    model = onnx.load(str(fp / "model.onnx"))
    loaded = api.load_model(str(request.getfixturevalue(which)))
    spec = conditioning_of(loaded, sequence_length=5)
    feeds = {"sample": np.zeros((1, *loaded.sample_shape), np.float32), "timestep": np.array([500], np.int64),
             **spec.dummy(1)}
    inits = {i.name for i in model.graph.initializer}
    names = sorted({v for n in model.graph.node if n.op_type in layermap.QUANTIZABLE_OPS
                    for v in (n.input[0], n.input[1], n.output[0]) if v not in inits} - set(feeds))
    inferred = layermap.inferred_shapes(model, feeds)
    assert names and all(n in inferred for n in names)
    assert {n: inferred[n] for n in names} == layermap._probe_shapes(model, names, feeds)
    # every weight as external data, the graph read without it (how a past-2-GB export is read)
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
                    size_threshold=0)
    graph = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = layermap.inferred_shapes(graph, feeds, tmp_path)
    assert {n: external[n] for n in names} == {n: inferred[n] for n in names}
