#!/usr/bin/env bash
# Launch train.py with torchrun; the config and every override are forwarded unchanged.
#   one node, all GPUs (or NPROC_PER_NODE CPU processes):  launch/torchrun.sh configs/llama3_8b.yaml
#   node i of N:  NNODES=N NODE_RANK=i MASTER_ADDR=host0 MASTER_PORT=29500 launch/torchrun.sh CONFIG [overrides...]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [--section.key VALUE ...]" >&2
  exit 2
fi
config=$1
shift
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}
exec torchrun \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  "$(dirname "$0")/../train.py" --config "$config" "$@"
