#!/usr/bin/env bash
# On a lent GPU machine, in the project root where the device tool runs each command: keep the folders that
# .ci/device/prepare.sh wrote and the calls carried, install them into /tmp/site, run a command there.
#   bash .ci/device/stage.sh keep DIR...    copy this call's folders to /tmp/keep (a later call removes them)
#   bash .ci/device/stage.sh run CMD...     put every kept folder back, install (once per machine), then run CMD
#                                           with PYTHONPATH=/tmp/site:$PWD, unbuffered (rows print as they come)
set -euo pipefail
site=/tmp/site
case "${1:-}" in
keep)
  shift
  mkdir -p /tmp/keep && cp -r --parents "$@" /tmp/keep/
  echo "kept: $(ls -A /tmp/keep | tr '\n' ' ')($(du -sh /tmp/keep | cut -f1))"
  ;;
run)
  shift
  if [ ! -f $site/.installed ]; then
    start=$SECONDS
    cp -r /tmp/keep/. .
    python -m pip install -q --no-index --no-deps --target $site .whl/*.whl
    cat .t1/part.* .t2/part.* .t3/part.* | xz -d | tar -x -C $site  # Triton 3.7.1, over the image's
    if [ -d .te1 ]; then  # Transformer Engine: the core wheel, the binding, and the dependencies the image lacks
      core=/tmp/$(cat .te1/name)
      cat .te1/part.* .te2/part.* .te3/part.* > "$core"
      missing=$(python - .tew/*.whl <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
for wheel in sys.argv[1:]:
    name = Path(wheel).name.split("-")[0]
    try:
        version(name)
    except PackageNotFoundError:
        print(wheel)
PY
)
      python -m pip install -q --no-index --no-deps --target $site "$core" $missing
    fi
    touch $site/.installed
    echo "installed into $site in $((SECONDS - start)) s"
  fi
  export PYTHONPATH=$site:$PWD PYTHONUNBUFFERED=1
  python - <<'PY'
from importlib.metadata import PackageNotFoundError, version
names = ("torch", "triton", "megatron-core", "flash-linear-attention", "transformers", "transformer-engine",
         "transformer-engine-cu13", "transformer-engine-torch")
found = []
for name in names:
    try:
        found.append(f"{name} {version(name)}")
    except PackageNotFoundError:
        pass
print("; ".join(found))
PY
  exec "$@"
  ;;
*)
  echo "usage: stage.sh keep DIR... | stage.sh run CMD..." >&2
  exit 2
  ;;
esac
