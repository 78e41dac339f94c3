#!/usr/bin/env bash
# End-to-end check of the CUDA path on one GPU (no network): make shards, dump with a ResNet-34 teacher on CUDA
# (bf16 autocast, the default there), verify on CUDA, train a ResNet-18 student from the cache on CUDA with bf16
# and channels_last, verify and train with the device renderer, and read the cache with tensorstore. About a minute. Prints what each step reports.
#   bash benchmarks/gpu_e2e.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import zarr, numcodecs, webdataset, braceexpand" 2>/dev/null; then
  # The device image lacks these; carry them as wheels in .whl/ (see .library/device/README.md).
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
W=${1:-/tmp/dkd-gpu-e2e}
rm -rf "$W"; mkdir -p "$W"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, zarr; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'zarr', zarr.__version__)"
python3 -m dkd_cache make-shards "$W/data" --classes 100 --train-per-class 20 --val-per-class 4 --shard-size 250
python3 - "$W" <<'PY'
import sys, torch
from dkd_cache.checkpoint import save_checkpoint
from dkd_cache.teacher import build_model
torch.manual_seed(0)
m = build_model("resnet34", 100)
with torch.no_grad():
    m.fc.weight.mul_(10.0)  # less flat logits than a fresh init
save_checkpoint(f"{sys.argv[1]}/teacher.pt", model=m.state_dict(), arch="resnet34")
PY
time python3 -m dkd_cache dump-teacher --shards "$W/data/train.txt" --weights "$W/teacher.pt" --out "$W/c.zarr" \
  --views 2 --image-size 224 --device cuda --batch-size 256 --workers 8 --no-progress
python3 -m dkd_cache inspect "$W/c.zarr"
python3 -m dkd_cache verify --cache "$W/c.zarr" --shards "$W/data/train.txt" --weights "$W/teacher.pt" \
  --samples 128 --device cuda --json "$W/verify.json" || echo "verify exit $?"
time python3 -m dkd_cache train-student --shards "$W/data/train.txt" --cache "$W/c.zarr" --out "$W/run" \
  --val-shards "$W/data/val.txt" --epochs 2 --batch-size 128 --lr 0.1 --device cuda --amp bf16 --workers 8 --no-progress
# The device renderer (crop, resize and flip batched on the GPU): its drift from the cache's cpu rendering, and a
# short training run with it.
python3 -m dkd_cache verify --cache "$W/c.zarr" --shards "$W/data/train.txt" --weights "$W/teacher.pt" \
  --samples 128 --device cuda --renderer device --json "$W/verify-device.json" || echo "verify --renderer device exit $?"
time python3 -m dkd_cache train-student --shards "$W/data/train.txt" --cache "$W/c.zarr" --out "$W/run-device" \
  --epochs 1 --batch-size 128 --lr 0.1 --device cuda --amp bf16 --workers 8 --no-progress \
  --renderer device --allow-other-renderer
python3 - "$W" <<'PY'
import sys, numpy as np, zarr, tensorstore as ts
root = f"{sys.argv[1]}/c.zarr"; g = zarr.open_group(root, mode="r")
for sub in ("samples", "views", "logits"):
    for name, _ in g[sub].members():
        a = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{root}/{sub}/{name}"}}).result().read().result()
        b = g[f"{sub}/{name}"][...]
        print("tensorstore", f"{sub}/{name}", "equal" if np.array_equal(a, b, equal_nan=b.dtype.kind == "f") else "DIFFERS")
PY
