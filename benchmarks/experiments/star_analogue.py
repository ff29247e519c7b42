"""TinyMIM*-T at CIFAR-10 scale: a relation-distilled student fine-tuned with a distillation token, the
release's extra head path and DeiT-style hard distillation from a fine-tuned teacher classifier,
against the same student fine-tuned plainly, 3 seeds each, scored on the test split.

- student: the demo's TinyMIM student (64 wide, 6 blocks, 2 heads; relation-distilled from the shipped
  MAE teacher builtin:cifar10_mae_vit128x6 for 2 epochs over the 50,000 training images), or --student;
- teacher classifier: that MAE teacher fine-tuned with cifar10/finetune_short on the same labelled
  images (128 wide, 6 blocks);
- both arms: cifar10/finetune_short at the demo's budget (--images labelled images, 3 epochs, blr 6e-3);
  the T* arm adds model.dist_token=true, model.extra_head_dim=384 (conv1x1: LayerNorm, Linear 64 -> 384,
  GELU: 6x the width, as T*'s 1280 for 192) and distillation.teacher=the teacher run (alpha 0.5); its
  test score averages the two heads (DeiT).

Resumable and shardable as one `tinymim pipeline` (--shard I/N, then once without for the table):

    python benchmarks/experiments/star_analogue.py --data ../shared/data/cifar10 --out runs/star_analogue
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from cifar_study import SHARED, extract, mean_std

from tinymim.pipeline.planning import PipelineConfig, StageConfig
from tinymim.pipeline.report import read_metrics
from tinymim.pipeline.stages import run_pipeline

STUDENT = ["model.embed_dim=64", "model.depth=6", "model.num_heads=2", "train.blr=6.0e-3"]
STAR = ["model.dist_token=true", "model.extra_head_dim=384"]


def stages(args, teacher_init: str) -> list[StageConfig]:
    """The pipeline's stages. An external student (--student) and the teacher classifier are given to
    the arms by path (a stage's `init` names only stages of the pipeline), so run the shards of this
    benchmark after the teacher classifier, or unsharded."""
    out = []
    student_init, student = None, [f"init={Path(args.student).resolve()}"] if args.student else []
    if args.student is None:
        student_init = "student"
        out.append(StageConfig(name="student", task="distill", config="cifar10/distill_micro", overrides=[
            "student.embed_dim=64", "student.depth=6", "student.num_heads=2", "train.epochs=2",
            "train.warmup_epochs=0.2", f"data.subset={args.pretrain_images}", "teacher.checkpoint=" + teacher_init,
            "teacher.target_block=6", "teacher.relation_heads=4"]))
    out.append(StageConfig(name="teacher_classifier", task="finetune", config="cifar10/finetune_short",
                           overrides=[f"init={teacher_init}", "model.embed_dim=128", "model.depth=6",
                                      "model.num_heads=4", "train.seed=0"]))
    teacher = (args.out / "teacher_classifier").resolve()
    for seed in args.seeds:
        out.append(StageConfig(name=f"plain_s{seed}", task="finetune", config="cifar10/finetune_short",
                               init=student_init, overrides=[*student, *STUDENT, f"train.seed={seed}"]))
        out.append(StageConfig(name=f"star_s{seed}", task="finetune", config="cifar10/finetune_short",
                               init=student_init, overrides=[*student, *STUDENT, *STAR,
                                                             f"distillation.teacher={teacher}", f"train.seed={seed}"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10", help="folder with train.tar, test.tar")
    ap.add_argument("--out", type=Path, default=Path("runs/star_analogue"))
    ap.add_argument("--table", type=Path, default=Path("docs/results/star_analogue.md"))
    ap.add_argument("--student", default=None, help="a relation-distilled student run (default: distil one here)")
    ap.add_argument("--images", type=int, default=10000, help="labelled training images (the demo's)")
    ap.add_argument("--pretrain-images", type=int, default=50000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard", type=lambda v: tuple(map(int, v.split("/"))), default=(0, 1), metavar="I/N")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    train, test = extract(args.data, args.out / "data")
    teacher_init = "builtin:cifar10_mae_vit128x6"
    common = ["train.progress=false", "data.name=folder", f"data.root={train}", f"data.num_workers={args.workers}"]
    finetune = [f"data.val_root={test}", f"data.subset={args.images}", "train.epochs=3"]
    start = time.perf_counter()
    pipeline = PipelineConfig(overrides=common, task_overrides={"finetune": finetune},
                              stages=stages(args, teacher_init))
    run_pipeline(pipeline, args.out, report=False, shard=args.shard)
    if args.shard[1] > 1:
        return

    def top1(name: str) -> float:
        return [e for e in read_metrics(args.out / name)[1] if "val_top1" in e][-1]["val_top1"]

    minutes = {name: json.loads((args.out / name / "pipeline.json").read_text()).get("seconds", 0) / 60
               for name in ["teacher_classifier", *(f"{arm}_s{s}" for arm in ("plain", "star") for s in args.seeds)]}
    plain = [top1(f"plain_s{s}") for s in args.seeds]
    star = [top1(f"star_s{s}") for s in args.seeds]
    rows = "\n".join(f"| {s} | {p:.2f} | {t:.2f} | {t - p:+.2f} |" for s, p, t in zip(args.seeds, plain, star))
    diffs = [t - p for p, t in zip(plain, star)]
    spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
    command = (f"python benchmarks/experiments/star_analogue.py --images {args.images} "
               f"--seeds {' '.join(map(str, args.seeds))}" + (" --student RUN" if args.student else ""))
    text = f"""# TinyMIM*-T at CIFAR-10 scale: distillation token + hard distillation vs plain fine-tuning

Made by `{command}` on a 2-core CPU (this invocation: {(time.perf_counter() - start) / 60:.0f} minutes,
reusing finished stages; teacher classifier {minutes.get('teacher_classifier', 0):.1f} minutes, a T* arm
about {statistics.mean([minutes.get(f'star_s{s}', 0) for s in args.seeds]):.1f}, a plain arm about
{statistics.mean([minutes.get(f'plain_s{s}', 0) for s in args.seeds]):.1f}).

The same relation-distilled student (64 wide, 6 blocks, 2 heads), fine-tuned with `cifar10/finetune_short`
for 3 epochs on {args.images:,} labelled CIFAR-10 training images (blr 6e-3), scored on the 10,000 test
images. T* arm: a distillation token, the extra head path conv1x1 (LayerNorm, Linear 64 -> 384, GELU)
and DeiT-style hard distillation (alpha 0.5) from the teacher classifier (the shipped MAE teacher, 128
wide, 6 blocks, fine-tuned on the same images: test top-1 {top1('teacher_classifier'):.2f}); its score
averages the two heads. Plain arm: the same student and recipe, no token, no teacher.

| seed | plain | T* analogue | difference |
|---|---|---|---|
{rows}
| mean ± std | {mean_std(plain)} | {mean_std(star)} | {statistics.mean(diffs):+.2f} ± {spread:.2f} |
"""
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
