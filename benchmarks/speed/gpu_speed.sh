#!/usr/bin/env bash
# The GPU speed check, one call of at most 8 minutes (each part under its own `timeout`):
#   1. the step arms beside the release-equivalent step, peak memory per arm (gpu_throughput.py);
#   2. the loader: views/s of Pillow with and without data.jpeg_draft, of the device decode path with
#      and without prefetch, per loader core, and the draft study (jpeg_loader_throughput.py);
#   3. a 200-step `tinymim distill` from those JPEGs, compiled, data.decode=device with data.prefetch=1:
#      images/s and the time the step waited for the loader (loader_wait_s) against the wall time;
#   4. one JSON (OUT/gpu_speed.json) and one markdown page (OUT/gpu_speed.md): gpu_speed_report.py.
# Usage: bash benchmarks/speed/gpu_speed.sh OUT_DIR      (from the project root)
#        SMOKE=1 bash benchmarks/speed/gpu_speed.sh OUT_DIR   tiny models and data on a CPU: the script runs
# Budgets (seconds, env): STEP_TIMEOUT 240 (STEP_BUDGET 190: arms past it are skipped), LOADER_TIMEOUT 100,
# TRAIN_TIMEOUT 120; TRAIN_BATCH 256, TRAIN_STEPS 200, IMAGES 12288; STEP_JSON=FILE reuses a step result.
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
export PYTHONUNBUFFERED=1 PYTHONPATH=$root/src:${PYTHONPATH:-} PYTHONWARNINGS=ignore::DeprecationWarning
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
smoke=${SMOKE:-0}
cores=$(env -u OMP_NUM_THREADS nproc)  # nproc would answer OMP_NUM_THREADS
workers=$(( cores > 2 ? cores - 2 : 1 ))
started=$SECONDS

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi -L 2>/dev/null || echo "no GPU (nvidia-smi not found)"
  echo "$cores CPU cores"
  $py -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
} > "$out/env.txt"
cat "$out/env.txt"

echo "== 1. step arms ($(( SECONDS - started ))s)"
if [ -n "${STEP_JSON:-}" ]; then
  cp "$STEP_JSON" "$out/step.json"
elif [ "$smoke" = 1 ]; then
  timeout ${STEP_TIMEOUT:-600} $py benchmarks/speed/gpu_throughput.py --smoke --json "$out/step.json" \
    --arms ${SMOKE_ARMS:-release tinymim tinymim+inference-teacher tinymim+ckpt} 2>&1 | tee "$out/gpu_throughput.log"
else
  timeout ${STEP_TIMEOUT:-240} $py benchmarks/speed/gpu_throughput.py --json "$out/step.json" \
    --budget-s ${STEP_BUDGET:-190} --batch 2048 --ckpt-batches 4096 8192 2>&1 | tee "$out/gpu_throughput.log"
fi

echo "== 2. loader ($(( SECONDS - started ))s)"
if [ "$smoke" = 1 ]; then
  loader_args=(--images 48 --workers 1 --batch 8 --epochs 1 --img-size 32 --study-images 4)
else
  loader_args=(--images ${IMAGES:-12288} --workers $cores --batch 256 --epochs 1 --study-images 32)
fi
timeout ${LOADER_TIMEOUT:-100} $py benchmarks/speed/jpeg_loader_throughput.py "${loader_args[@]}" --draft-study \
  --step-json "$out/step.json" --json "$out/loader.json" --dir "$work" --keep 2>&1 | tee "$out/loader.log"

echo "== 3. training from the JPEGs ($(( SECONDS - started ))s)"
if [ -d "$work/jpegs" ]; then
  if [ "$smoke" = 1 ]; then
    model=(student.name=vit_custom student.patch_size=4 student.embed_dim=48 student.depth=2 student.num_heads=3
           teacher.model.name=vit_custom teacher.model.patch_size=4 teacher.model.embed_dim=64 teacher.model.depth=3
           teacher.model.num_heads=4 data.img_size=32 train.precision=fp32 train.compile=false data.num_workers=1
           train.batch_size=8 train.max_steps=${TRAIN_STEPS:-12} train.log_every=4)
  else
    model=(teacher.relation_heads=12 train.precision=bf16 train.compile=true data.num_workers=$workers
           train.batch_size=${TRAIN_BATCH:-256} train.max_steps=${TRAIN_STEPS:-200} train.log_every=10)
  fi
  timeout ${TRAIN_TIMEOUT:-120} $py -m tinymim distill --output "$work/run" data.name=folder data.root="$work/jpegs" \
    data.decode=device data.prefetch=1 train.progress=false train.checkpoint_every=100000 train.warmup_epochs=0 \
    "${model[@]}" 2>&1 | tail -n 5 | tee "$out/train.log"
  mkdir -p "$out/train"
  cp "$work/run/metrics.jsonl" "$work/run/config.yaml" "$out/train/" 2>/dev/null
else
  echo "no JPEGs: the loader part did not get to generate them" | tee "$out/train.log"
fi

echo "== 4. report ($(( SECONDS - started ))s)"
(cd benchmarks/speed && $py gpu_speed_report.py "$out") > /dev/null
echo "wrote $out/gpu_speed.json and $out/gpu_speed.md in $(( SECONDS - started ))s"
cat "$out/gpu_speed.md"
