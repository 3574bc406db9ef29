"""CLI and user-facing errors: clear messages, exit code 2, no tracebacks."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from dmcompile import api
from dmcompile.cli import main
from dmcompile.errors import ModelError


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("export", "sample", "eval"):
        assert cmd in out


def test_console_script_error_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dmcompile.cli", "export", "no-such-model", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown model 'no-such-model'" in r.stderr and "digits16" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("setup,needle", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "config.json is missing"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{oops")), "not valid JSON"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"_class_name": "UNet2DModel", "block_out_channels": 5}'),
                (d / "diffusion_pytorch_model.safetensors").write_bytes(b""),
                (d / "scheduler_config.json").write_text("{}")), "not describe a valid UNet2DModel"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"_class_name": "UNet3DConditionModel"}')),
     "not supported yet"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"), (d / "diffusion_pytorch_model.bin").write_bytes(b"x")),
     "never loads pickled weights"),
])
def test_bad_model_folders(tmp_path, capsys, setup, needle):
    d = tmp_path / "model"
    setup(d)
    with pytest.raises(ModelError, match=needle):
        api.load_model(str(d))
    assert main(["export", str(d), "-o", str(tmp_path / "out")]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_scheduler_config(tiny_model_dir, tmp_path):
    import shutil

    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (d / "scheduler_config.json").unlink()
    with pytest.raises(ModelError, match="no scheduler_config.json"):
        api.load_model(str(d))


def test_pipeline_folder_layout(tiny_model_dir, tmp_path):
    """A diffusers pipeline folder (unet/ + scheduler/) is accepted too."""
    import shutil

    root = tmp_path / "pipe"
    shutil.copytree(tiny_model_dir, root / "unet")
    (root / "scheduler").mkdir()
    shutil.move(root / "unet" / "scheduler_config.json", root / "scheduler" / "scheduler_config.json")
    m = api.load_model(str(root))
    assert m.sample_shape == (2, 8, 8)


def test_sample_needs_a_bundle_or_fp(tmp_path, capsys):
    assert main(["sample", "digits16", "-o", str(tmp_path / "g.png")]) == 2
    assert "is a model, not a bundle" in capsys.readouterr().err


def test_export_sample_eval_roundtrip(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(tiny_model_dir), "-o", str(out)]) == 0
    assert "parity vs PyTorch" in capsys.readouterr().out
    assert main(["sample", str(out), "-n", "5", "--steps", "4", "-o", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    assert main(["sample", str(tiny_model_dir), "--fp", "-n", "5", "--steps", "4", "-o", str(tmp_path / "h.png")]) == 0
    assert (tmp_path / "g.png").read_bytes() == (tmp_path / "h.png").read_bytes()
    assert main(["eval", str(out), "-n", "6", "--steps", "4", "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert rep["paired_vs_fp"]["psnr_db_median"] > 80  # fp32 ONNX vs PyTorch: same trajectories
    assert "digits" not in rep  # FD applies to digits-shaped models only


def test_bad_sample_arguments(tiny_export, tmp_path, capsys):
    assert main(["sample", str(tiny_export), "-n", "0", "-o", str(tmp_path / "g.png")]) == 2
    assert "n must be >= 1" in capsys.readouterr().err
    assert main(["sample", str(tiny_export), "--steps", "0", "-o", str(tmp_path / "g.png")]) == 2
    assert not (tmp_path / "g.png").exists()


def test_cli_defaults_are_the_configs_defaults():
    """The CLI takes its defaults and choices from the config classes: parsing `build` and
    `sample` with no options gives the default configs."""
    from dmcompile.cli import _analysis_config, _calibration_config, _recipe, _sample_config, build_parser
    from dmcompile.config import OBSERVERS, BuildConfig, SampleConfig

    args = build_parser().parse_args(["build"])
    cfg = BuildConfig(recipe=_recipe(args), profile=args.target, calibration=_calibration_config(args),
                      analysis=_analysis_config(args), eval_samples=args.eval_samples, seed=args.seed,
                      correction=not args.no_correction, step_aware=args.step_aware)
    assert cfg == BuildConfig()
    args = build_parser().parse_args(["sample", "x", "-o", "g.png"])
    assert _sample_config(args, SampleConfig().n) == SampleConfig()
    build = next(a for a in build_parser()._subparsers._group_actions[0].choices["build"]._actions
                 if a.dest == "observer")
    assert tuple(build.choices) == OBSERVERS


def test_sample_refuses_an_eta_that_makes_nan_and_writes_nothing(tmp_path, capsys):
    bundle = ROOT / "runtimes" / "python" / "tests" / "data" / "tiny-w8a8"
    for eta in ("2", "inf", "nan"):
        out = tmp_path / f"e{eta}.png"
        assert main(["sample", str(bundle), "--eta", eta, "-n", "2", "--steps", "2", "-o", str(out)]) == 2
        assert "eta must be in [0, 1]" in capsys.readouterr().err and not out.exists()


def test_negative_seeds_are_refused_before_any_work(tmp_path, capsys):
    bundle = ROOT / "runtimes" / "python" / "tests" / "data" / "tiny-w8a8"
    assert main(["build", "-o", str(tmp_path / "b"), "--seed", "-1"]) == 2
    assert main(["sample", str(bundle), "--seed", "-1", "-n", "1", "--steps", "2", "-o", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("seed must be an integer >= 0") == 2 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
