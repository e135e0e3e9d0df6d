#!/usr/bin/env bash
# Stage 2 of the LLaVA recipe with a DOVE tower: LoRA on the LLM's linear layers plus the projector at its own
# learning rate, the LLM's chat template (or vicuna_v1), starting from stage 1's output.
#
# Settings come from the environment; extra arguments go to `dove-vlm finetune` and win over the defaults.
#   LAUNCHER   deepspeed (default) | torchrun | python (one process, no launcher)
#   NPROC      processes (GPUs) on this node (default 8)
#   MODEL      stage 1's output directory
#   DATA       LLaVA conversation JSON (default: LLaVA's 665k instruction mix)
#   IMAGES     image folder the JSON's paths are relative to
#   OUTPUT     output directory
#   DS_CONFIG  DeepSpeed config: zero3 (default; zero3_offload for small GPUs), zero2 or a JSON file
set -euo pipefail

LAUNCHER=${LAUNCHER:-deepspeed}
NPROC=${NPROC:-8}
PORT=${PORT:-29500}
MODEL=${MODEL:-./checkpoints/dove-llava-stage1}
DATA=${DATA:-./playground/data/llava_v1_5_mix665k.json}
IMAGES=${IMAGES:-./playground/data}
OUTPUT=${OUTPUT:-./checkpoints/dove-llava-stage2-lora}
DS_CONFIG=${DS_CONFIG-zero3}

case "$LAUNCHER" in
  deepspeed) launch=(deepspeed --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank --module dove_vlm.cli) ;;
  torchrun)  launch=(torchrun --nproc_per_node "$NPROC" --master_port "$PORT" -m dove_vlm.cli) ;;
  python)    launch=(python -m dove_vlm.cli) ;;
  *) echo "LAUNCHER must be deepspeed, torchrun or python (got '$LAUNCHER')" >&2; exit 2 ;;
esac
ds_args=()
if [[ -n "$DS_CONFIG" ]]; then ds_args=(--deepspeed "$DS_CONFIG"); fi

# LLaVA-1.5's LoRA settings: r 128, alpha 256, lr 2e-4 (projector 2e-5), global batch 128 (16 x 8), one epoch.
"${launch[@]}" finetune \
  --stage 2 \
  --lora \
  --model "$MODEL" \
  --data "$DATA" \
  --image-folder "$IMAGES" \
  --output "$OUTPUT" \
  "${ds_args[@]}" \
  --lora-r 128 \
  --lora-alpha 256 \
  --lr 2e-4 \
  --projector-lr 2e-5 \
  --batch-size 16 \
  --grad-accum 1 \
  --epochs 1 \
  --warmup-ratio 0.03 \
  --lr-scheduler cosine \
  --model-max-length 2048 \
  --gradient-checkpointing \
  --bf16 \
  "$@"
