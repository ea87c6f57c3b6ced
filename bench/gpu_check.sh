#!/usr/bin/env bash
# One prepared pass on a lent GPU machine: the effectiveness tables at 64 px (glint24, LFW-62) through the same
# `segue train / protect / evaluate / report` commands a user runs; every step has a time box and writes its rows
# as it goes, so a step cut short still reports what it finished.
# Usage (repo root, on the GPU host, with shards/glint24_64 and shards/lfw62_64 built beforehand and carried):
#   bash bench/gpu_check.sh          -> JSON + reports + log under $OUT (default bench/results/gpu)
# Build the shards first (CPU):
#   segue shards build --src ../shared/data/glint24 --out shards/glint24_64 --test-per-identity 10 --size 64 \
#     --samples-per-shard 128
#   segue shards build --src ../shared/data/lfw423 --out shards/lfw62_64 --min-per-identity 20 \
#     --max-per-identity 50 --test-per-identity 5 --size 64 --samples-per-shard 128
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

effect() {  # effect <seconds> <step name> <bench/effectiveness.py args...>; log in $W/<step name>.log
  local limit=$1 name=$2; shift 2
  timeout "$limit" $PY bench/effectiveness.py --size 64 --workers 6 "$@" > "$W/$name.log" 2>&1
  echo "exit $? after step $name" | tee -a "$LOG"
  grep -E "^\|" "$W/$name.log" | tail -20 | tee -a "$LOG"
}
save() {  # save <run dir> <name>
  [ -f "$1/eval/results.json" ] && cp "$1/eval/results.json" "$OUT/effect_$2.json"
  [ -f "$1/report/report.md" ] && cp "$1/report/report.md" "$OUT/report_$2.md"
  [ -f "$1/generator/train_summary.json" ] && cp "$1/generator/train_summary.json" "$OUT/train_$2.json"
  ls "$1/eval" 2>/dev/null | tee -a "$LOG"
}

protection() {  # protection <seconds> <size> <variant args...>: bench/protection.py rows at 64 / 112 px on the GPU
  local limit=$1 size=$2; shift 2
  timeout "$limit" $PY bench/protection.py run --shards "shards/glint24_$size" --out "$OUT/protection_$size" \
    --work "$W/protection_$size" --rows none,jpeg10,grayscale,iss,half_res "$@" >> "$W/protection_$size.log" 2>&1
  echo "exit $? after protection $size $*" | tee -a "$LOG"
}
# First, what no CPU run can stand in for: the default recipe's attacker rows at 64 and 112 px (glint24; build
# shards/glint24_112 like glint24_64 with --size 112), beside clean and LSP.
for size in 64 112; do
  step "protection rows, glint24 $size px"
  protection 60 "$size" --name clean --method clean
  protection 60 "$size" --name lsp --method lsp
  protection 150 "$size" --name segue_template_joint --method segue --default segue_template_joint
done

step "glint24 64 px: train G (30 epochs), protect, clean vs Segue vs LSP vs random (ResNet18)"
effect 160 g24_main --name glint24_64 --shards shards/glint24_64 --out "$W/glint24" --gen-epochs 30 \
  --victim-epochs 20 --methods lsp,random
step "glint24 64 px: robustness rows for clean and Segue"
effect 170 g24_robust --name glint24_64 --shards shards/glint24_64 --out "$W/glint24" --gen-epochs 30 \
  --victim-epochs 20 --methods "" --attacks robust
save "$W/glint24" glint24_64

step "LFW-62 64 px: victim sweep (6 architectures)"
effect 130 lfw62 --name lfw62_64 --shards shards/lfw62_64 --out "$W/lfw62" --gen-epochs 30 --victim-epochs 20 \
  --victims resnet18,resnet50,mobilenet_v2,inception_v3,efficientnet_b1,swin_t --methods ""
save "$W/lfw62" lfw62_64

step "glint24 64 px, the wider generator (width 32, 4 residual blocks) for comparison"
effect 100 g24_wide --name glint24_64_wide --shards shards/glint24_64 --out "$W/glint24_wide" --gen-epochs 30 \
  --victim-epochs 20 --methods "" --train-set generator.width=32 --train-set generator.num_res_blocks=4
save "$W/glint24_wide" glint24_64_wide_generator
step "folder-mode protect throughput at 224 / 1024 px (G on the GPU, codecs on the host's cores)"
timeout 120 $PY bench/protect_folder_throughput.py --quick --device cuda --out "$OUT/protect_folder_throughput_gpu.json" \
  > "$W/folder_throughput.log" 2>&1
echo "exit $? after folder throughput" | tee -a "$LOG"
step "shard-mode protect at 224 / 112 px: JPEG + PNG, CPU codecs and --gpu-codec, G alone, CPU and nvJPEG floors"
# One JSON (written after every step, so a step cut short keeps what came before), with each job's phase timings.
timeout 300 $PY bench/protect_throughput.py --gpu --gpu-images 20000 --gpu-budget-s 240 \
  --out "$OUT/protect_throughput_gpu.json" > "$W/shard_throughput.log" 2>&1
echo "exit $? after shard throughput" | tee -a "$LOG"
grep -E "^[│|]" "$W/shard_throughput.log" | tail -30 | tee -a "$LOG"
cp "$W"/*.log "$OUT/" 2>/dev/null
step "done"
