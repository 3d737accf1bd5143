#!/usr/bin/env bash
# For a session lent a GPU machine (the `device` tool): on this CPU machine, from the project root, put what the
# GPU image lacks into git-ignored folders that one device call each can carry (64 MiB a call), then print the
# calls. The image has Python 3.12, torch 2.11.0+cu130, Triton 3.6, transformers; no megatron-core, fla,
# datatrove or Transformer Engine, and no network.
#
#   .ci/device/prepare.sh         ../shared/device/wheelhouse.sh: .whl/ (megatron-core, fla, datatrove and what
#                                 they need) and .t1/ .t2/ .t3/ (Triton 3.7.1: fla refuses the GDN backward on
#                                 Hopper with Triton < 3.7.1)
#                                 and out/gpu_check/mix (the demo mix, built here: gpu_check's default --workdir)
#   .ci/device/prepare.sh --te    and Transformer Engine 2.11.0: .tew/ (TE's Python package, its torch binding
#                                 built here by tools/build_te_binding.sh, TE's dependencies) and .te1/ .te2/
#                                 .te3/ (the 171 MiB core wheel, split); the first time about 10 minutes (the
#                                 image's torch, 2.11.0 with its CUDA wheels, into a venv; the binding's build;
#                                 14 minutes in all on 2026-11-30); TE_PYTHON: a Python 3.12 to build it with
#
# On the machine, .ci/device/stage.sh keeps each call's folders and installs them all into /tmp/site. Tried on
# this machine in a Python 3.12 venv with torch 2.11.0+cu130 and transformers 5.17.0 standing in for the image:
# everything installed and imported, TE included; not yet on a GPU.
set -euo pipefail
[ -f pyproject.toml ] || { echo "run from the project root" >&2; exit 1; }
TE_VERSION=2.11.0  # pyproject's gpu extra
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
exclude() { for d in "$@"; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done; }
# a Python 3.12 that runs (the image's, for the binding's build): TE_PYTHON, python3.12, or pyenv's 3.12.x (its shim
# for python3.12 fails where 3.12 is installed but not selected: that cost a session the wheelhouse's minutes first)
python312() {
  local p
  for p in ${TE_PYTHON:-} python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python; do
    "$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' > /dev/null 2>&1 && { echo "$p"; return; }
  done
  echo "prepare.sh: no Python 3.12 that runs found: set TE_PYTHON to one" >&2
  return 1
}
venv=${TE_VENV:-/tmp/te-venv}  # where the binding is built: a venv of the image's Python and torch
binding_built() { ls .tew/transformer_engine_torch-"$TE_VERSION"-*.whl > /dev/null 2>&1; }
if [ "${1:-}" = --te ] && ! binding_built && [ ! -x "$venv/bin/python" ]; then PY312=$(python312) || exit 1; fi

../shared/device/wheelhouse.sh
# the demo mix that gpu_check's resume and te_* parts train on: the image has neither datatrove nor all of its
# dependencies, and the trainer needs only the built mix
mix=out/gpu_check/mix
[ -f $mix/mix.json ] || .venv/bin/python -c "from preprocessing.build_mix import build; from preprocessing.recipe \
import MixRecipe; build(MixRecipe.load('data/demo/recipe.yaml', output_dir='$PWD/$mix'))" > /dev/null
calls=(".t1 .whl" ".t2" ".t3 $mix")
if [ "${1:-}" = --te ]; then
  exclude .tew .te1 .te2 .te3
  mkdir -p .tew
  if ! binding_built; then
    # the binding compiles against the image's torch: PyPI's 2.11.0 is the image's 2.11.0+cu130
    [ -x "$venv/bin/python" ] || "$PY312" -m venv "$venv"  # the image's Python: 3.12
    "$venv/bin/python" -m pip install -q torch==2.11.0
    PYTHON="$venv/bin/python" tools/build_te_binding.sh .tew
  fi
  # TE's Python package and its dependencies, resolved for the image's Python (stage.sh installs those the image
  # lacks); less the big ones its torch and transformers bring, which would not fit in a call with .t2
  python3 -m pip download -q "${PLAT[@]}" -d .tew "transformer-engine==$TE_VERSION" einops onnxscript pydantic \
    2>&1 | grep -v '^WARNING' || true
  rm -f .tew/numpy-*.whl .tew/sympy-*.whl .tew/mpmath-*.whl
  if [ ! -f .te3/part.02 ]; then
    tmp=$(mktemp -d)
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$tmp" "transformer-engine-cu13==$TE_VERSION" 2>&1 | grep -v '^WARNING' || true
    core=$(ls "$tmp"/transformer_engine_cu13-*.whl)
    (cd "$tmp" && split -b 58M -d "$core" part.)
    basename "$core" > "$tmp/name"
    mkdir -p .te1 .te2 .te3
    mv "$tmp/part.00" "$tmp/name" .te1/ && mv "$tmp/part.01" .te2/ && mv "$tmp/part.02" .te3/
    rm -rf "$tmp"
  fi
  calls=(".t1 .whl" ".t2 .tew" ".te1" ".te2" ".te3" ".t3 $mix")
fi
du -sh .whl .t[123] .te? $mix 2>/dev/null | tr '\n' ' '; echo
echo "device calls, back to back (a machine idles out after 30 s); each names its folders in carry:"
last=$((${#calls[@]} - 1))
for i in "${!calls[@]}"; do
  if [ "$i" -lt "$last" ]; then
    echo "  carry [${calls[$i]}]: bash .ci/device/stage.sh keep ${calls[$i]}"
  else
    echo "  carry [${calls[$i]}] + the tree: bash .ci/device/stage.sh keep ${calls[$i]} && bash .ci/device/stage.sh run CMD..."
  fi
done
echo "CMD: bash .ci/device/session.sh 530 (one call of 560 s), or two calls: session.sh 330 check, then session.sh 420"
echo "bench (the second carries nothing); fla's tuned configurations serve sm90 GPUs (H100, H200)"
