#!/usr/bin/env bash
# One prepared throughput check for a single-GPU machine (one H100 or H200, 16 CPU cores, no network).
#
# Runs benchmarks/throughput.py at ImageNet resolution on the GPU: 224 px, batch 128, bf16 autocast, channels_last,
# ImageNet's JPEG geometry (~400x350 px, q90, ~100 KB), 9,600 synthetic samples in 24 shards of 400 (2 per DataLoader
# worker; SAMPLES=N for another count), 2 epochs per training mode, each mode with the cpu and the device renderer;
# the input-path section on 2,400 samples; peak RSS at 800 and 8,000 samples. A hard limit of LIMIT_S (default
# 420 s) stops it.
# Prints the same table as on the CPU; writes the JSON and the log to $OUT (or /tmp when OUT is unset).
#
#   bash benchmarks/gpu_check.sh                    # from the repository root, or from anywhere
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Dependencies: torch with CUDA, torchvision, typer, rich, safetensors and Pillow must be installed there; zarr,
# numcodecs, webdataset and braceexpand (absent from the device image) are installed from wheels in .whl/ (carry
# it, as benchmarks/gpu_e2e.sh does) into /tmp/site when missing. The preflight names anything still missing.
# dkd_cache itself: if `python3 -c "import dkd_cache"` fails, it tries `pip install -e .` offline (no index, no
# dependency resolution, no build isolation: nothing is downloaded), and if that fails too, puts the repository on
# PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
LIMIT_S="${LIMIT_S:-420}"

echo "== $(date -u +%FT%TZ) host $(hostname), $(nproc) CPUs, python $($PY -c 'import sys; print(sys.version.split()[0])')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "(nvidia-smi unavailable)"

export PYTHONUNBUFFERED=1
missing_modules() {
    $PY - <<'EOF'
import importlib.util
mods = ["torch", "torchvision", "zarr", "numcodecs", "webdataset", "braceexpand", "typer", "rich", "safetensors", "PIL"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
EOF
}
missing=$(missing_modules)
if [ -n "$missing" ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "missing: $missing; installing the carried wheels from .whl/ into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    missing=$(missing_modules)
fi
if [ -n "$missing" ]; then
    echo "missing Python packages: $missing (this check installs nothing from the network); aborting" >&2
    exit 3
fi
if ! $PY -c "import dkd_cache" 2>/dev/null; then
    echo "dkd_cache not importable: trying an offline editable install"
    $PY -m pip install --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || true
    if ! $PY -c "import dkd_cache" 2>/dev/null; then
        echo "pip install -e . failed offline: using PYTHONPATH=$PWD"
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
$PY -c "import dkd_cache, torch; assert torch.cuda.is_available(), 'no CUDA device'; print('dkd_cache', dkd_cache.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" || exit 3

timeout -k 10 "$LIMIT_S" $PY benchmarks/throughput.py \
    --device cuda --amp bf16 --channels-last \
    --image-size 224 --batch-size 128 --samples "${SAMPLES:-9600}" --shard-size 400 --epochs 2 \
    --workers 12 --gen-jobs 16 --renderers cpu,device --input-samples 2400 \
    --rss-samples 800 --rss-factor 10 --rss-image-size 224 \
    --json "$OUT_DIR/throughput-gpu.json" 2>&1 | tee "$OUT_DIR/throughput-gpu.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "throughput.py ran past ${LIMIT_S} s and was stopped" >&2
exit "$rc"
