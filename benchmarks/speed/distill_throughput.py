"""Distillation training-step throughput against the machine's measured matmul peak.

MAE ViT-B (teacher, target block 12) -> ViT-S (student, relation block with 12 heads), 224px,
batch 16 by default. For each precision: images/s of full training steps (views, teacher forward,
student forward + backward, AdamW step), FLOPs per image counted with torch.utils.flop_counter, and
the fraction of the best of 2048- and 4096-square matmuls measured in the same run and precision.

    python benchmarks/speed/distill_throughput.py [--precisions fp32 bf16] [--batch 16] [--steps 6]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tinymim.data.pretrain import DataConfig
from tinymim.models.vit import ModelConfig
from tinymim.tasks.distill import build_distill_task
from tinymim.tasks.distill_config import DistillConfig, TeacherConfig
from tinymim.train.distributed import cpu_performance_settings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def matmul_peak(dtype: torch.dtype, device: torch.device, sizes=(2048, 4096), seconds: float = 3.0) -> float:
    """Best over sizes of the median FLOP/s of repeated n x n matmuls."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        rates, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds or len(rates) < 3:
            t = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates.append(2 * n**3 / (time.perf_counter() - t))
        best = max(best, sorted(rates)[len(rates) // 2])
    return best


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def build(batch: int, img: int, device: torch.device, compile_: bool, precision: str):
    cfg = DistillConfig(
        student=ModelConfig(name="vit_small_patch16_224", drop_path_rate=0.1, drop_path_schedule="constant"),
        teacher=TeacherConfig(model=ModelConfig(name="vit_base_patch16_224")),
        data=DataConfig(img_size=img))
    task = build_distill_task(cfg).to(device)
    task.prepare(device, precision)
    if compile_:
        task.compile()
    opt = torch.optim.AdamW([p for p in task.get_trainable_module().parameters() if p.requires_grad],
                            lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, generator=g),
            "jitter": 0.6 + 0.8 * torch.rand(batch, 3, generator=g),
            "jitter_order": torch.stack([torch.randperm(3, generator=g) for _ in range(batch)]),
            "label": torch.zeros(batch, dtype=torch.long), "skipped": 0}
    return task, opt, data


def step(task, opt, data, precision, device):
    with autocast(precision, device):
        out = task(data)
    out["loss"].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out["loss"]


def kernel_ceiling(task, opt, data, precision, device) -> float:
    """Seconds per step spent inside matmul, attention and convolution kernels (CPU profiler):
    the step time if every other op were free, hence the best fraction of peak reachable with them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(task, opt, data, precision, device)
    heavy = ("aten::addmm", "aten::mm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward")
    return sum(e.self_cpu_time_total for e in prof.key_averages()
               if e.key in heavy or "scaled_dot_product" in e.key) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the teacher and the student")
    ap.add_argument("--no-cpu-tuning", action="store_true",
                    help="skip the engine's CPU settings (denormal flushing, allocator caching) for comparison")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and not args.no_cpu_tuning:
        cpu_performance_settings()
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, {args.img}px, compile {args.compile}")

    rows = []
    for precision in args.precisions:
        peak = matmul_peak(DTYPES[precision], device)
        task, opt, data = build(args.batch, args.img, device, args.compile, precision)
        for _ in range(args.warmup):
            step(task, opt, data, precision, device)
        with FlopCounterMode(display=False) as fc:
            step(task, opt, data, precision, device)
        flops_per_img = fc.get_total_flops() / args.batch
        times = []
        for _ in range(args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = step(task, opt, data, precision, device)
            loss.item()
            times.append(time.perf_counter() - t)
        sec = sorted(times)[len(times) // 2]  # median step
        ceiling = kernel_ceiling(task, opt, data, precision, device) if device.type == "cpu" else float("nan")
        ips = args.batch / sec
        achieved = flops_per_img * ips
        kernel_bound = flops_per_img * args.batch / ceiling / peak if ceiling == ceiling else float("nan")
        rows.append((precision, ips, flops_per_img / 1e9, achieved / 1e9, peak / 1e9, achieved / peak, kernel_bound))
        print(f"  {precision}: median step {sec:.3f}s, loss {loss.item():.4f}", flush=True)

    print("\n| precision | images/s | GFLOP/image | achieved GFLOP/s | matmul peak GFLOP/s | fraction of peak "
          "| bound if only matmul/attention/conv kernels took time |")
    print("|---|---|---|---|---|---|---|")
    for p, ips, gf, ach, pk, frac, bound in rows:
        print(f"| {p} | {ips:.2f} | {gf:.1f} | {ach:.0f} | {pk:.0f} | {100 * frac:.1f}% | {100 * bound:.1f}% |")


if __name__ == "__main__":
    main()
