"""No command deletes or overwrites what dmcompile did not write: an output path holding
anything else is a one-line error (exit code 2) and stays untouched. Earlier outputs of the
same kind, and empty folders, are replaced."""

import json

import pytest

from dmcompile.cli import main

BUILD = ["--groups", "2", "--calib-size", "2", "--calib-steps", "4", "--eval-samples", "0", "--no-correction"]


def user_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("years of work")
    return path


def untouched(path):
    names = sorted(p.name for p in path.iterdir())
    return names == ["thesis.txt"] and (path / "thesis.txt").read_text() == "years of work"


@pytest.fixture(scope="module")
def bundle(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "b"
    assert main(["build", str(tiny_model_dir), "-o", str(out), *BUILD]) == 0
    return out


def commands(tiny_model_dir, bundle):
    """Every command that writes a folder, as a function of that folder."""
    m = str(tiny_model_dir)
    return {
        "build": lambda o: ["build", m, "-o", str(o), *BUILD],
        "export": lambda o: ["export", m, "-o", str(o)],
        "analyze": lambda o: ["analyze", m, "-o", str(o), "--groups", "2", "--calib-size", "2", "--calib-steps", "4",
                              "--rd-samples", "1", "--rd-weight-bits", "4", "8", "--rd-act-bits", "8"],
        "eval --out": lambda o: ["eval", str(bundle), "-n", "2", "--steps", "2", "--out", str(o)],
        "inspect --plots": lambda o: ["inspect", str(bundle), "--no-fusion", "--plots", str(o)],
    }


@pytest.mark.parametrize("command", ["build", "export", "analyze", "eval --out", "inspect --plots"])
def test_a_users_folder_is_never_replaced(command, tiny_model_dir, bundle, tmp_path, capsys):
    argv = commands(tiny_model_dir, bundle)[command]
    target = user_folder(tmp_path / "mine")
    assert main(argv(target)) == 2
    err = capsys.readouterr().err
    assert "refusing to replace it" in err and "thesis.txt" in err and "Traceback" not in err
    assert untouched(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind
    # a file where a folder should be is refused too
    (tmp_path / "file").write_text("x")
    assert main(argv(tmp_path / "file")) == 2
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("command", ["build", "export", "analyze", "eval --out", "inspect --plots"])
def test_empty_folders_and_earlier_outputs_are_replaced(command, tiny_model_dir, bundle, tmp_path, capsys):
    argv = commands(tiny_model_dir, bundle)[command]
    out = tmp_path / "out"
    out.mkdir()
    assert main(argv(out)) == 0  # empty: written
    before = sorted(p.name for p in out.iterdir())
    marker = next(p for p in out.iterdir() if p.suffix == ".json" and p.name != "layer_map.json")
    meta = json.loads(marker.read_text())
    assert meta["kind"].startswith("dmcompile-") and set(meta["files"]) <= set(before)
    inode = out.stat().st_ino
    assert main(argv(out)) == 0  # an earlier output of the same kind: replaced (a new folder renamed in)
    assert out.stat().st_ino != inode and sorted(p.name for p in out.iterdir()) == before
    (out / "extra.txt").write_text("mine")  # the user added a file: no longer ours to replace
    assert main(argv(out)) == 2
    assert (out / "extra.txt").read_text() == "mine"


def test_outputs_of_another_kind_are_not_replaced(tiny_model_dir, bundle, tmp_path, capsys):
    cmds = commands(tiny_model_dir, bundle)
    plots = tmp_path / "plots"
    assert main(cmds["inspect --plots"](plots)) == 0
    assert main(cmds["eval --out"](plots)) == 2  # a plots folder is not an evaluation folder
    assert "is not a dmcompile evaluation folder" in capsys.readouterr().err
    assert (plots / "plots.json").is_file() and not (plots / "eval.json").exists()


def test_sample_never_overwrites_a_file_it_did_not_write(bundle, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG not ours")
    assert main(["sample", str(bundle), "-n", "2", "--steps", "2", "-o", str(photo)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert photo.read_bytes() == b"\x89PNG not ours"
    grid = tmp_path / "grid.png"
    assert main(["sample", str(bundle), "-n", "2", "--steps", "2", "-o", str(grid)]) == 0
    assert main(["sample", str(bundle), "-n", "3", "--steps", "2", "-o", str(grid)]) == 0  # our own grid: replaced
