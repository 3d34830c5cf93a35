#!/usr/bin/env bash
# The GPU checks, as one script for a machine with one NVIDIA GPU and PyTorch (run by hand):
#   1. the loss benchmark at GPU size (bf16, 30 layers, 2,048 tokens);
#   2. a CUDA training smoke test: the demo in bf16 autocast on the GPU, 100 steps;
#   3. the memory plan against torch.cuda.max_memory_allocated (benchmarks/scale.py, one process).
# Outputs go to ${OUT:-gpu-out}. Needs pydantic importable (carry wheels where the machine has none).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONPATH="${PYTHONPATH:-}:src"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 180 python3 benchmarks/loss_memory.py --device cuda --dtype bfloat16 --layers 30 --seq 2048 \
    --vocab 32000 49152 --chunk-size 256 1024 2>&1 | tee "$OUT/loss_memory.txt"
sed -e 's/precision: fp32/precision: bf16/' -e 's/  experiment: wmtp-demo/  enabled: false/' \
    configs/env/demo.yaml > /tmp/gpu-config.yaml
sed -e 's/max_steps: 200/max_steps: 100/' configs/recipes/baseline-mtp/demo.yaml > /tmp/gpu-recipe.yaml
WMTP_DEVICE=cuda WMTP_OUTPUT_DIR=/tmp/gpu-runs timeout 120 python3 -m wmtp train --config /tmp/gpu-config.yaml \
    --recipe /tmp/gpu-recipe.yaml --run-name cuda-bf16 2>&1 | grep -v "it/s" | tail -25 | tee "$OUT/train_cuda.txt"
timeout 300 python3 benchmarks/scale.py --device cuda --worlds 1 --out "$OUT/scale_cuda.json" 2>&1 \
    | tee "$OUT/scale_cuda.txt"
