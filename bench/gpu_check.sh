#!/usr/bin/env bash
# One prepared GPU check, at most 6 minutes on one H200 (each part has its own time limit), printing
# as ratios (issue 22):
#   1. pretrain end to end / SimCLR step, RN50 224 px, batch 256, bf16, channels_last, 4 loader workers,
#      --augment device and --augment cpu (target >= 0.95x with <= 4 workers; 0.66x with 14 before),
#      and what --compile buys on the step;
#   2. host CPU ms per view of both view pipelines through the run loader;
#   3. embed, predict and segment inference / the bare forward pass on the same batches, >= 10k patches
#      (target >= 0.8x each);
#   4. the gradient cache at batch 4096 on one GPU (last; skipped when time is short).
# Run from the repository root on a machine with one CUDA GPU:   bash bench/gpu_check.sh
# CPU rehearsal of every Python part at toy sizes (minutes on 2 cores):  SMOKE=1 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
START=$SECONDS
part() { echo; echo "=== $1 (at $((SECONDS - START)) s)"; }

if [[ "${SMOKE:-0}" == 1 ]]; then
  DEV=cpu; MODEL=resnet18; SIZE=64; BATCH=16; STRIDE=128; STEPS=2; WARM=1; DT_STRIDE=128; DT_BATCH=32; AMP=""
  TILE_PATCH=128; PIPE_BATCHES=2; COMPILE=""
  limit() { echo $(( $1 * 10 )); }  # a shared 2-core CPU: the limits are for the GPU
else
  DEV=cuda; MODEL=resnet50; SIZE=224; BATCH=256; STRIDE=48; STEPS=20; WARM=5; DT_STRIDE=16; DT_BATCH=256; AMP="--amp"
  TILE_PATCH=256; PIPE_BATCHES=8; COMPILE="--compile-gain"
  limit() { echo "$1"; }
  nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader || true
fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', 'cores', __import__('os').cpu_count())"

part "store: CMU-1-Small-Region at ${TILE_PATCH} px, stride $STRIDE (the first GPU run's 1,249 patches at 256/48)"
STORE="$WORK/cmu-$STRIDE.h5"
$PY -m simclr_path tile ../shared/data/slides/CMU-1-Small-Region.svs -o "$STORE" --patch-size "$TILE_PATCH" \
  --stride "$STRIDE" --min-tissue 0.1 --workers 4 >/dev/null

part "1. SimCLR step vs bare backbone; pretrain end to end (--augment device, 4 workers) / step; --compile gain"
timeout $(limit 130) $PY bench/train_step.py --device "$DEV" --backbone "$MODEL" --image-size "$SIZE" --batch "$BATCH" $AMP \
  --channels-last --steps "$STEPS" --warmup "$WARM" --store "$STORE" --workers 4 --augment device --repeats 1 \
  $COMPILE || echo "part 1 (device) failed or timed out"
part "1b. pretrain end to end with --augment cpu (albumentations in 4 workers) / step"
timeout $(limit 50) $PY bench/train_step.py --device "$DEV" --backbone "$MODEL" --image-size "$SIZE" --batch "$BATCH" $AMP \
  --channels-last --steps "$STEPS" --warmup "$WARM" --store "$STORE" --workers 4 --augment cpu --repeats 1 \
  --skip-bare || echo "part 1b (cpu) failed or timed out"

part "2. host CPU per view: both pipelines through the run loader, 4 workers"
timeout $(limit 30) $PY bench/views.py --only-pipelines --device "$DEV" --store "$STORE" --size "$SIZE" --batch "$BATCH" \
  --workers 4 --batches "$PIPE_BATCHES" || echo "part 2 failed or timed out"

part "3. embed / predict / segment inference vs bare forward (>= 10k patches on the GPU)"
timeout $(limit 110) $PY bench/downstream_throughput.py --device "$DEV" --model "$MODEL" --patch-size "$SIZE" \
  --stride "$DT_STRIDE" --batch "$DT_BATCH" --workers 4 --work "$WORK/downstream" || echo "part 3 failed or timed out"

if [[ "${SMOKE:-0}" != 1 ]] && (( SECONDS - START < 300 )); then
  part "4. gradient cache: batch 4096 (8192 views), RN50 224, one GPU"
  timeout $((355 - (SECONDS - START))) $PY bench/train_step.py --device cuda --backbone resnet50 --image-size 224 \
    --batch 4096 --amp --channels-last --chunk auto --skip-bare --no-end-to-end --steps 2 --warmup 1 \
    || echo "part 4 failed or timed out"
fi
echo; echo "gpu_check done in $((SECONDS - START)) s"
