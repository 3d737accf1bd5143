"""The code that reaches into transformers' internals, run under the transformers of the GPU nodes: 5.17.0
(the GPU image's) and 5.20.2 (the top of the ``gpu`` extra's range: vLLM 0.33.0 allows >= 5.16.1, < 5.21).
The CPU install resolves a newer one (5.24), and internals moved in between: ``create_causal_mask``'s cache
argument was renamed, and 5.17's Qwen3.5 rotary embedding wants position ids on the three mRoPE axes; both
broke ``evaluation.mtp`` on GPU nodes while every test here passed. Each version is installed into a
temporary folder (no dependencies) and put in front of the environment's for a pytest run of those tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.network

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = {"5.17.0": ["huggingface-hub>=1.5,<2"], "5.20.2": []}  # 5.17 refuses the hub 2.x the CPU install has
TESTS = ["tests/test_mtp.py", "tests/test_model_parity.py",  # the MTP head and the reference model's wiring
         # the GPU check's parity part: it swaps transformers' kernel functions for their torch references
         "tests/test_gpu_check.py::test_parity_compares_model_code_on_transformers_reference_kernels",
         "tests/test_gpu_check.py::test_parity_part_on_cpu"]


@pytest.mark.parametrize("version", VERSIONS)
def test_transformers_internals_we_use_hold_on_the_gpu_nodes_versions(version, tmp_path):
    overlay = tmp_path / "site"
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(overlay),
                        f"transformers=={version}", *VERSIONS[version]], check=True, capture_output=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"transformers {version} could not be installed from the package registry ({type(err).__name__})")
    env = {**os.environ, "PYTHONPATH": str(overlay)}
    found = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert found == version
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider", *TESTS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"under transformers {version}:\n{run.stdout[-4000:]}"
