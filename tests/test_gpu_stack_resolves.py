"""The ``gpu`` extra resolves together with the base dependencies for the GPU nodes (Linux x86-64, Python 3.12,
and 3.11), checked on CPU: a resolver run against the package registry over pyproject.toml's own requirements,
nothing installed. pip cannot resolve for another Python (its markers follow the running one, and it refuses
sdists with --python-version), so this uses uv's resolver, fetched with pip into a temporary folder."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from megatron_ext import gpu_stack

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = "x86_64-manylinux_2_31"  # glibc 2.31: the oldest with wheels for all of it (llguidance, from vLLM)


def gpu_requirements() -> list[str]:
    """``dependencies`` plus the ``gpu`` extra, as pyproject.toml has them. Transformer Engine's ``pytorch``
    extra is left out: those bindings are an sdist whose requirements are computed while compiling against
    the installed CUDA torch, so no resolver can read them on a CPU machine (TE's core wheels are resolved)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = []
    for line in project["dependencies"] + project["optional-dependencies"]["gpu"]:
        req = Requirement(line)
        if req.name == "transformer-engine":
            req.extras.discard("pytorch")
        out.append(str(req))
    return out


@pytest.fixture(scope="module")
def uv(tmp_path_factory) -> str:
    target = tmp_path_factory.mktemp("uv")
    try:
        subprocess.run([sys.executable, "-m", "pip", "index", "versions", "vllm"], capture_output=True, check=True,
                       timeout=20)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"package registry unreachable ({type(err).__name__})")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "uv>=0.9"], check=True,
                   timeout=120)
    return str(target / "bin" / "uv")


def resolve(uv: str, python: str, requirements: list[str], tmp_path: Path) -> dict[str, Version]:
    reqs = tmp_path / "requirements.in"
    reqs.write_text("\n".join(requirements) + "\n")
    run = subprocess.run([uv, "pip", "compile", str(reqs), "--python-version", python, "--python-platform", PLATFORM,
                          "--no-header", "--no-annotate", "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the GPU stack does not resolve for Python {python}:\n{run.stderr[-4000:]}"
    pins = (line.split("==") for line in run.stdout.splitlines() if "==" in line)
    return {canonicalize_name(name): Version(version.split(";")[0].strip()) for name, version in pins}


@pytest.mark.parametrize("python", ["3.12", "3.11"])
def test_gpu_extra_resolves_with_the_base_dependencies(uv, python, tmp_path):
    versions = resolve(uv, python, gpu_requirements(), tmp_path)
    # fla's Hopper floor met by Triton itself, not only by the tilelang that vLLM happens to bring
    assert versions["triton"] >= gpu_stack.HOPPER_BAD_TRITON[1]
    hopper = gpu_stack.Stack((9, 0), "NVIDIA H100", {name: str(versions[name]) if name in versions else None
                                                      for name in gpu_stack.PACKAGES})
    assert gpu_stack.problems(hopper) == []  # the trainer's own start-up check passes this set


def test_a_conflicting_pin_is_reported(uv, tmp_path):
    """The check can fail: a transformers newer than vLLM 0.33.0 allows (the CPU install's 5.24) is refused."""
    reqs = [r for r in gpu_requirements() if not r.startswith("transformers")] + ["transformers==5.24.0"]
    with pytest.raises(AssertionError, match=r"does not resolve(.|\n)*vllm(.|\n)*transformers"):
        resolve(uv, "3.12", reqs, tmp_path)
