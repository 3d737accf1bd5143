#!/usr/bin/env bash
# Build Transformer Engine's PyTorch binding (transformer_engine_torch) into a wheel, on any x86-64 Linux machine:
# no GPU needed, and nothing compiles for one. The binding is a C++ extension against torch's and CUDA's headers
# (TE's CUDA kernels ship compiled in the core wheel, transformer_engine_cu13); TE's setup runs nvcc only to read
# the CUDA version. So an air-gapped cluster's wheel can be built on a CPU node with its Python and torch:
#
#   PYTHON=/path/to/venv/bin/python tools/build_te_binding.sh [WHEEL_DIR]     # default WHEEL_DIR: te-wheels
#
# PYTHON's environment must hold the torch the GPU nodes run, a CUDA 13 build (PyPI's torch since 2.11); the
# build adds CUDA's header-only CCCL and nvcc to it (cuda-toolkit[cccl,nvcc] at torch's toolkit version) and the
# build tools. On the GPU nodes (same Python and torch), with the core wheel downloaded beside it:
#   pip install --no-index --find-links WHEEL_DIR 'transformer-engine[pytorch,core-cu13]==2.11.0'
# Measured (docs/benchmarks.md): 8 minutes on 2 cores for TE 2.11.0 and torch 2.11.0, a 0.7 MB wheel.
set -euo pipefail
TE_VERSION=${TE_VERSION:-2.11.0}  # pyproject's gpu extra
PY=${PYTHON:-python3}
OUT=$(realpath -m "${1:-te-wheels}")

cuda=$("$PY" -c "import torch; print(torch.version.cuda or '')")
[ "${cuda%%.*}" = 13 ] || { echo "PYTHON's torch must be a CUDA 13 build (found: ${cuda:-a CPU build})" >&2; exit 1; }
toolkit=$("$PY" -c "from importlib.metadata import version; print(version('cuda-toolkit'))") ||
  { echo "PYTHON's torch did not bring the cuda-toolkit package: install torch with its dependencies" >&2; exit 1; }
"$PY" -m pip install -q "cuda-toolkit[cccl,nvcc]==$toolkit" 'setuptools>=77,<81' wheel packaging pybind11 ninja

# CUDA_HOME: the toolkit torch's wheels installed (nvidia/cu13); the other nvidia/*/include (cuDNN, NCCL, ...) go
# on the compiler's path, since TE's setup adds only CUDA_HOME/include when it finds a toolkit
read -r cuda_home includes < <("$PY" - <<'EOF'
import pathlib, nvidia
root = pathlib.Path(list(nvidia.__path__)[0])
print(root / "cu13", ":".join(str(p) for p in sorted(root.glob("*/include")) if p.parent.name != "cu13"))
EOF
)
start=$SECONDS
CUDA_HOME=$cuda_home CPLUS_INCLUDE_PATH=$includes NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE \
  MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$OUT" \
  "transformer-engine-torch==$TE_VERSION"
# NVTE_PYTORCH_FORCE_BUILD: TE's setup would otherwise first try to download a prebuilt binding from GitHub
echo "built in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s: $(ls "$OUT"/transformer_engine_torch-"$TE_VERSION"-*.whl)"
