#!/usr/bin/env bash
# Multi-GPU DOVE / Q-DOVE tokenizer training (DDP), one process per GPU.
#
#   scripts/train_tokenizer.sh 8 --recipe dove-pythia70m-amused256 --data /data/images \
#       --output runs/dove70m --perceptual-weights /weights/vgg16-397923af.pth
#
# NPROC (first argument) processes on this node; every other argument goes to `dove-vlm train-tokenizer`.
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT as torchrun expects.
# LAUNCHER=accelerate uses `accelerate launch` instead of torchrun (then its config file applies too).
# Re-running the same command with --resume continues from the newest checkpoint in --output.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 NPROC [dove-vlm train-tokenizer arguments...]" >&2
    exit 2
fi
NPROC="$1"
shift

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if [[ "${LAUNCHER:-torchrun}" == "accelerate" ]]; then
    exec accelerate launch --multi_gpu --num_processes "$((NPROC * NNODES))" --num_machines "$NNODES" \
        --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
        -m dove_vlm.cli train-tokenizer "$@"
fi
exec torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m dove_vlm.cli train-tokenizer "$@"
