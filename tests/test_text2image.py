"""Text-to-image pipeline folders: tokenizers and text encoders in the bundle, prompts through
the runtime, parity with transformers' CLIPTokenizer / CLIPTextModel and diffusers'
StableDiffusionPipeline, and the errors of bad prompts and folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_fails
from tiny_t2i import make_pipeline

from dmcompile import cli, stages
from dmcompile.config import ExportConfig
from dmruntime import Bundle, InputError, Text2Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Path:
    """SD 1.x style: vocab.json + merges.txt, pad <|endoftext|>, epsilon, PNDM."""
    return make_pipeline(tmp_path_factory.mktemp("sd1") / "pipe", tokenizer_form="vocab")


@pytest.fixture(scope="module")
def sd2(tmp_path_factory) -> Path:
    """SD 2.x style: tokenizer.json, pad "!", gelu, v-prediction, DDIM."""
    return make_pipeline(tmp_path_factory.mktemp("sd2") / "pipe", sd2=True, tokenizer_form="json",
                         scheduler="DDIMScheduler", seed=1)


@pytest.fixture(scope="module")
def sd1_fp(sd1) -> Path:
    return stages.fp_bundle(str(sd1))


@pytest.fixture(scope="module")
def sd2_fp(sd2) -> Path:
    return stages.fp_bundle(str(sd2))


def _prompts(n: int = 1200) -> list[str]:
    """Seeded prompts: plain, unicode (accents, CJK, emoji, combining marks), punctuation,
    numbers, odd whitespace, upper case, special-token text, some past 77 tokens, and empty."""
    from dmcompile import zoo

    base = zoo.DEFAULT_PROMPTS.read_text().splitlines()
    extra = ["", " ", "   leading and trailing   ", "UPPER CASE PROMPT", "Café crème brûlée", "naïve façade",
             "東京の夜景", "一只猫坐在窗台上", "🐱 a cat with a 🎩 hat 🎉", "e\u0301 combining accent",
             "it's a dog's life, isn't it?", "won't can't shouldn't they're we've I'm you'll he'd",
             "3.14159 and 2,718 and 1e-5", "tabs\tand\nnew\nlines", "!!!???...,,,;;;", "#hashtag @mention $100 50%",
             "<|startoftext|> inside", "a <|endoftext|> b", "ﬁ ligature and ＦＵＬＬ width", "ß and ẞ and σς",
             "word " * 100, "a very long prompt, " * 30, "x" * 400]
    rng = np.random.default_rng(0)
    words = " ".join(base).split() + [e for e in extra if e.strip()]
    out = list(extra) + base
    while len(out) < n:
        k = int(rng.integers(1, 40))
        seps = rng.choice([" ", "  ", ", ", " - ", "\t"], size=k)
        out.append("".join(str(rng.choice(words)) + s for s in seps).strip() if rng.random() < 0.9 else
                   "".join(chr(int(c)) for c in rng.integers(32, 0x3000, size=k)))
    return out


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_token_ids_equal_transformers_clip_tokenizer(which, request):
    """The bundle's tokenizer.json (converted from vocab + merges for sd1, the folder's own for sd2)
    gives CLIPTokenizer's ids, padded and truncated as diffusers asks for them."""
    import transformers

    folder, fp = request.getfixturevalue(which), request.getfixturevalue(f"{which}_fp")
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    text = Bundle.open(fp).components["text"]
    prompts = _prompts()
    assert len(prompts) >= 1000
    want = ref(prompts, padding="max_length", max_length=ref.model_max_length, truncation=True).input_ids
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = text.tokenize(prompts)[0]
    assert got.shape == (len(prompts), 77)
    bad = [i for i in range(len(prompts)) if list(got[i]) != want[i]]
    assert not bad, f"{len(bad)} prompts differ, first {prompts[bad[0]]!r}: {list(got[bad[0]][:12])} vs {want[bad[0]][:12]}"
    # the pad token differs between SD 1.x (<|endoftext|>) and OpenCLIP (!), and truncation warns
    assert got[prompts.index("")][2] == (0 if which == "sd2" else 49407)
    assert any("cut" in str(w.message) for w in caught)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_text_embeddings_equal_diffusers_encode_prompt(sd1, clip_skip, tmp_path):
    import diffusers
    import torch

    fp = stages.fp_bundle(str(sd1), ExportConfig(clip_skip=clip_skip))
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(sd1), safety_checker=None)
    prompts = ["a photograph of an astronaut riding a horse", "", "the number 7 " * 40]
    with torch.no_grad():
        want, want_neg = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=["blurry"] * 3)
        if clip_skip is not None:
            # diffusers' own clip_skip path reads text_encoder.text_model, which transformers 5 removed:
            # its arithmetic by hand (hidden state clip_skip + 1 from the end, the final layer norm)
            ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
            hs = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
            want = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hs)
    text = Bundle.open(fp).components["text"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = text.encode(prompts)["encoder_hidden_states"]
    neg = text.encode(["blurry"], negative=True)["encoder_hidden_states"]
    assert np.abs(got - want.numpy()).max() <= 1e-4
    assert np.abs(neg[0] - want_neg.numpy()[0]).max() <= 1e-4
    assert (np.abs(got - neg[0]).max() > 1e-2)  # different prompts: different conditions
    assert json.loads((fp / "manifest.json").read_text())["text"]["encoders"][0]["clip_skip"] == clip_skip


@pytest.mark.parametrize("which, scheduler", [("sd1", "PNDMScheduler"), ("sd1", "DPMSolverMultistepScheduler"),
                                              ("sd2", "DDIMScheduler"), ("sd2", "EulerDiscreteScheduler")])
def test_fp32_bundle_images_equal_stable_diffusion_pipeline(which, scheduler, request):
    """Same prompts, negative prompt, initial latents and scheduler, guidance on: the fp32 bundle
    through Text2Image gives StableDiffusionPipeline's images."""
    import diffusers
    import torch
    from dmruntime.samplers import CLASS_NAMES

    folder, fp = request.getfixturevalue(which), request.getfixturevalue(f"{which}_fp")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat", "the number 7, written thin"]
    lat = np.random.default_rng(3).standard_normal((2, 4, 8, 8), dtype=np.float32)
    want = pipe(prompts, num_inference_steps=12, guidance_scale=6.0, latents=torch.from_numpy(lat), output_type="np",
                negative_prompt=["blurry"] * 2).images
    got = Text2Image(Bundle.open(fp), CLASS_NAMES[scheduler], steps=12, guidance_scale=6.0).generate(
        prompts, latents=lat, negative_prompt="blurry")
    got = np.clip(got / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the prompt matters


@pytest.fixture(scope="module")
def sd1_w8a8(sd1, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w8a8") / "bundle"
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("a cat\na dog on a skateboard\nthe number seven\nÉclair au café\n")
    assert cli.main(["build", str(sd1), "-o", str(out), "--calib-size", "8", "--calib-steps", "8", "--groups", "2",
                     "--guidance", "5", "--calib-prompts", str(prompts), "--negative-prompt", "blurry",
                     "--text-encoder", "int8", "--eval-samples", "2"]) == 0
    return out


def test_w8a8_bundle_takes_prompts_on_integer_kernels(sd1_w8a8, sd1_fp, tmp_path, capsys):
    m = json.loads((sd1_w8a8 / "manifest.json").read_text())
    assert m["build"]["fusion"]["ratio"] == 1.0 and not m["build"]["fusion"]["float"]  # 100% integer UNet
    assert m["calibration"]["prompts"].endswith("prompts.txt") and m["calibration"]["negative_prompt"] == "blurry"
    text = m["text"]
    assert text["precision"] == "int8" and 0 < text["int8"]["rel_l2_err_vs_fp32"] < 0.2
    assert text["encoders"][0]["int8"]["integer_matmuls"] > 0
    assert {"text_encoder.onnx", "tokenizer.json"} <= set(m["files"])
    # the calibration saw the prompts' encodings, guided with the negative prompt's as the null branch
    fp_text = Bundle.open(sd1_fp).components["text"]
    null = np.load(sd1_w8a8 / "null_condition.npz")["encoder_hidden_states"]
    assert np.abs(null - fp_text.encode(["blurry"], negative=True)["encoder_hidden_states"][0]).max() < 1e-6
    # prompt in, image out: both command lines, the same images
    assert cli.main(["sample", str(sd1_w8a8), "--prompt", "a cat", "--prompt", "a dog", "-n", "2",
                     "-o", str(tmp_path / "a.npy")]) == 0
    out = capsys.readouterr().out
    assert "4 image(s) of 16x16 for 2 prompt(s)" in out
    from dmruntime.cli import main as rt_main
    assert rt_main([str(sd1_w8a8), "--prompt", "a cat", "--prompt", "a dog", "-n", "2",
                    "-o", str(tmp_path / "b.npy")]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (4, 3, 16, 16) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    api = Text2Image(Bundle.open(sd1_w8a8))
    np.testing.assert_array_equal(api.generate(["a cat", "a dog"], n=2), a)
    assert np.abs(a[0] - a[2]).max() > 1e-4  # two prompts, two pictures
    # a PNG at the pipeline's resolution (one image: no border)
    assert rt_main([str(sd1_w8a8), "--prompt", "a cat", "-o", str(tmp_path / "one.png")]) == 0
    header = (tmp_path / "one.png").read_bytes()[16:24]
    assert (int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")) == (16, 16)


def test_prompt_encodings_are_cached(sd1_fp, monkeypatch):
    pipe = Text2Image(Bundle.open(sd1_fp))
    calls = []
    real = pipe.text.encode
    monkeypatch.setattr(pipe.text, "encode", lambda p, **kw: calls.append(list(p)) or real(p, **kw))
    a = pipe.encode(["a cat", "a dog", "a cat"])
    b = pipe.encode(["a dog", "a bird"])
    assert calls == [["a cat", "a dog"], ["a bird"]]
    np.testing.assert_array_equal(a["encoder_hidden_states"][1], b["encoder_hidden_states"][0])


def test_runtime_generates_without_torch(sd1_w8a8):
    code = ("import sys\nfrom dmruntime import Bundle, Text2Image\n"
            f"Text2Image(Bundle.open({str(sd1_w8a8)!r}), steps=4).generate('a cat')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'diffusers', 'transformers', 'dmcompile')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# ---- bad input: a clear message, exit code 2, nothing written


def test_bad_prompt_files(sd1, tmp_path, capsys):
    out = tmp_path / "b"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cli_fails(["build", str(sd1), "-o", str(out), "--calib-prompts", str(empty)], capsys, "holds no prompts")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cli_fails(["build", str(sd1), "-o", str(out), "--calib-prompts", str(latin)], capsys, "not valid UTF-8")
    cli_fails(["build", str(sd1), "-o", str(out), "--calib-prompts", str(tmp_path / "nope.txt")], capsys,
           "does not exist")
    assert not out.exists()


def test_long_prompts_are_truncated_with_a_warning(sd1_fp):
    pipe = Text2Image(Bundle.open(sd1_fp), steps=2)
    with pytest.warns(UserWarning, match="longer than the tokenizer's 77 tokens"):
        long = pipe.encode(["a red cat " * 50])
    np.testing.assert_array_equal(long["encoder_hidden_states"],
                                  pipe.encode([" ".join(["a red cat"] * 25)])["encoder_hidden_states"])


def test_text_bundle_without_a_prompt_says_to_pass_one(sd1_w8a8, tmp_path, capsys):
    from dmruntime.cli import main as rt_main

    cli_fails(["sample", str(sd1_w8a8), "-o", str(tmp_path / "x.png")], capsys, "text-to-image bundle", "--prompt")
    assert rt_main([str(sd1_w8a8), "-o", str(tmp_path / "x.png")]) == 2
    assert "--prompt" in capsys.readouterr().err
    cli_fails(["sample", str(sd1_w8a8), "--negative-prompt", "x", "-o", str(tmp_path / "x.png")], capsys,
           "goes with --prompt")
    assert not (tmp_path / "x.png").exists()


def test_prompt_on_a_bundle_without_text_encoder(tmp_path, capsys):
    data = Path(__file__).resolve().parents[1] / "runtimes" / "python" / "tests" / "data" / "tiny-w8a8"
    cli_fails(["sample", str(data), "--prompt", "a cat", "-o", str(tmp_path / "x.png")], capsys,
           "no text encoder", "--conditions")
    assert not (tmp_path / "x.png").exists()
    from dmruntime.text import check_prompts

    with pytest.raises(InputError, match="not valid UTF-8"):  # a command line's undecodable bytes
        check_prompts(["ok", "bad \udce9"])


def test_pipeline_folder_missing_its_tokenizer(sd1, tmp_path, capsys):
    broken = shutil.copytree(sd1, tmp_path / "pipe")
    shutil.rmtree(broken / "tokenizer")
    cli_fails(["build", str(broken), "-o", str(tmp_path / "b")], capsys, "no tokenizer/ folder")
    assert not (tmp_path / "b").exists()


def test_encoder_width_must_match_cross_attention(sd1, tmp_path, capsys):
    import transformers

    broken = shutil.copytree(sd1, tmp_path / "pipe")
    cfg = transformers.CLIPTextConfig.from_pretrained(str(broken / "text_encoder"))
    cfg.hidden_size = 48
    shutil.rmtree(broken / "text_encoder")
    transformers.CLIPTextModel(cfg).save_pretrained(str(broken / "text_encoder"))
    cli_fails(["build", str(broken), "-o", str(tmp_path / "b")], capsys, "text encoder width (text_encoder 48)",
           "cross_attention_dim 32")
    assert not (tmp_path / "b").exists()


def test_prompt_options_on_models_without_text(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    cli_fails(["build", "digits16", "-o", str(tmp_path / "b"), "--calib-prompts", str(prompts)], capsys,
           "apply to text-to-image models")
    cli_fails(["build", "digits16", "-o", str(tmp_path / "b"), "--text-encoder", "int8"], capsys,
           "applies to text-to-image models")
    assert not (tmp_path / "b").exists()


def test_eval_of_a_text_bundle_uses_prompts_on_both_sides(sd1_w8a8, sd1_fp, monkeypatch):
    """eval cycles prompts over the samples; the bundle encodes them with its int8 encoders, the
    fp reference with the fp32 ones (the int8 encoders' error counts)."""
    from dmcompile import api
    from dmcompile.config import EvalConfig, SampleConfig

    seen = []
    real = Text2Image.encode

    def spy(self, prompts, prompts_2=None):
        seen.append((self.bundle.manifest.get("format"), prompts_2, list(prompts)[:2]))
        return real(self, prompts, prompts_2)

    monkeypatch.setattr(Text2Image, "encode", spy)
    r = api.evaluate(sd1_w8a8, EvalConfig(sample=SampleConfig(n=3, steps=4)), progress=None).report
    assert r["prompts"]["source"] == "default calibration prompts" and r["paired_vs_fp"]["psnr_db_mean"] > 0
    formats = [f for f, _, _ in seen]
    assert "w8a8" in formats and "fp32" in formats
    assert r["config"]["sample"]["guidance_scale"] == 5.0  # the calibration's scale
    assert "prompt_accuracy" not in r  # not digits: no classifier to ask


def test_digit_evaluation_prompts_hold_out_phrasings():
    from dmcompile.api import HELD_OUT, eval_prompts
    from dmcompile.eval.prompts import evaluation_prompts, training_prompts

    pairs = evaluation_prompts()
    assert len(pairs) == 120 and len(HELD_OUT) == 80
    assert not HELD_OUT & {p for p, _ in training_prompts()}
    prompts, labels = eval_prompts(None, 250, digits=True)
    assert len(prompts) == 250 and prompts[:120] == [p for p, _ in pairs] and list(labels[:3]) == [0, 1, 2]
    assert all(str(d) in p or ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                               "nine"][d] in p for p, d in zip(prompts, labels))


def test_pipeline_presets_are_written_once_and_seeded(tmp_path, monkeypatch):
    """A pipeline preset (sd15's mechanism, here with tiny configs): a seeded diffusers folder
    written once under the cache, loaded like any pipeline folder, its seed recorded."""
    from dmcompile import zoo
    from dmcompile.frontend.load import load_model

    text = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77}
    unet = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
            "block_out_channels": [16, 32], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
            "attention_head_dim": 8, "norm_num_groups": 8}
    vae = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 2,
           "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "latent_channels": 4,
           "norm_num_groups": 8, "sample_size": 16}
    monkeypatch.setenv("DMCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(zoo.PIPELINE_PRESETS, "tiny-sd", (text, unet, vae, zoo.architectures.SD_SCALED_LINEAR_SCHEDULER))
    a = load_model("tiny-sd", seed=3)
    folder = tmp_path / "cache" / "presets" / "tiny-sd-seed3"
    assert (folder / "model_index.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()
    assert a.source == "preset" and a.seed == 3 and a.text[0].tokenizer_source == "vocab.json + merges.txt"
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    b, c = load_model("tiny-sd", seed=3), load_model("tiny-sd", seed=4)
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp  # written once
    wa, wb, wc = (next(m.unet.parameters()).detach().numpy() for m in (a, b, c))
    assert np.array_equal(wa, wb) and not np.array_equal(wa, wc)
    assert "tiny-sd" in zoo.names()


@pytest.mark.parametrize("target", ["openvino-cpu", "tensorrt"])
def test_text_bundles_on_the_other_targets(sd1, target, tmp_path):
    """The text encoders and tokenizer travel with every target's bundle (they run on ONNX Runtime);
    tensorrt bundles are sampled here on the CPU over their FP16 engine graphs."""
    from dmcompile import api
    from dmcompile.config import BuildConfig, CalibrationConfig

    res = api.build(str(sd1), tmp_path / "b", BuildConfig(
        profile=target, calibration=CalibrationConfig(size=2, steps=4, groups=2, batch_size=2, guidance_scale=4.0),
        eval_samples=0, correction=False), progress=None)
    assert {"text_encoder.onnx", "tokenizer.json"} <= set(res.manifest["files"])
    bundle = Bundle.open(res.path, device="cpu", cache_dir=tmp_path / "ov")
    images = Text2Image(bundle, steps=4).generate(["a cat", "a dog"])
    assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all() and np.abs(images[0] - images[1]).max() > 1e-4


def test_shipped_digits_t2i_draws_the_digit_the_prompt_names(tmp_path, capsys):
    """The zoo's trained text-to-image model: its fp32 export follows prompts (also phrasings never
    used in training), and a W8A8 bundle built from it (small calibration) runs 100% integer and
    still follows them."""
    from dmcompile import api
    from dmcompile.api import HELD_OUT, class_accuracy, eval_prompts

    prompts, digits = eval_prompts(None, 120, digits=True)
    pick = np.arange(0, 120, 3)  # 40 prompts: every digit, seen and held-out phrasings
    prompts, digits = [prompts[i] for i in pick], digits[pick]
    assert any(p in HELD_OUT for p in prompts)
    fp = Text2Image(Bundle.open(stages.fp_bundle("digits-t2i")), steps=20, guidance_scale=2.0)
    assert class_accuracy(fp.generate(prompts, seed=0), digits) >= 0.85
    out = tmp_path / "b"
    assert cli.main(["build", "digits-t2i", "-o", str(out), "--calib-size", "16", "--calib-steps", "20",
                     "--guidance", "2", "--eval-samples", "0"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["build"]["fusion"]["ratio"] == 1.0 and m["sampler"] == {"name": "pndm", "steps": 20, "karras": False}
    q = Text2Image(Bundle.open(out)).generate(prompts, seed=0)  # the calibration's sampler, steps and guidance
    assert class_accuracy(q, digits) >= 0.8
    r = api.evaluate(out, api.EvalConfig(sample=api.SampleConfig(n=20)), progress=None).report
    pa = r["prompt_accuracy"]
    assert pa["samples"] == 20 and pa["held_out_samples"] == 0 and pa["held_out_phrasings"] is None
    assert 0.7 <= pa["fp_accuracy"] <= 1 and r["prompts"]["source"] == "digit evaluation prompts"
    assert cli.main(["eval", str(out), "-n", "20"]) == 0
    assert "prompt accuracy" in capsys.readouterr().out
