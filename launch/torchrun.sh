#!/usr/bin/env bash
# One node's share of a (multi-node) wmtp run: torchrun with a c10d rendezvous, then `wmtp train`.
# Every cluster launcher in this directory calls this script, so the training command is written once.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=8 bash launch/torchrun.sh          (on node 0)
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC_PER_NODE=8 bash launch/torchrun.sh          (on node 1)
# Settings (environment): WMTP_CONFIG, WMTP_RECIPE, WMTP_RUN_NAME (default: the recipe's name), NNODES (1),
# NODE_RANK (0), NPROC_PER_NODE (the visible GPUs, else 1), MASTER_ADDR (localhost), MASTER_PORT (29500),
# RDZV_ID (the run name). Extra arguments go to `wmtp train` (e.g. --dry-run, --resume auto).
set -euo pipefail
config=${WMTP_CONFIG:-configs/production/meta-7b-mtp-4xa100.yaml}
recipe=${WMTP_RECIPE:-configs/production/baseline-mtp-7b.yaml}
run_name=${WMTP_RUN_NAME:-$(basename "$recipe" .yaml)}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
exec python3 -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" \
    --rdzv-id "${RDZV_ID:-$run_name}" \
    -m wmtp train --config "$config" --recipe "$recipe" --run-name "$run_name" "$@"
