#!/usr/bin/env bash
# GPU checks of the CUDA paths (bf16, fp16 + GradScaler, torch.compile, torchrun + nccl) and the
# throughput benchmark at a GPU-sized batch. Usage: bash benchmarks/speed/gpu_check.sh OUT_DIR
set -uo pipefail
out=${1:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD/src
py=${PYTHON:-python3}
nvidia-smi -L
$py -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
tiny="student.name=vit_custom student.patch_size=4 student.embed_dim=96 student.depth=4 student.num_heads=3
 teacher.model.name=vit_custom teacher.model.patch_size=4 teacher.model.embed_dim=192 teacher.model.depth=6
 teacher.model.num_heads=6 data.name=synthetic data.img_size=32 data.synthetic_size=4096 data.num_workers=4
 train.batch_size=256 train.epochs=2 train.warmup_epochs=0.5 train.blr=1e-3 train.progress=false train.log_every=8"
for prec in bf16 fp16 fp32; do
  echo "== distill $prec"
  $py -m tinymim distill --output "$out/run_$prec" $tiny train.precision=$prec && tail -n 1 "$out/run_$prec/metrics.jsonl"
done
echo "== distill bf16 + compile"
$py -m tinymim distill --output "$out/run_compile" $tiny train.precision=bf16 train.compile=true && tail -n 1 "$out/run_compile/metrics.jsonl"
echo "== torchrun (nccl, 1 process) + resume of a finished run"
$py -m torch.distributed.run --standalone --nproc_per_node=1 -m tinymim distill --output "$out/run_ddp" $tiny train.precision=bf16 \
  && tail -n 1 "$out/run_ddp/metrics.jsonl" && $py -m tinymim distill --output "$out/run_ddp" $tiny train.precision=bf16
all_targets="loss.feature.weight=1 loss.feature.site=qkv loss.class_token.weight=1 loss.class_token.criterion=kl
 mask_ratio=0.75 loss.mae.weight=1 loss.mae.decoder.embed_dim=64 loss.mae.decoder.depth=1 loss.mae.decoder.num_heads=4"
for extra in "train.precision=bf16" "train.precision=fp16" "train.precision=bf16 train.compile=true"; do
  echo "== every target + masked input + MAE loss: $extra"
  $py -m tinymim distill --output "$out/run_targets_${extra// /_}" $tiny $all_targets train.max_steps=24 $extra
done
echo "== a pipeline under torchrun (nccl, 1 process), run twice: the second reuses every stage"
cat > "$out/pipe.yaml" <<'YAML'
overrides: [train.max_steps=6, train.epochs=1, train.batch_size=64, train.progress=false, data.name=synthetic,
            data.img_size=32, data.synthetic_size=256, train.precision=bf16]
task_overrides:
  mae: [model.name=vit_custom, model.patch_size=4, model.embed_dim=64, model.depth=2, model.num_heads=2,
        decoder.embed_dim=32, decoder.depth=1, decoder.num_heads=2]
  distill: [student.name=vit_custom, student.patch_size=4, student.embed_dim=32, student.depth=2,
            student.num_heads=2, teacher.target_block=2]
  finetune: [data.auto_augment=null]
stages:
  - {name: teacher, task: mae}
  - {name: student, task: distill, teacher: teacher}
  - {name: ft, task: finetune, init: student}
YAML
for i in 1 2; do
  $py -m torch.distributed.run --standalone --nproc_per_node=1 -m tinymim pipeline --config "$out/pipe.yaml" --output "$out/pipe"
done
echo "== throughput, ViT-B -> ViT-S 224px"
$py benchmarks/speed/distill_throughput.py --batch 128 --precisions bf16 fp32 --steps 10
$py benchmarks/speed/distill_throughput.py --batch 128 --precisions bf16 --steps 10 --compile
