#!/usr/bin/env bash
# One prepared pass over the CUDA paths on a lent GPU machine, with measurements; every step has a time box.
# Usage (repo root, on the GPU host, with shards/glint24_64 and shards/lfw62_64 built beforehand and carried):
#   bash bench/gpu_check.sh          -> JSON + logs under $OUT (default bench/results/gpu)
# The host has torch/torchvision/accelerate but no network: webdataset travels as wheels in .whl/.
set -uo pipefail
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
PY=python3
W=/tmp/segue_gpu
rm -rf "$W"; mkdir -p "$W"
step() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }
nvidia-smi -L | tee "$LOG"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'tv', torchvision.__version__, torch.cuda.get_device_name(0))" | tee -a "$LOG"

step "effectiveness glint24 64 px: train G (20 epochs, bf16), protect, victims resnet18 + robustness attacks"
timeout 200 $PY bench/effectiveness.py --name glint24_64 --shards shards/glint24_64 --size 64 --out "$W/glint24" \
  --gen-epochs 20 --victim-epochs 30 --attacks full --methods lsp,random --workers 6 > "$W/glint24.log" 2>&1
tail -30 "$W/glint24.log" | tee -a "$LOG"
cp "$W/glint24/eval/results.json" "$OUT/effect_glint24_64.json" 2>/dev/null
cp "$W/glint24/generator/train_summary.json" "$OUT/train_glint24_64.json" 2>/dev/null

step "effectiveness lfw62 64 px: victim sweep (6 architectures)"
timeout 150 $PY bench/effectiveness.py --name lfw62_64 --shards shards/lfw62_64 --size 64 --out "$W/lfw62" \
  --gen-epochs 20 --victim-epochs 30 --victims resnet18,resnet50,mobilenet_v2,inception_v3,efficientnet_b1,swin_t \
  --methods lsp,random --workers 6 > "$W/lfw62.log" 2>&1
tail -30 "$W/lfw62.log" | tee -a "$LOG"
cp "$W/lfw62/eval/results.json" "$OUT/effect_lfw62_64.json" 2>/dev/null

step "protect throughput per GPU, 224 px"
timeout 110 $PY bench/protect_throughput.py --gpu --gpu-images 12000 --gpu-budget-s 80 --work "$W/protect" \
  --out "$OUT/protect_throughput_gpu.json" 2>&1 | tail -14 | tee -a "$LOG"

step "train throughput, 224 px, bf16 autocast + channels_last (loader vs in-memory)"
timeout 60 $PY bench/train_throughput.py --shards "$W/protect/in224" --size 224 --batch-size 64 --steps 15 --workers 8 \
  --device cuda --out "$OUT/train_throughput_gpu.json" 2>&1 | tail -8 | tee -a "$LOG"

step "k-means on GPU (N=1M, D=512, K=10k, 20 iterations; torch path, no FAISS here)"
timeout 90 $PY bench/kmeans.py --gpu --out "$OUT/kmeans_gpu.json" 2>&1 | tail -10 | tee -a "$LOG"
step "done"
