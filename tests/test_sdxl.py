"""SDXL: the text_time UNet family (text_embeds, time_ids), StableDiffusionXLPipeline folders with
two tokenizers and text encoders, parity with diffusers, W8A8 bundles on every target, and the
errors of folders and options that do not fit."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails
from tiny_t2i import make_pipeline, make_sdxl_pipeline

from dmcompile import api, cli, stages
from dmcompile.config import BuildConfig, CalibrationConfig, ExportConfig
from dmruntime import Bundle, InputError, Text2Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> Path:
    """vocab.json + merges.txt tokenizers, force_zeros_for_empty_prompt, Euler (SDXL's scheduler)."""
    return make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def sdxl_json(tmp_path_factory) -> Path:
    """tokenizer.json tokenizers, force_zeros_for_empty_prompt off, DDIM, another seed."""
    return make_sdxl_pipeline(tmp_path_factory.mktemp("sdxl-json") / "pipe", tokenizer_form="json",
                              force_zeros=False, scheduler="DDIMScheduler", seed=1)


@pytest.fixture(scope="module")
def sdxl_fp(sdxl) -> Path:
    return stages.fp_bundle(str(sdxl))


def _pipe(folder: Path, scheduler: str | None = None):
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(str(folder))
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_unet_exports_text_embeds_and_time_ids(sdxl, sdxl_fp):
    """The UNet takes encoder_hidden_states [B, L, 80] (32 + 48: both encoders), text_embeds [B, 40]
    (the pooled projection) and time_ids [B, 6] (default: the pipeline's 16 x 16 resolution, no
    crop); dynamic batch; ONNX matches PyTorch."""
    import onnx

    m = json.loads((sdxl_fp / "manifest.json").read_text())
    cond = m["conditioning"]
    assert [(i["name"], i["shape"]) for i in cond["inputs"]] == [
        ("encoder_hidden_states", [None, None, 80]), ("text_embeds", [None, 40]), ("time_ids", [None, 6])]
    assert cond["defaults"] == {"time_ids": [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]}
    assert m["export"]["parity_max_abs_err"] <= 1e-4
    graph = onnx.load(str(sdxl_fp / "model.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["text_embeds"] == ["batch", 40] and dims["time_ids"] == ["batch", 6]
    text = m["text"]
    assert text["pooled"] == "text_embeds" and text["force_zeros_for_empty_prompt"] is True
    assert [e["outputs"] for e in text["encoders"]] == [["hidden"], ["hidden", "pooled"]]
    assert [e["layer"] for e in text["encoders"]] == ["penultimate"] * 2
    assert {"text_encoder_2.onnx", "tokenizer_2.json"} <= set(m["files"])
    # the null condition: zeros (no negative prompt, force_zeros_for_empty_prompt)
    null = np.load(sdxl_fp / "null_condition.npz")
    assert set(null.files) == {"encoder_hidden_states", "text_embeds"} and not any(null[k].any() for k in null.files)


@pytest.mark.parametrize("which, clip_skip", [("sdxl", None), ("sdxl_json", None), ("sdxl", 1)])
def test_encodings_equal_diffusers_encode_prompt(which, clip_skip, request):
    """Both tokenizer forms, prompt_2, negative prompts (and their second), clip_skip: the bundle's
    encoders give StableDiffusionXLPipeline.encode_prompt's four tensors to 1e-4."""
    import torch

    folder = request.getfixturevalue(which)
    fp = stages.fp_bundle(str(folder), ExportConfig(clip_skip=clip_skip))
    pipe = _pipe(folder)
    prompts, prompts_2 = ["a photograph of an astronaut riding a horse", "", "the number 7 " * 40], None
    text = Bundle.open(fp).components["text"]
    for prompts_2, neg, neg2 in ((None, "blurry", None), (["oil painting", "a cat", "x"], "blurry", "low quality"),
                                 (None, None, None)):
        with torch.no_grad():
            pe, npe, ppe, nppe = pipe.encode_prompt(prompts, prompt_2=prompts_2, device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=True, clip_skip=clip_skip,
                                                    negative_prompt=None if neg is None else [neg] * 3,
                                                    negative_prompt_2=None if neg2 is None else [neg2] * 3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = text.encode(prompts, prompts_2=prompts_2)
        negs = text.encode_negative(neg, neg2)
        assert np.abs(got["encoder_hidden_states"] - pe.numpy()).max() <= 1e-4
        assert np.abs(got["text_embeds"] - ppe.numpy()).max() <= 1e-4
        assert np.abs(negs["encoder_hidden_states"] - npe.numpy()[0]).max() <= 1e-4
        assert np.abs(negs["text_embeds"] - nppe.numpy()[0]).max() <= 1e-4
    zeros = which == "sdxl"  # force_zeros_for_empty_prompt: no negative prompt means zeros
    assert (not negs["encoder_hidden_states"].any()) is zeros
    assert np.abs(got["encoder_hidden_states"][0] - got["encoder_hidden_states"][1]).max() > 1e-2


@pytest.mark.parametrize("scheduler, negative, sizes", [
    ("EulerDiscreteScheduler", None, {}),
    ("EulerDiscreteScheduler", "blurry", {"original_size": (32, 24), "crops_coords_top_left": (4, 2),
                                          "target_size": (16, 20)}),
    ("DPMSolverMultistepScheduler", "blurry", {}),
])
def test_fp32_bundle_images_equal_sdxl_pipeline(sdxl, sdxl_fp, scheduler, negative, sizes):
    """Same prompts, negative prompt (or none: zeros), initial latents, scheduler and size
    conditioning, guidance on: the fp32 bundle through Text2Image gives StableDiffusionXLPipeline's
    images to 1e-3."""
    import torch
    from dmruntime.samplers import CLASS_NAMES

    pipe = _pipe(sdxl, scheduler)
    prompts = ["a photo of a cat", "the number 7, written thin"]
    lat = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    want = pipe(prompts, num_inference_steps=10, guidance_scale=6.0, latents=torch.from_numpy(lat), output_type="np",
                negative_prompt=None if negative is None else [negative] * 2, **sizes).images
    got = Text2Image(Bundle.open(sdxl_fp), CLASS_NAMES[scheduler], steps=10, guidance_scale=6.0).generate(
        prompts, latents=lat, negative_prompt=negative, **sizes)
    got = np.clip(got / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the prompt matters
    if sizes:  # and so do the time ids
        plain = Text2Image(Bundle.open(sdxl_fp), CLASS_NAMES[scheduler], steps=10, guidance_scale=6.0).generate(
            prompts, latents=lat, negative_prompt=negative)
        assert np.abs(np.clip(plain / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) - got).max() > 1e-4


@pytest.fixture(scope="module")
def sdxl_w8a8(sdxl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w8a8") / "bundle"
    assert cli.main(["build", str(sdxl), "-o", str(out), "--calib-size", "6", "--calib-steps", "6", "--groups", "2",
                     "--guidance", "5", "--eval-samples", "2", "--text-encoder", "int8"]) == 0
    return out


def test_w8a8_sdxl_bundle_runs_integer_kernels_and_takes_prompts(sdxl_w8a8, sdxl_fp, tmp_path, capsys):
    """Calibrated under guidance (both branches: the prompts' encodings and the zero null condition,
    time_ids from the resolution), 100% integer UNet kernels; both command lines give the same
    images, and the SDXL options reach the UNet."""
    m = json.loads((sdxl_w8a8 / "manifest.json").read_text())
    assert m["build"]["fusion"]["ratio"] == 1.0 and not m["build"]["fusion"]["float"]
    assert m["conditioning"]["defaults"]["time_ids"] == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    assert {"text_encoder.onnx", "text_encoder_2.onnx", "tokenizer_2.json"} <= set(m["files"])
    assert m["text"]["precision"] == "int8" and len(m["text"]["encoders"]) == 2
    assert np.isfinite(m["fidelity"]["psnr_db_mean"])
    argv = ["--prompt", "a cat", "--prompt", "a dog", "--prompt-2", "watercolour", "--prompt-2", "photo",
            "--original-size", "32", "32", "-n", "2"]
    assert cli.main(["sample", str(sdxl_w8a8), *argv, "-o", str(tmp_path / "a.npy")]) == 0
    from dmruntime.cli import main as rt_main
    assert rt_main([str(sdxl_w8a8), *argv, "-o", str(tmp_path / "b.npy")]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (4, 3, 16, 16) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert cli.main(["inspect", str(sdxl_w8a8)]) == 0
    text = capsys.readouterr().out
    assert "inputs: encoder_hidden_states float32 [B, L, 80], text_embeds float32 [B, 40], time_ids float32 [B, 6] " \
           "(default [16.0, 16.0, 0.0, 0.0, 16.0, 16.0])" in text
    assert "text_encoder_2.onnx (int8, pooled projection)" in text
    pipe = Text2Image(Bundle.open(sdxl_w8a8))
    np.testing.assert_array_equal(pipe.generate(["a cat", "a dog"], n=2, prompts_2=["watercolour", "photo"],
                                                original_size=(32, 32)), a)
    assert np.abs(pipe.generate(["a cat", "a dog"], n=2) - a).max() > 1e-4  # prompt_2 and sizes count


@pytest.mark.parametrize("target", ["openvino-cpu", "tensorrt"])
def test_sdxl_bundles_on_the_other_targets(sdxl, target, tmp_path):
    """Every target quantizes the SDXL UNet fully where its profile quantizes (tensorrt keeps its
    recipe's float layers, add_embedding among them) and samples from prompts; tensorrt's on the
    CPU over its FP16 engine graphs."""
    res = api.build(str(sdxl), tmp_path / "b", BuildConfig(
        profile=target, calibration=CalibrationConfig(size=2, steps=4, groups=2, batch_size=2, guidance_scale=4.0),
        eval_samples=0, correction=False), progress=None)
    fusion = res.manifest["build"]["fusion"]
    if target == "openvino-cpu":
        assert fusion["ratio"] == 1.0
    else:  # every layer the plan quantizes is an integer kernel; add_embedding float by TensorRT's recipe
        act = {l["module"]: l["activation"] for l in res.manifest["precision"]["layers"]}
        assert act["add_embedding.linear_1"] == act["add_embedding.linear_2"] == "float"
        quantized = sum(l["activation"] == "int8" for l in res.manifest["precision"]["layers"])
        assert quantized > 0 and all(sum(e["integer"].values()) == quantized for e in fusion["engines"].values())
    bundle = Bundle.open(res.path, device="cpu", cache_dir=tmp_path / "ov")
    images = Text2Image(bundle, steps=4).generate(["a cat", "a dog"], target_size=(16, 12))
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all() and np.abs(images[0] - images[1]).max() > 1e-4


def test_mixed_plan_and_rules_on_sdxl(sdxl, tmp_path):
    """Per-layer rules and an RD-allocated mixed plan work as for SD 1.x: add_embedding kept float
    by a rule, 4-bit weights elsewhere under a budget, the bundle samples."""
    from dmcompile.config import AnalysisConfig, MixedRecipe, parse_overrides

    res = api.build(str(sdxl), tmp_path / "m", BuildConfig(
        recipe=MixedRecipe(budget="6.0bits", overrides=parse_overrides("add_embedding", "float")),
        calibration=CalibrationConfig(size=2, steps=4, groups=2, batch_size=2, guidance_scale=4.0),
        analysis=AnalysisConfig(samples_per_group=2, weight_bits=(4, 8), act_bits=(8,)), eval_samples=0,
        correction=False),
        progress=None)
    layers = res.manifest["precision"]["layers"]
    assert {l["module"] for l in layers if l["activation"] == "float"} >= {"add_embedding.linear_1",
                                                                         "add_embedding.linear_2"}
    assert any(4 in (l["weight_bits"] or ()) for l in layers)
    images = Text2Image(Bundle.open(res.path), steps=3).generate("a cat")
    assert np.isfinite(images).all()


def _resave(folder: Path, sub: str, cls: str, **changes) -> None:
    import transformers

    cfg = transformers.CLIPTextConfig.from_pretrained(str(folder / sub))
    for k, v in changes.items():
        setattr(cfg, k, v)
    shutil.rmtree(folder / sub)
    getattr(transformers, cls)(cfg).save_pretrained(str(folder / sub))


def test_encoder_widths_must_add_up_to_cross_attention(sdxl, tmp_path, capsys):
    broken = shutil.copytree(sdxl, tmp_path / "pipe")
    _resave(broken, "text_encoder_2", "CLIPTextModelWithProjection", hidden_size=64, intermediate_size=128)
    cli_fails(["build", str(broken), "-o", str(tmp_path / "b")], capsys,
           "text encoder width (text_encoder 32 + text_encoder_2 64)", "cross_attention_dim 80")
    assert not (tmp_path / "b").exists()


def test_pooled_projection_must_match_add_embedding(sdxl, tmp_path, capsys):
    broken = shutil.copytree(sdxl, tmp_path / "pipe")
    _resave(broken, "text_encoder_2", "CLIPTextModelWithProjection", projection_dim=24)
    cli_fails(["build", str(broken), "-o", str(tmp_path / "b")], capsys, "text_encoder_2's pooled projection is 24 wide",
           "text_embeds is 40", "projection_class_embeddings_input_dim")
    assert not (tmp_path / "b").exists()
    plain = shutil.copytree(sdxl, tmp_path / "plain")  # a second encoder without a projection
    _resave(plain, "text_encoder_2", "CLIPTextModel")
    cli_fails(["export", str(plain), "-o", str(tmp_path / "e")], capsys, "no encoder has one",
           "CLIPTextModelWithProjection")


def test_refiner_is_refused(sdxl, tmp_path, capsys):
    refiner = shutil.copytree(sdxl, tmp_path / "refiner")
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    cli_fails(["build", str(refiner), "-o", str(tmp_path / "b")], capsys, "aesthetic score", "requires_aesthetics_score")
    assert not (tmp_path / "b").exists()


def test_sdxl_options_on_a_bundle_with_one_encoder(tmp_path, capsys):
    """--prompt-2 on an SD 1.x bundle (one encoder) and time_ids sizes on a UNet without them: exit 2,
    nothing written; the API says the same."""
    sd1 = make_pipeline(tmp_path / "sd1")
    fp = stages.fp_bundle(str(sd1))
    out = tmp_path / "g.png"
    cli_fails(["sample", str(fp), "--prompt", "a cat", "--prompt-2", "a dog", "-o", str(out)], capsys,
           "applies to pipelines with two text encoders (SDXL); this bundle has one")
    cli_fails(["sample", str(fp), "--prompt", "a cat", "--original-size", "64", "64", "-o", str(out)], capsys,
           "original_size set(s) SDXL's time_ids, and this bundle's UNet takes none")
    cli_fails(["sample", str(fp), "--original-size", "64", "64", "-o", str(out)], capsys, "--original-size go(es) with --prompt")
    assert not out.exists()
    with pytest.raises(InputError, match="takes none"):
        Text2Image(Bundle.open(fp)).generate("a cat", target_size=(8, 8))


def test_bad_sizes_and_prompt_counts(sdxl_fp):
    pipe = Text2Image(Bundle.open(sdxl_fp), steps=2)
    for bad in ((0, 16), (16,), ("a", "b"), (float("nan"), 3)):
        with pytest.raises(InputError, match="original_size must be two numbers"):
            pipe.generate("a cat", original_size=bad)
    with pytest.raises(InputError, match="crops_coords_top_left must be two numbers"):
        pipe.generate("a cat", crops_coords_top_left=(-1, 0))
    with pytest.raises(InputError, match="2 second prompt"):
        pipe.generate("a cat", prompts_2=["a", "b"])


def test_bare_sdxl_unet_calibrates_with_default_time_ids(sdxl, tmp_path):
    """A UNet folder alone (no pipeline): random embeddings and pooled vectors for calibration,
    time_ids from the UNet's sample size x 8 (SDXL's VAE), a conditions file may give its own."""
    unet = shutil.copytree(sdxl / "unet", tmp_path / "unet")
    shutil.copytree(sdxl / "scheduler", tmp_path / "scheduler")
    model = api.load_model(str(unet))
    assert model.condition_defaults == {"time_ids": [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]}
    rng = np.random.default_rng(0)
    conds = tmp_path / "c.npz"
    np.savez(conds, encoder_hidden_states=rng.standard_normal((3, 7, 80), dtype=np.float32),
             text_embeds=rng.standard_normal((3, 40), dtype=np.float32),
             null_encoder_hidden_states=np.zeros((7, 80), np.float32), null_text_embeds=np.zeros(40, np.float32))
    res = api.build(str(unet), tmp_path / "b", BuildConfig(calibration=CalibrationConfig(
        size=3, steps=4, groups=1, batch_size=3, guidance_scale=3.0, conditions=str(conds)), eval_samples=0,
        correction=False), progress=None)
    b = Bundle.open(res.path)
    assert b.conditioning.describe()[2] == "time_ids float32 [B, 6] (default [64.0, 64.0, 0.0, 0.0, 64.0, 64.0])"
    from dmruntime import DDIMSampler

    cond = {"encoder_hidden_states": rng.standard_normal((2, 7, 80), dtype=np.float32),
            "text_embeds": rng.standard_normal((2, 40), dtype=np.float32)}
    x = DDIMSampler(b, steps=3, guidance_scale=3.0).sample(2, cond=cond)
    y = DDIMSampler(b, steps=3, guidance_scale=3.0).sample(2, cond={**cond, "time_ids": np.array(
        [[64, 64, 0, 0, 64, 64]], np.float32)})
    np.testing.assert_array_equal(x, y)  # the default is what an explicit row gives
