#!/bin/bash
# One multi-GPU workstation, no scheduler: one accelerate launcher with a process per GPU.
#
#   launch/local_multi_gpu.sh <stage> [stage args ...]
#   stages: cluster | train | protect (run as python -m segue_dist.<stage>)
#   e.g. launch/local_multi_gpu.sh train --config configs/train/default.yaml data.train=shards/lfw62/train
#
# GPUs: $SEGUE_GPUS, else the devices in CUDA_VISIBLE_DEVICES, else every GPU nvidia-smi lists.
# Accelerate config: $SEGUE_ACCELERATE_CONFIG, else multi_gpu.yaml (single_gpu.yaml for one GPU).
set -euo pipefail
stage="${1:?usage: local_multi_gpu.sh <cluster|train|protect> [stage args ...]}"
shift
case "$stage" in
    cluster | train | protect) ;;
    *)
        echo "local_multi_gpu.sh: stage must be cluster, train or protect (run shards/evaluate as segue <stage>)" >&2
        exit 2
        ;;
esac
cd "$(dirname "${BASH_SOURCE[0]}")/.."

count_gpus() {
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        # nvidia-smi ignores CUDA_VISIBLE_DEVICES; the ranks would not.
        local ids
        IFS=',' read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi > /dev/null; then
        nvidia-smi -L | grep -c '^GPU ' || true
    else
        echo 0
    fi
}
gpus="${SEGUE_GPUS:-$(count_gpus)}"
if [ "$gpus" -lt 1 ]; then
    echo "local_multi_gpu.sh: no GPU found (set SEGUE_GPUS, or run segue $stage for one CPU process)" >&2
    exit 2
fi
if [ "$gpus" -eq 1 ]; then
    default_config=configs/accelerate/single_gpu.yaml
else
    default_config=configs/accelerate/multi_gpu.yaml
fi
cmd=("${SEGUE_ACCELERATE:-accelerate}" launch
    --config_file "${SEGUE_ACCELERATE_CONFIG:-$default_config}"
    --num_processes "$gpus"
    -m "segue_dist.$stage" "$@")
echo "[segue local] ${cmd[*]}" >&2
exec "${cmd[@]}"
