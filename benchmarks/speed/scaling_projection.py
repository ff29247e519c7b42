"""GPU-hours of every ImageNet and ADE20K recipe on 1, 8 and 32 GPUs, projected from the measured H200
step rate (docs/results/gpu_speed.md), and the loader cores per GPU that rate needs: a plan before
renting a cluster. Every number it writes is a projection, each from the measurement it names.

For each recipe its training step's FLOPs per image are counted here, on the CPU, with
torch.utils.flop_counter (one full step at a small batch: teacher forward, student or model forward
and backward; models built from the recipe with random weights, nothing downloaded). The reference is
the step that was measured, imagenet/distill_vit_small_from_mae_base (MAE ViT-B -> ViT-S), counted the
same way, so a recipe's projected images/s per GPU is

    measured ViT-B -> ViT-S images/s x counted FLOPs(B -> S) / counted FLOPs(recipe)

i.e. every recipe runs at the measured step's MFU (an assumption: larger models usually reach a
higher MFU and ViT-T a lower one). Images per run: epochs x 1,281,167 (ImageNet-1k train), or
max_steps x batch for ADE20K (crops). Several GPUs: linear scaling times an efficiency named here,
not measured (NODE_EFFICIENCY). Loader cores per GPU: images/s per GPU over the Pillow path's measured
views/s per core on the H200 machine (2,685 views/s on 16 cores, pre-training's paired views);
fine-tuning's RandAugment + mixup and ADE20K's transforms were not measured and cost more per image.

    python benchmarks/speed/scaling_projection.py [--json OUT.json] [--markdown OUT.md] [--recipes ...]
    python benchmarks/speed/scaling_projection.py --smoke   # two small recipes: the script runs
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# the measurements projected from (docs/results/gpu_speed.md, one H200, 2026-11-28)
MEASURED = {
    "device": "one NVIDIA H200",
    "reference_recipe": "imagenet/distill_vit_small_from_mae_base",
    "compiled_images_per_s": 4627.0,  # train.compile=true, batch 2048, bf16
    "eager_images_per_s": 3060.0,  # batch 2048, bf16
    "pillow_views_per_s": 2685.0,  # data.decode=cpu, 16 loader workers on the machine's 16 cores
    "pillow_cores": 16,
}
IMAGENET_TRAIN = 1_281_167
# several GPUs: linear scaling times this (assumed, not measured): one 8-GPU node (NVLink), four nodes
NODE_EFFICIENCY = {1: 1.0, 8: 0.90, 32: 0.80}
CORES_PER_GPU = 12  # what users' 8-GPU nodes give each GPU
SMOKE_RECIPES = ["imagenet/distill_vit_tiny_from_tinymim_small", "imagenet/finetune_vit_tiny"]
# recipes whose weights come from a file or the hub: built with random weights instead (FLOPs do not change)
NO_WEIGHTS = {"distill": ["teacher.checkpoint=null"], "finetune": ["init=null", "distillation.teacher=null"],
              "segment": ["init=null"], "mae": []}


def recipes(root: Path) -> list[str]:
    names = [f"imagenet/{p.stem}" for p in sorted((root / "imagenet").glob("*.yaml"))]
    return names + [f"ade20k/{p.stem}" for p in sorted((root / "ade20k").glob("*.yaml")) if not p.stem.startswith("_")]


def task_of(recipe: str) -> str:
    return Path(recipe).stem.split("_")[0]


def count_cpu_attention() -> None:
    """torch.utils.flop_counter counts fused attention on CUDA, not the CPU's kernel (it counted 0):
    the same formulas for it, so that attention is counted here as on the GPU."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in fc.flop_registry:
        return

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query, key, value)

    @fc.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)


def counted(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def pretrain_batch(b: int, size: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
            "jitter": torch.ones(b, 3), "jitter_order": torch.arange(3).repeat(b, 1),
            "label": torch.zeros(b, dtype=torch.long), "skipped": 0}


def step_flops(recipe: str, batch: int) -> dict:
    """FLOPs per image of one training step of `recipe`, and what a run of it trains on."""
    from tinymim.tasks import TASKS, load_config

    task_name = task_of(recipe)
    cfg = load_config(task_name, recipe, NO_WEIGHTS[task_name])
    out = {"recipe": recipe, "task": task_name, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
           "max_steps": cfg.train.max_steps}
    if task_name in ("distill", "mae"):
        task = TASKS[task_name].build(cfg)
        task.train()
        x = pretrain_batch(batch, cfg.data.img_size)
        flops = counted(lambda: task(x)["loss"].backward())
        out["images"] = cfg.train.epochs * IMAGENET_TRAIN
        out["model"] = cfg.student.name if task_name == "distill" else cfg.model.name
        if task_name == "distill":
            out["teacher"] = f"{cfg.teacher.model.name}, block {cfg.teacher.target_block}"
    elif task_name == "finetune":
        from tinymim.tasks.finetune import build_classifier

        star = load_config(task_name, recipe, []).distillation.teacher  # the teacher the recipe names
        model = build_classifier(cfg, 1000).train()
        x = torch.randn(batch, 3, cfg.data.img_size, cfg.data.img_size)
        y = torch.zeros(batch, dtype=torch.long)

        def step():
            logits = model(x)
            logits = logits if isinstance(logits, tuple) else (logits,)
            sum(F.cross_entropy(t, y) for t in logits).backward()

        flops = counted(step)
        if star:  # DeiT's hard distillation: the teacher classifier's forward, every step
            import timm

            teacher = timm.create_model(star.split(".")[0], pretrained=False, num_classes=1000).eval()
            with torch.no_grad():
                flops += counted(lambda: teacher(x))
            out["teacher"] = star
        out["images"] = cfg.train.epochs * IMAGENET_TRAIN
        out["model"] = cfg.model.name
    else:  # segment: UperNet on the ViT, 512 crops, a step of max_steps
        task = TASKS[task_name].build(cfg).train()
        size = cfg.data.crop_size
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, cfg.data.num_classes, (batch, size, size))

        def step():
            logits, aux = task.model(x)
            (task.cross_entropy(logits, y) + cfg.aux_weight * task.cross_entropy(aux, y)).backward()

        flops = counted(step)
        out["images"] = cfg.train.max_steps * cfg.train.batch_size
        out["model"] = f"{cfg.model.name} + UperNet"
    out["flops_per_image"] = flops / batch
    return out


def project(rows: list[dict], reference_flops: float) -> None:
    pillow_per_core = MEASURED["pillow_views_per_s"] / MEASURED["pillow_cores"]
    for r in rows:
        scale = reference_flops / r["flops_per_image"]
        r["compiled_images_per_s"] = MEASURED["compiled_images_per_s"] * scale
        r["eager_images_per_s"] = MEASURED["eager_images_per_s"] * scale
        r["loader_cores_per_gpu"] = r["compiled_images_per_s"] / pillow_per_core
        r["loader_bound_images_per_s"] = min(r["compiled_images_per_s"], CORES_PER_GPU * pillow_per_core)
        r["gpu_hours"] = {}
        for n, eff in NODE_EFFICIENCY.items():
            if r["batch_size"] < n:  # a step's images cannot be shared among n GPUs (ADE20K: 16 crops)
                r["gpu_hours"][n] = None
                continue
            hours = r["images"] / (r["compiled_images_per_s"] * eff) / 3600  # GPU-hours: wall hours x n
            r["gpu_hours"][n] = {"gpu_hours": hours, "wall_hours": hours / n,
                                 "eager_gpu_hours": r["images"] / (r["eager_images_per_s"] * eff) / 3600,
                                 "pillow_12_cores_gpu_hours": r["images"] / (r["loader_bound_images_per_s"] * eff)
                                 / 3600}


GROUPS = (("distill", "Distillation (ImageNet-1k, 300 epochs)"), ("mae", "MAE pre-training (ImageNet-1k, 800 epochs)"),
          ("finetune", "Fine-tuning (ImageNet-1k; TinyMIM*-T: 1000 epochs with its teacher's forward)"),
          ("segment", "ADE20K (UperNet, 512x512 crops, 160k steps of 16)"))


def markdown(rows: list[dict], reference_flops: float) -> str:
    """The projection tables, one per kind of recipe, and the line saying what they are projected from."""
    m = MEASURED
    per_core = m["pillow_views_per_s"] / m["pillow_cores"]
    bound = CORES_PER_GPU * per_core
    lines = [f"Projected from {m['device']}: `{m['reference_recipe']}` measured at {m['compiled_images_per_s']:,.0f} "
             f"images/s compiled and {m['eager_images_per_s']:,.0f} eager, its step counted here at "
             f"{reference_flops / 1e9:.2f} GFLOP per image; every recipe at that step's MFU. Several GPUs: linear "
             "scaling x " + ", ".join(f"{e:.2f} on {n}" for n, e in NODE_EFFICIENCY.items() if n > 1)
             + f" (assumed, not measured). Pillow loader: {per_core:.0f} views/s per core "
             f"({m['pillow_views_per_s']:,.0f} on {m['pillow_cores']} cores); with {CORES_PER_GPU} cores per GPU it "
             f"delivers at most {bound:,.0f} images/s per GPU."]
    for task, title in GROUPS:
        group = [r for r in rows if r["task"] == task]
        if not group:
            continue
        lines += ["", f"**{title}**", "",
                  "| recipe | model (teacher) | GFLOP/image | images | images/s per GPU | 1 GPU: GPU-h, compiled "
                  "(eager) | 8 GPUs: wall h (GPU-h) | 32 GPUs: wall h (GPU-h) | Pillow cores per GPU | 8 GPUs with "
                  f"{CORES_PER_GPU} Pillow cores each: wall h |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            g = r["gpu_hours"]
            teacher = f" ({r['teacher']})" if r.get("teacher") else ""
            cores = r["loader_cores_per_gpu"]

            def wall(n, digits):
                return f"n/a (a step of {r['batch_size']})" if g[n] is None else \
                    f"{g[n]['wall_hours']:,.{digits}f} ({g[n]['gpu_hours']:,.0f})"

            lines.append(
                f"| {r['recipe']} | {r['model']}{teacher} | {r['flops_per_image'] / 1e9:,.1f} | "
                f"{r['images'] / 1e6:,.0f}M | {r['compiled_images_per_s']:,.0f} | {g[1]['gpu_hours']:,.1f} "
                f"({g[1]['eager_gpu_hours']:,.1f}) | {wall(8, 1)} | {wall(32, 2)} | {cores:.1f} | "
                + (f"{g[8]['pillow_12_cores_gpu_hours'] / 8:,.1f} |" if g[8] else "n/a |"))
    return "\n".join(lines)


def main() -> None:
    from tinymim.core.config import RECIPES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=None, help="e.g. imagenet/finetune_vit_base (default: all)")
    ap.add_argument("--batch", type=int, default=2, help="images per counted step")
    ap.add_argument("--smoke", action="store_true", help=f"only {', '.join(SMOKE_RECIPES)}, batch 1")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args()
    logging.getLogger("tinymim").setLevel(logging.ERROR)  # random weights: the warnings are expected here
    torch.manual_seed(0)
    count_cpu_attention()
    names = SMOKE_RECIPES if args.smoke else args.recipes or recipes(Path(RECIPES))
    batch = 1 if args.smoke else args.batch
    t0 = time.perf_counter()
    reference = step_flops(MEASURED["reference_recipe"], batch)["flops_per_image"]
    rows = []
    for name in names:
        rows.append(step_flops(name, batch))
        print(f"{name}: {rows[-1]['flops_per_image'] / 1e9:.2f} GFLOP/image ({time.perf_counter() - t0:.0f}s)",
              flush=True)
    project(rows, reference)
    table = markdown(rows, reference)
    print("\n" + table)
    if args.json:
        Path(args.json).write_text(json.dumps({"measured": MEASURED, "node_efficiency": NODE_EFFICIENCY,
                                               "reference_flops_per_image": reference, "recipes": rows}, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
