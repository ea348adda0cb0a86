#!/usr/bin/env bash
# airbench94 on the GPU machine, in one command: install the carried wheels, rebuild the mirror's
# CIFAR-10 from the carried JPEG archive, download (file:// URL + md5) and prepare it with the
# project's own stages, train + evaluate 5 seeds, and leave JSON + log + nvidia-smi under $OUT.
#
#   bash benchmarks/gpu/stage_carry.sh        # here, once: fills the git-ignored .carry/
#   run(command="bash benchmarks/gpu/run.sh", carry=[".carry"], timeout_s=540)   # the device tool
#   bash benchmarks/gpu/run.sh --dry-run      # anywhere: CPU, synthetic data, 1 seed, 1 epoch (CI runs it)
#
# Env: OUT (default benchmarks/results/gpu), RUNS (default 5), PYTHON (default python3: on the
# device image the one that holds torch), CARRY (default .carry).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-benchmarks/results/gpu}
RUNS=${RUNS:-5}
PY=${PYTHON:-python3}
CARRY=${CARRY:-.carry}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if [ "${1:-}" = "--dry-run" ]; then
    PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" \
        $PY benchmarks/cnn_gpu_recipe.py --dry-run --work "${WORK:-/tmp/cnn-gpu-dry}" --out-dir "$OUT" 2>&1 \
        | tee "$OUT/log.txt"
    exit "${PIPESTATUS[0]}"
fi

{
    date -u
    for f in "$CARRY/mirror/serve.py" "$CARRY/data/cifar10-jpeg.tar.gz" "$CARRY/data/alice-11-0.txt"; do
        [ -f "$f" ] || { echo "missing $f: run benchmarks/gpu/stage_carry.sh here first and carry $CARRY"; exit 2; }
    done
    nvidia-smi || true
    # 1. what the device image lacks (pydantic), from wheels carried in .carry/wheels
    if compgen -G "$CARRY/wheels/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$CARRY"/wheels/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    $PY -c "import torch, pydantic, sys
if not torch.cuda.is_available(): sys.exit('no CUDA GPU visible: this is the GPU run (use --dry-run on a CPU)')
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0), 'pydantic', pydantic.__version__)"
    # 2. the mirror's cifar-10-python.tar.gz, rebuilt (deterministically) from the JPEGs
    t0=$(date +%s)
    $PY "$CARRY/mirror/serve.py" --build-only --dir /tmp/mirror
    echo "mirror built in $(( $(date +%s) - t0 )) s"
    # 3. download + prepare + airbench94 x RUNS seeds
    $PY benchmarks/cnn_gpu_recipe.py --archive /tmp/mirror/cifar-10-python.tar.gz --work /tmp/cnn-gpu-recipe \
        --runs "$RUNS" --out-dir "$OUT"
    date -u
} 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
