"""TinyMIM distillation step on a GPU: tinymim against the release-equivalent baseline, same run.

MAE ViT-B (target block 12, 12 relation heads) -> ViT-S, 224px. Arms:
- release:           benchmarks/speed/release_baseline.py (explicit attention everywhere, fp16 autocast +
                     GradScaler, PyTorch's default AdamW, the release's loss as written, views given);
- tinymim:           tinymim's DistillTask and optimizer as `tinymim distill` builds them (fused
                     attention in every block no loss reads, relation KL keeping only its logits, bf16
                     autocast with the teacher's linears cast to bf16 once, fused AdamW), views built
                     on the GPU from uint8 crops, eager;
- tinymim+compile:   the same under torch.compile (at the eager arm's best and largest batches);
- tinymim+ckpt:      the same with activation checkpointing (how large a batch fits).
For every arm: images/s at each batch (powers of two up to the first that does not fit), its best
batch and the largest that fits. FLOPs per image are counted with torch.utils.flop_counter on
tinymim's eager step (the baseline's own count is printed beside it); MFU = counted FLOPs x images/s
over the bf16 matmul peak measured in the same run.

    python benchmarks/speed/gpu_throughput.py [--json OUT.json] [--batches 64 128 256 512 1024 2048]
        [--budget-s 420] [--img 224] [--device cuda]
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from pathlib import Path

import torch
from distill_throughput import matmul_peak
from release_baseline import ReleaseStep
from torch.utils.flop_counter import FlopCounterMode


def tinymim_step(batch: int, img: int, device: torch.device, compile_: bool = False, ckpt: bool = False,
                 small: bool = False):
    """A closure running one full tinymim training step, built as `tinymim distill` builds it."""
    from tinymim.data.pretrain import DataConfig
    from tinymim.models.vit import ModelConfig
    from tinymim.tasks.distill import build_distill_task
    from tinymim.tasks.distill_config import DistillConfig, TeacherConfig
    from tinymim.train.config import TrainConfig
    from tinymim.train.engine import build_optimizer

    if small:  # a CPU dry run of this script
        student = ModelConfig(name="vit_custom", patch_size=16, embed_dim=64, depth=2, num_heads=2,
                              drop_path_rate=0.1, drop_path_schedule="constant", init="mae", pos_embed="sincos")
        teacher = ModelConfig(name="vit_custom", patch_size=16, embed_dim=96, depth=2, num_heads=4)
    else:
        student = DistillConfig().student  # ViT-S, the release's student setup
        teacher = ModelConfig(name="vit_base_patch16_224")
    cfg = DistillConfig(student=student, teacher=TeacherConfig(model=teacher, relation_heads=None if small else 12),
                        data=DataConfig(img_size=img))
    task = build_distill_task(cfg).to(device)
    task.prepare(device, "bf16")
    if ckpt:
        task.set_grad_checkpointing(True)
    if compile_:
        task.compile()
    opt = build_optimizer(task.get_trainable_module(), TrainConfig(lr=1e-4))
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, generator=g),
            "jitter": 0.6 + 0.8 * torch.rand(batch, 3, generator=g),
            "jitter_order": torch.stack([torch.randperm(3, generator=g) for _ in range(batch)]),
            "label": torch.zeros(batch, dtype=torch.long), "skipped": 0}
    if device.type == "cuda":
        data = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in data.items()}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = task(data)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out["loss"]

    return step


def release_step(batch: int, img: int, device: torch.device, small: bool = False):
    kw = dict(teacher=(96, 2, 4), student=(64, 2, 2), block=2) if small else {}
    rs = ReleaseStep(device, img=img, **kw)
    g = torch.Generator().manual_seed(0)
    t_view = torch.randn(batch, 3, img, img, generator=g).to(device)
    s_view = torch.randn(batch, 3, img, img, generator=g).to(device)
    return lambda: rs(t_view, s_view)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(make, device, warmup: int, steps: int) -> dict:
    """images/s of `steps` steps after `warmup` (compilation happens there), and peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = make()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    sec = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": sec, "warmup_s": warm_s, "peak_mem_gib": mem, "loss": float(loss.detach())}


def count_flops(make) -> float:
    step = make()
    step()  # first step builds lazily created state (optimizer moments)
    with FlopCounterMode(display=False) as fc:
        step()
    return fc.get_total_flops()


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--ckpt-batches", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420, help="skip what is left after this many seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny models: a dry run of the script on a CPU")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    logging.getLogger("tinymim").setLevel(logging.ERROR)  # random teachers: the warning is expected here
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    import timm

    env = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device),
           "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda, "img": args.img}
    print(env, flush=True)
    out = {"env": env, "arms": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    sizes = (1024, 2048) if args.small else (4096, 8192)
    out["peak_bf16_flops"] = peak = matmul_peak(torch.bfloat16, device, sizes=sizes, seconds=2.0)
    print(f"bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    fb = 4 if args.small else 32
    out["flops_per_image"] = count_flops(lambda: tinymim_step(fb, args.img, device, small=args.small)) / fb
    free()
    out["release_flops_per_image"] = count_flops(lambda: release_step(fb, args.img, device, small=args.small)) / fb
    free()
    print(f"counted GFLOP/image: tinymim {out['flops_per_image'] / 1e9:.2f}, "
          f"release {out['release_flops_per_image'] / 1e9:.2f}", flush=True)
    save()

    def search(arm, make, batches):
        rows = out["arms"].setdefault(arm, {})
        for b in batches:
            if time.perf_counter() - start > args.budget_s:
                rows[str(b)] = "skipped: time budget"
                print(f"{arm} batch {b}: skipped (time budget)", flush=True)
                continue
            try:
                r = measure(lambda: make(b), device, args.warmup, args.steps)
            except torch.OutOfMemoryError:
                rows[str(b)] = "out of memory"
                print(f"{arm} batch {b}: out of memory", flush=True)
                free()
                break
            r["images_per_s"] = b / r["step_s"]
            r["mfu"] = out["flops_per_image"] * r["images_per_s"] / peak
            rows[str(b)] = r
            print(f"{arm} batch {b}: {r['images_per_s']:.0f} img/s, MFU {100 * r['mfu']:.1f}%, "
                  f"{r['peak_mem_gib']:.1f} GiB, warm-up {r['warmup_s']:.0f}s", flush=True)
            free()
            save()

    search("release", lambda b: release_step(b, args.img, device, args.small), args.batches)
    search("tinymim", lambda b: tinymim_step(b, args.img, device, small=args.small), args.batches)
    eager = {int(b): r for b, r in out["arms"]["tinymim"].items() if isinstance(r, dict)}
    if eager:
        best = max(eager, key=lambda b: eager[b]["images_per_s"])
        compile_batches = sorted({best, max(eager)})

        def compiled(b):
            torch._dynamo.reset()
            return tinymim_step(b, args.img, device, compile_=True, small=args.small)

        search("tinymim+compile", compiled, compile_batches)
    search("tinymim+ckpt", lambda b: tinymim_step(b, args.img, device, ckpt=True, small=args.small),
           [b for b in args.ckpt_batches if b > max(eager, default=0)] or args.ckpt_batches[-1:])
    save()

    print("\n| arm | best batch | images/s at best | MFU at best | largest batch that fit | peak GiB at largest |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for arm, rows in out["arms"].items():
        ok = {int(b): r for b, r in rows.items() if isinstance(r, dict)}
        if not ok:
            print(f"| {arm} | - | - | - | none | - |")
            continue
        best = max(ok, key=lambda b: ok[b]["images_per_s"])
        summary[arm] = ok[best]["images_per_s"]
        print(f"| {arm} | {best} | {ok[best]['images_per_s']:.0f} | {100 * ok[best]['mfu']:.1f}% | {max(ok)} | "
              f"{ok[max(ok)]['peak_mem_gib']:.1f} |")
    if "release" in summary:
        for arm, ips in summary.items():
            print(f"{arm}: {ips / summary['release']:.2f}x the release-equivalent step")
    out["summary_images_per_s"] = summary
    save()


if __name__ == "__main__":
    main()
