"""docker/: the Dockerfiles stay honest without a container engine. Every COPY source exists
(and is not excluded by .dockerignore), the compiler images install with the README's setup
step and the runtime image with the README's runtime-only install, the entry points exist, and
every image ends as a non-root user."""

import json
import re
import shlex
import tomllib

import pytest
from conftest import ROOT

DOCKER = ROOT / "docker"
IMAGES = ("Dockerfile.cpu", "Dockerfile.runtime", "Dockerfile.tensorrt")


def instructions(path):
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def final_stage(steps):
    start = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[start:]


def readme_commands():
    return [l.strip() for l in (ROOT / "README.md").read_text().splitlines() if l.startswith("    ")]


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist_and_are_in_the_context(name):
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    copies = [a for k, a in instructions(DOCKER / name) if k == "COPY" and "--from" not in a]
    assert copies
    for args in copies:
        *sources, _dest = shlex.split(args)
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file in the repository"
            assert src.split("/")[0] not in ignored, f"{name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("name", ("Dockerfile.cpu", "Dockerfile.tensorrt"))
def test_compiler_images_install_with_the_readme_setup(name):
    runs = " ".join(a for k, a in instructions(DOCKER / name) if k == "RUN")
    setup = "bash scripts/setup.sh"
    assert any(c.startswith(setup) for c in readme_commands()), "README no longer installs with scripts/setup.sh"
    assert setup in runs
    # What setup.sh needs from the context is copied.
    copied = " ".join(a for k, a in instructions(DOCKER / name) if k == "COPY")
    for need in ("pyproject.toml", "scripts/setup.sh", "runtimes/python", "dmcompile"):
        assert need in copied, f"{name} does not copy {need}"


def test_runtime_image_installs_like_the_readme():
    runs = " ".join(a for k, a in instructions(DOCKER / "Dockerfile.runtime") if k == "RUN")
    install = re.search(r"pip install (\./runtimes/python)\b", runs)
    assert install, "Dockerfile.runtime must pip install ./runtimes/python"
    assert any(re.search(r"pip install \./runtimes/python$", c) for c in readme_commands()), \
        "README's runtime-only install is not `pip install ./runtimes/python`"
    # only the runtime: no torch, no compiler in that image
    assert "torch" not in runs and "setup.sh" not in runs


def test_entry_points_exist():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name in IMAGES:
        entry = [a for k, a in instructions(DOCKER / name) if k == "ENTRYPOINT"]
        assert len(entry) == 1, name
        argv = json.loads(entry[0])  # the exec form, so signals reach the process
        if argv[:2] == ["python", "-m"]:
            assert (ROOT / "runtimes" / "python" / argv[2] / "__main__.py").is_file(), name
        else:
            assert argv[0] in scripts, f"{name}: entry point {argv[0]} is not a console script"


@pytest.mark.parametrize("name", IMAGES)
def test_images_run_as_a_non_root_user(name):
    users = [a for k, a in final_stage(instructions(DOCKER / name)) if k == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{name} must end with a non-root USER"


def test_docker_readme_mounts_the_bundle_read_only():
    text = (DOCKER / "README.md").read_text()
    bundle_runs = [l for l in text.splitlines() if ("docker run" in l or "podman run" in l) and ":/bundle" in l]
    assert bundle_runs and all(":/bundle:ro" in l for l in bundle_runs)
    for name in IMAGES:
        assert f"docker/{name}" in text
