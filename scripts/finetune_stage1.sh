#!/usr/bin/env bash
# Stage 1 of the LLaVA recipe with a DOVE tower: align the projector (everything else frozen), `plain` template.
#
# Settings come from the environment; any extra arguments are passed on to `dove-vlm finetune` (they win over
# the defaults below, e.g. `--max-steps 100 --no-bf16`).
#   LAUNCHER   deepspeed (default) | torchrun | python (one process, no launcher)
#   NPROC      processes (GPUs) on this node (default 8)
#   LLM        hub id or dir of the causal LM (default lmsys/vicuna-7b-v1.5)
#   TOWER      DOVE tokenizer checkpoint (dir or hub id)
#   DATA       LLaVA conversation JSON (default: LLaVA's 558k pretraining captions)
#   IMAGES     image folder the JSON's paths are relative to
#   OUTPUT     output directory
#   DS_CONFIG  DeepSpeed config: zero2 (default), zero3, zero3_offload or a JSON file; empty for none
set -euo pipefail

LAUNCHER=${LAUNCHER:-deepspeed}
NPROC=${NPROC:-8}
PORT=${PORT:-29500}
LLM=${LLM:-lmsys/vicuna-7b-v1.5}
TOWER=${TOWER:?set TOWER to a DOVE tokenizer checkpoint (dir or hub id)}
DATA=${DATA:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGES=${IMAGES:-./playground/data/LLaVA-Pretrain/images}
OUTPUT=${OUTPUT:-./checkpoints/dove-llava-stage1}
DS_CONFIG=${DS_CONFIG-zero2}

case "$LAUNCHER" in
  deepspeed) launch=(deepspeed --num_gpus "$NPROC" --master_port "$PORT" --no_local_rank --module dove_vlm.cli) ;;
  torchrun)  launch=(torchrun --nproc_per_node "$NPROC" --master_port "$PORT" -m dove_vlm.cli) ;;
  python)    launch=(python -m dove_vlm.cli) ;;
  *) echo "LAUNCHER must be deepspeed, torchrun or python (got '$LAUNCHER')" >&2; exit 2 ;;
esac
ds_args=()
if [[ -n "$DS_CONFIG" ]]; then ds_args=(--deepspeed "$DS_CONFIG"); fi

# LLaVA-1.5's stage-1 settings: global batch 256 (32 x 8 GPUs), lr 1e-3, one epoch, cosine, 3% warmup.
"${launch[@]}" finetune \
  --stage 1 \
  --llm "$LLM" \
  --tower "$TOWER" \
  --projector-type mlp2x_gelu \
  --data "$DATA" \
  --image-folder "$IMAGES" \
  --output "$OUTPUT" \
  "${ds_args[@]}" \
  --batch-size 32 \
  --grad-accum 1 \
  --lr 1e-3 \
  --epochs 1 \
  --warmup-ratio 0.03 \
  --lr-scheduler cosine \
  --model-max-length 2048 \
  --gradient-checkpointing \
  --bf16 \
  "$@"
