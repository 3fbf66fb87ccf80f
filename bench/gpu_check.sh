#!/usr/bin/env bash
# One prepared GPU check (a few minutes): ResNet-50 at 224 px, bf16 autocast, channels_last,
# eager and torch.compile'd - SimCLR step views/s, bare-backbone views/s and peak GPU memory.
# Run on a machine with one CUDA GPU from the repository root:  bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
for batch in 256 512; do
  python3 bench/train_step.py --device cuda --backbone resnet50 --image-size 224 --batch "$batch" \
    --amp --channels-last --steps 20 --warmup 5
  python3 bench/train_step.py --device cuda --backbone resnet50 --image-size 224 --batch "$batch" \
    --amp --channels-last --compile --steps 20 --warmup 10
done
# Gradient cache: the paper's batch 4096 (8192 views) with ResNet-50 at 224 px on ONE GPU.
python3 bench/train_step.py --device cuda --backbone resnet50 --image-size 224 --batch 4096 \
  --amp --channels-last --chunk auto --skip-bare --steps 3 --warmup 1
