#!/usr/bin/env bash
# Launch train.py with torchrun; the config and every override are forwarded unchanged.
#   one node, all GPUs (or NPROC_PER_NODE CPU processes):  launch/torchrun.sh configs/llama3_8b.yaml
#   node i of N:  NNODES=N NODE_RANK=i MASTER_ADDR=host0 MASTER_PORT=29500 launch/torchrun.sh CONFIG [overrides...]
#
# Environment (defaults in brackets):
#   NPROC_PER_NODE    workers on this node [the GPUs nvidia-smi lists, else 1]
#   NNODES, NODE_RANK nodes in the job, and this one [1, 0]; c10d numbers the nodes as they join
#   MASTER_ADDR, MASTER_PORT  c10d rendezvous endpoint, the same on every node [127.0.0.1, 29500]
#   RDZV_ID           rendezvous id shared by the nodes of one job [megatron_llm]
#   MAX_RESTARTS      times torchrun restarts the whole group after a worker fails [0]; a restarted
#                     train.py resumes from the latest checkpoint
#   SHUTDOWN_TIMEOUT  seconds the workers get to finish their step and save after SIGTERM/SIGUSR1 [300]
#
# Exit status: torchrun's; 2 with one `error: ...` line when the config or its layout for
# NNODES x NPROC_PER_NODE ranks is refused (checked once here, before any worker starts); or 75 when
# this script got SIGTERM or SIGUSR1 (the workers saved a checkpoint and stopped): run it again to
# continue; launch/slurm.sbatch requeues the job on 75.
# Needs torch 2.12 or newer (torchrun's --signals-to-handle and --shutdown-timeout).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [--section.key VALUE ...]" >&2
  exit 2
fi
config=$1
shift
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
nproc=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}
root=$(cd "$(dirname "$0")/.." && pwd)

# The config and the layout, once, as every rank would check them. An elastic NNODES (MIN:MAX) leaves
# the world size open: the ranks check it themselves.
if [[ "${NNODES:-1}" =~ ^[0-9]+$ ]]; then
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" python3 -m megatron_llm.check_config \
    --world-size $(( ${NNODES:-1} * nproc )) "$config" "$@" || exit $?
fi

# A store shared between torchrun's rendezvous and the workers keeps the keys of the failed attempt,
# so a restarted group connects to dead workers (pytorch/pytorch#135712): give each attempt its own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun forwards these signals to the workers and waits SHUTDOWN_TIMEOUT for them before SIGKILL.
# Not `exec`: this script stays to report a stop as exit 75.
torchrun \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$nproc" \
  --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv-id "${RDZV_ID:-megatron_llm}" --max-restarts "${MAX_RESTARTS:-0}" \
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-300}" \
  "$root/train.py" --config "$config" "$@" &
child=$!

stopped=""
# shellcheck disable=SC2317  # called by the traps below
on_stop() {
  stopped=$1
  # A Slurm job step's processes all get the signal from Slurm; a second copy would cut torchrun's
  # wait for the workers short. Elsewhere (a shell, docker stop, Kubernetes) only this script got it.
  if [ -z "${SLURM_STEP_ID:-}" ]; then kill -s "$1" "$child" 2>/dev/null || true; fi
}
trap 'on_stop TERM' TERM
trap 'on_stop USR1' USR1
trap '' INT  # Ctrl-C reaches torchrun too; wait for it to stop the workers

status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do  # `wait` returned early to run a trap: torchrun is still stopping
  status=0
  wait "$child" || status=$?
done
if [ -n "$stopped" ] && [ "$status" -ne 0 ]; then
  echo "$0: stopped by SIG$stopped after a checkpoint; exit 75: run again (or requeue) to continue" >&2
  exit 75
fi
exit "$status"
