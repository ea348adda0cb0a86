#!/usr/bin/env bash
# Fills .carry/ (git-ignored) with what benchmarks/gpu/run.sh needs on the GPU machine, which has
# no network and no ../shared: the JPEG archive and Alice text, the mirror's serve.py (it reads
# ../data beside itself, so the layout is kept), and wheels of the Python packages the device
# image lacks (its python3 is 3.12, x86-64; KINDS.md lists what it has: no pydantic).
#   bash benchmarks/gpu/stage_carry.sh [SHARED_DIR]      # default: ../shared, else /work/shared
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${1:-../shared}
[ -d "$SHARED/mirror" ] || SHARED=/work/shared
CARRY=.carry
mkdir -p "$CARRY/mirror" "$CARRY/data" "$CARRY/wheels"
cp -f "$SHARED/mirror/serve.py" "$CARRY/mirror/serve.py"
cp -f "$SHARED/data/cifar10-jpeg.tar.gz" "$SHARED/data/alice-11-0.txt" "$CARRY/data/"
# pydantic and what it needs, pinned to the versions this project is tested with (pip show here)
PY=${PYTHON:-python3}
pins=$($PY - <<'PYEOF'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection",
                                            "typing-extensions")))
PYEOF
)
rm -f "$CARRY"/wheels/*.whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" $pins
du -sh "$CARRY" "$CARRY"/wheels/*
