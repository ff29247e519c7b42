#!/usr/bin/env bash
# Issue-sized GPU check of speed: the distillation step against the release-equivalent baseline
# (gpu_throughput.py), the two JPEG decode paths on this machine's CPU cores and GPU
# (jpeg_loader_throughput.py), then short `tinymim distill` runs reading those JPEGs with each path
# (images/s of real training, loader included). Usage: bash benchmarks/speed/gpu_speed.sh OUT_DIR
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONWARNINGS=ignore::DeprecationWarning
py=${PYTHON:-python3}
work=$(mktemp -d)
nvidia-smi -L; nproc
$py -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
# STEP_JSON=FILE: reuse an earlier gpu_throughput.py result instead of measuring the step again
step_json=${STEP_JSON:-$out/gpu_throughput.json}
if [ -z "${STEP_JSON:-}" ]; then
  echo "== step throughput"
  timeout ${STEP_TIMEOUT:-420} $py benchmarks/speed/gpu_throughput.py --json "$step_json" --budget-s ${STEP_BUDGET:-300} \
    --batches 128 256 512 1024 2048 --ckpt-batches 2048 4096
fi
echo "== where the device decode path spends its time"
timeout 60 $py benchmarks/speed/device_decode_profile.py --batch 256 | tee "$out/decode_profile.md"
echo "== loader"
timeout 150 $py benchmarks/speed/jpeg_loader_throughput.py --images 6144 --workers $(nproc) --batch 256 \
  --step-json "$step_json" --json "$out/jpeg_loader.json" --dir "$work" --keep
echo "== training from the JPEGs, ViT-B -> ViT-S, bf16, batch ${TRAIN_BATCH:-256}, compile ${TRAIN_COMPILE:-false}, both decode paths"
for decode in device cpu; do
  timeout 300 $py -m tinymim distill --output "$work/run_$decode" data.name=folder data.root="$work/jpegs" \
    data.decode=$decode data.num_workers=$(( $(nproc) - 2 )) teacher.relation_heads=12 \
    train.batch_size=${TRAIN_BATCH:-256} train.compile=${TRAIN_COMPILE:-false} train.max_steps=40 train.log_every=10 \
    train.precision=bf16 train.progress=false train.checkpoint_every=1000 \
    && cp "$work/run_$decode/metrics.jsonl" "$out/train_$decode.jsonl" && tail -n 2 "$out/train_$decode.jsonl"
done
rm -rf "$work"
