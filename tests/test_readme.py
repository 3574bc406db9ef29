"""Every example in the README and in --help holds as written: each command line parses with its
program's parser, every bundle a command reads is one some README command builds, budgets are
feasible on the default model (checked against its layer map, no build), and the Python snippets
use no name they do not define."""

from __future__ import annotations

import ast
import builtins
import re
import shlex
from pathlib import Path

import pytest
from dmruntime.cli import parser as runtime_parser

import dmcompile.api as dm
from dmcompile.budget import parse_budget
from dmcompile.cli import build_parser, default_output

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLACEHOLDERS = ("BUNDLE", "TARGET", "MODEL", "path/to", "DIR")  # names the text tells the reader to replace


def code_lines(text: str) -> list[str]:
    """The lines of indented (4-space) code blocks, outside fenced blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("    ") and line.strip():
            out.append(line.strip())
    return out


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(program, argv) of every runnable command: dmcompile or python -m dmruntime, after `&&`
    splits, comments dropped; synopsis lines (with [optional] parts) are not commands."""
    out = []
    for line in code_lines(text):
        for part in line.split("&&"):
            part = part.split("  #")[0].strip()
            if "[" in part or "|" in part or not part.startswith((".venv/bin/dmcompile", "dmcompile ",
                                                                    "python -m dmruntime ")):
                continue
            words = shlex.split(part)
            if words and words[0].endswith("bin/dmcompile") or words[:1] == ["dmcompile"]:
                out.append(("dmcompile", words[1:]))
            elif words[:3] == ["python", "-m", "dmruntime"]:
                out.append(("dmruntime", words[3:]))
    return out


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


README_COMMANDS = commands(README)


def test_the_readme_has_the_main_job_and_the_test_command_first():
    first_screen = README.split("## ")[0]
    assert "bash scripts/setup.sh && .venv/bin/dmcompile build && .venv/bin/dmcompile sample" in first_screen
    assert "bash scripts/setup.sh && .venv/bin/python -m pytest -q -n 2 --dist loadfile" in first_screen
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("bash scripts/setup.sh && .venv/bin/python -m pytest -q -n 2 --dist loadfile")
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", first_screen):
        assert (ROOT / image).is_file(), image
    headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", README, re.M)}
    for anchor in re.findall(r"\]\(#([^)]+)\)", README):
        assert anchor in headings, anchor


@pytest.mark.parametrize("program,argv", README_COMMANDS, ids=[" ".join(a[:3]) for _, a in README_COMMANDS])
def test_each_readme_command_parses(program, argv):
    if "--help" in argv or "--version" in argv:
        with pytest.raises(SystemExit) as e:  # prints and exits 0
            (build_parser() if program == "dmcompile" else runtime_parser()).parse_args(argv)
        assert e.value.code == 0
        return
    if program == "dmcompile":
        build_parser().parse_args(argv)
    else:
        runtime_parser().parse_args(argv)


def test_every_bundle_a_readme_command_reads_is_built_by_one():
    built = set()
    for program, argv in README_COMMANDS:
        if program == "dmcompile" and argv[0] == "build":
            args = build_parser().parse_args(argv)
            built.add(str(args.output or default_output(args.model, args.format)))
    python_lines = [line for line in code_lines(README) if line.startswith("python benchmarks/")]
    read = []
    for program, argv in README_COMMANDS:
        if program == "dmruntime":
            read.append(runtime_parser().parse_args(argv).bundle)
        elif argv[0] in ("sample", "eval", "inspect") and "--fp" not in argv:
            read.append(argv[1])
    for line in python_lines:
        read += [w for w in shlex.split(line) if w.startswith("build/")]
    for bundle in read:
        if any(p in bundle for p in PLACEHOLDERS):
            continue
        assert bundle in built, f"{bundle} is read by a README command but no README command builds it"


def budgets_in(text: str) -> set[str]:
    return set(re.findall(r"\b(\d+(?:\.\d+)?bits|\d+(?:\.\d+)?(?:MB|KiB)|BOPs=[0-9.e+]+)\b", text))


def test_budget_examples_are_feasible_on_the_default_model():
    help_text = " ".join(a.help or "" for a in build_parser()._subparsers._group_actions[0].choices["build"]._actions)
    examples = budgets_in(README) | budgets_in(help_text) | {
        b for block in python_blocks(README) for b in re.findall(r'budget="([^"]+)"', block)}
    assert "BOPs=4e9" in examples and "5.0bits" in examples
    for text in sorted(examples):
        parse_budget(text)
        dm.check_build(None, dm.BuildConfig(recipe=dm.MixedRecipe(budget=text)))  # raises BudgetError if infeasible


def undefined_names(source: str) -> set[str]:
    tree = ast.parse(source)
    defined, used = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (defined if isinstance(node.ctx, ast.Store) else used).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return used - defined


def test_python_snippets_define_what_they_use():
    blocks = python_blocks(README)
    assert len(blocks) >= 2
    for block in blocks:
        assert undefined_names(block) == set(), block


def test_the_planted_mistakes_are_caught():
    assert undefined_names("x = f(emb)\ndef f(a): return a") == {"emb"}
    cmds = commands("    .venv/bin/dmcompile sample build/x -o a.png  # comment\n    dmcompile build [MODEL]\n")
    assert cmds == [("dmcompile", ["sample", "build/x", "-o", "a.png"])]
    with pytest.raises(Exception, match="infeasible"):
        dm.check_build(None, dm.BuildConfig(recipe=dm.MixedRecipe(budget="BOPs=1.5e9")))
