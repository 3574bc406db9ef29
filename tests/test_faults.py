"""Faults: what killed runs leave is reclaimed, interrupts end in one line and 130 / 143,
concurrent writers are safe, bad outputs and budgets are refused before any work, and the two
command lines accept and refuse the same things."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dmruntime import Bundle
from dmruntime.cli import main as runtime_main
from dmruntime.cli import run_main
from dmruntime.progress import Progress, reporter

from dmcompile import api, scratch
from dmcompile.artifacts import BUNDLE, atomic_dir
from dmcompile.cli import default_output
from dmcompile.cli import main as compiler_main
from dmcompile.config import BuildConfig, CalibrationConfig, MixedRecipe
from dmcompile.errors import BudgetError, ConfigError, ModelError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "runtimes" / "python" / "tests" / "data" / "tiny-w8a8"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "runtimes" / "python")])}


def hold_temp_dir(parent: Path) -> subprocess.Popen:
    """A process that makes a locked temporary folder in ``parent``, says where, and waits."""
    code = ("import sys, time; from dmcompile import scratch; "
            f"p = scratch.temp_dir({str(parent)!r}, 'out'); (p / 'big.bin').write_bytes(b'x' * 1000); "
            "print(p, flush=True); time.sleep(120)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)


def age(path: Path, seconds: float = 3600) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_killed_runs_temporary_folder_is_reclaimed_and_a_live_ones_is_not(tmp_path):
    live, dead = hold_temp_dir(tmp_path), hold_temp_dir(tmp_path)
    try:
        live_dir, dead_dir = Path(live.stdout.readline().strip()), Path(dead.stdout.readline().strip())
        assert scratch.is_temporary(live_dir) and f".tmp-{live.pid}-" in live_dir.name
        dead.kill()  # kill -9: no cleanup of its own
        dead.wait()
        age(live_dir), age(dead_dir)
        mine = tmp_path / "keep.tmp-1-user"  # a user's file in the same folder: never touched
        mine.write_text("user data")
        with atomic_dir(tmp_path / "out", BUNDLE) as tmp:  # the next run into the same folder
            (tmp / "manifest.json").write_text(json.dumps({"kind": "dmcompile-bundle", "files": []}))
        assert not dead_dir.exists() and live_dir.is_dir() and mine.read_text() == "user data"
        assert scratch.in_use(live_dir) and (tmp_path / "out" / "manifest.json").is_file()
    finally:
        live.kill()
        live.wait()
    assert scratch.reclaim(tmp_path) == [live_dir]  # its owner is gone now too


def test_cache_info_and_clean(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DMCOMPILE_CACHE", str(cache))
    (cache / "calib" / "entry").mkdir(parents=True)
    (cache / "calib" / "entry" / "calibration.json").write_text("{}")
    held = hold_temp_dir(cache / "calib")
    try:
        held_dir = Path(held.stdout.readline().strip())
        stale = scratch.temp_dir(cache / "calib", "moments")
        (stale / "m.npy").write_bytes(b"x" * 5000)
        scratch.release(stale)  # as if its owner had died
        legacy = cache / "calib" / ".moments-tmp-abcd1234"  # what dmcompile before owner-PID names left
        legacy.mkdir()
        for p in (stale, legacy, held_dir):
            age(p, 7200)
        assert compiler_main(["cache"]) == 0
        out = capsys.readouterr().out
        assert "stale temporaries (dmcompile cache --clean removes them): 2" in out
        assert "temporaries of running builds: 1" in out and "calib      1 entries" in out
        assert compiler_main(["cache", "--clean"]) == 0
        assert not stale.exists() and not legacy.exists() and held_dir.is_dir()
        assert (cache / "calib" / "entry" / "calibration.json").is_file()
        assert compiler_main(["cache", "--all"]) == 2  # --all only with --clean
        assert compiler_main(["cache", "--clean", "--all"]) == 0
        assert not (cache / "calib" / "entry").exists() and held_dir.is_dir()  # a running build's stays
    finally:
        held.kill()
        held.wait()


def test_interrupts_print_one_line_and_exit_130_or_143(tmp_path, capsys):
    def interrupted():
        with atomic_dir(tmp_path / "out", BUNDLE):
            raise KeyboardInterrupt

    def terminated():
        with atomic_dir(tmp_path / "out", BUNDLE):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    assert run_main("prog", interrupted, interrupted="interrupted; rerun to resume") == 130
    assert run_main("prog", terminated, interrupted="interrupted; rerun to resume") == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prog: interrupted; rerun to resume", "prog: terminated (SIGTERM); rerun to resume"]
    assert list(tmp_path.iterdir()) == []  # both temporaries removed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_runtime_cli_sigterm_while_sampling(tmp_path):
    out = tmp_path / "g.png"
    p = subprocess.Popen([sys.executable, "-m", "dmruntime", str(FIXTURE), "-n", "4000", "--steps", "1000",
                          "-o", str(out)], stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stderr.readline().startswith("ddim: started")  # a log gets lines, not bars
        p.send_signal(signal.SIGTERM)
        err = p.stderr.read()
        assert p.wait(timeout=60) == 143
    finally:
        p.kill()  # never left sampling 4000 x 1000 steps behind a failed assertion
    assert err.strip().splitlines() == ["python -m dmruntime: terminated (SIGTERM); nothing was written"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_builds_into_one_folder_at_once(tiny_model_dir, tmp_path):
    """Both finish (the last rename wins), sharing a cold cache they both write."""
    env = {**ENV, "DMCOMPILE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "dmcompile.cli", "build", str(tiny_model_dir), "-o", str(tmp_path / "b"),
           "--calib-size", "2", "--calib-steps", "4", "--groups", "2", "--eval-samples", "0", "--no-correction"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    Bundle.open(tmp_path / "b")  # whole and valid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "cache"]  # no temporaries beside it
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if scratch.is_temporary(p)]
    assert leftovers == []
    assert len(list((tmp_path / "cache" / "calib").iterdir())) == 1  # one entry, written twice


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "manifest.json").write_text(json.dumps({"kind": "dmcompile-bundle", "files": []}))
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="read-only"):
            api.build(None, ro)
    finally:
        ro.chmod(0o755)
    with pytest.raises(ConfigError, match="cannot write"):
        api.build(None, Path("/proc/dmcompile-out"))
    for argv in (["sample", str(FIXTURE), "-o", "/proc/x.png", "-n", "1", "--steps", "1"],
                 ["sample", str(FIXTURE), "-o", str(tmp_path / "noext"), "-n", "1", "--steps", "1"],
                 ["inspect", str(FIXTURE), "--no-fusion", "--plots", "/proc/plots"],
                 ["eval", str(FIXTURE), "--out", "/proc/eval", "-n", "1", "--steps", "1"]):
        assert compiler_main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "cannot write in /proc" in err and "must end in .png" in err
    assert err.count("cannot write in /proc") == 3 and "Traceback" not in err
    assert default_output(".", "w8a8").name == f"{Path.cwd().name}-w8a8"
    assert default_output("digits16", "mixed").as_posix() == "build/digits16-mixed"


BAD_SAMPLING = [["--batch-size", "0"], ["--eta", "nan"], ["--eta", "2"], ["--seed", "-1"], ["-n", "0"],
                ["--steps", "0"], ["--sampler", "lms"], ["--sampler", "ddim", "--karras"],
                ["--sampler", "euler", "--eta", "0.5"], ["--sampler", "pndm", "--steps", "3"], ["--steps", "1001"]]


@pytest.mark.parametrize("bad", BAD_SAMPLING, ids=lambda a: " ".join(a))
def test_both_command_lines_refuse_the_same_sampling_arguments(bad, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert compiler_main(["sample", str(FIXTURE), "-o", str(out), *bad]) == 2
    assert runtime_main([str(FIXTURE), "-o", str(out), *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(": error: " in line for line in err), err
    assert not out.exists()


def test_runtime_cli_options(tmp_path, capsys):
    assert runtime_main([str(FIXTURE), "-o", str(tmp_path / "x.png"), "--threads", "-3"]) == 2
    assert "threads must be an integer >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        runtime_main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("dmruntime ")
    (tmp_path / "c.npz").write_text("not an npz")
    assert runtime_main([str(FIXTURE), "-o", str(tmp_path / "x.png"), "--conditions", str(tmp_path / "c.npz")]) == 2
    err = capsys.readouterr().err
    assert "not an .npz archive" in err and "allow_pickle" not in err


def test_an_infeasible_budget_is_refused_before_calibration(tiny_model_dir, tmp_path, monkeypatch):
    from dmcompile import stages
    from dmcompile.budget import parse_budget

    calls = []
    monkeypatch.setattr(stages, "cached_calibration", lambda *a, **k: calls.append(1))
    cfg = BuildConfig(recipe=MixedRecipe(budget=parse_budget("bops=1")), calibration=CalibrationConfig(size=2, steps=4, groups=2),
                      eval_samples=0)
    with pytest.raises(BudgetError, match="infeasible"):
        api.build(str(tiny_model_dir), tmp_path / "b", cfg, progress=None)
    assert calls == [] and not (tmp_path / "b").exists()


def test_bad_scheduler_configs_and_weights_are_refused_at_load(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((bad / "scheduler_config.json").read_text())
    (bad / "scheduler_config.json").write_text(json.dumps({**cfg, "beta_end": -1}))
    with pytest.raises(ModelError, match="beta_end must be a finite number >= 0"):
        api.load_model(str(bad))
    (bad / "scheduler_config.json").write_text(json.dumps(cfg))
    weights = next(bad.glob("*.safetensors"))
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(weights))
    with pytest.raises(ModelError, match=f"weight {key} .* NaN or inf"):
        api.load_model(str(bad))


def test_progress_bars_on_a_terminal_lines_in_a_log():
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    log, tty = io.StringIO(), Tty()
    for stream in (log, tty):
        p = Progress("auto", stream, label="calibrate")
        for i in range(1, 101):
            p(i, 100)
        with p.stage("write"):
            p("calibration: resuming after 2 of 6 trajectories", 0, 0)
    assert "\r" not in log.getvalue()
    assert log.getvalue().splitlines()[0] == "calibrate: started (100 steps)"
    assert len(log.getvalue().splitlines()) == 5 and "calibrate: done in" in log.getvalue()
    assert "calibration: resuming after 2 of 6 trajectories\n" in log.getvalue()
    assert "\r" in tty.getvalue() and "calibrate: done in" in tty.getvalue()
    assert "step/s" not in tty.getvalue()
    assert reporter(None) is None and reporter("off") is None and reporter(print) is print
    with pytest.raises(ValueError, match="progress must be one of"):
        reporter("loud")


def test_build_reports_every_step(tiny_model_dir, tmp_path):
    from dmcompile.compiler import build_steps

    seen = []
    cfg = BuildConfig(calibration=CalibrationConfig(size=2, steps=4, groups=2), eval_samples=0, correction=False)
    api.build(str(tiny_model_dir), tmp_path / "b", cfg, progress=lambda label, i, n: seen.append((label, i, n)))
    ran = [s.name for s in build_steps(cfg.profile) if s.when is None or s.when(cfg)]
    for name in ran:
        assert (name, 0, 1) in seen and (name, 1, 1) in seen, name
    assert len(ran) >= 4


def test_eval_json_prints_only_json_on_stdout(tiny_export, capsys):
    assert compiler_main(["eval", str(tiny_export), "-n", "2", "--steps", "2", "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out)  # nothing but the JSON
    assert report["paired_vs_fp"]["psnr_db_mean"] > 0


def test_calibration_batch_size_option_reaches_the_config():
    from dmcompile.cli import _calibration_config, build_parser

    args = build_parser().parse_args(["build", "--calib-batch-size", "8"])
    assert _calibration_config(args).batch_size == 8
