"""TinyMIM distillation step on a GPU: tinymim's arms against the release-equivalent baseline, same run.

MAE ViT-B (target block 12, 12 relation heads) -> ViT-S, 224px. Arms (--arms picks and orders them;
each runs at --batch unless it searches batches):
- release:               benchmarks/speed/release_baseline.py (explicit attention everywhere, fp16
                         autocast + GradScaler, PyTorch's default AdamW, the release's loss as written,
                         views given), at --batches (its best is every arm's "vs release");
- tinymim:               tinymim's DistillTask and optimizer as `tinymim distill` builds them (fused
                         attention in every block no loss reads, relation KL keeping only its logits,
                         bf16 autocast with the teacher's linears cast to bf16 once, fused AdamW), views
                         built on the GPU from uint8 crops, eager, at --batches;
- tinymim+compile:       the same under torch.compile (`train.compile=true`);
- tinymim+compile:reduce-overhead, tinymim+compile:max-autotune: `train.compile_mode=...` (CUDA graphs;
                         max-autotune also searches kernel configurations, minutes of warm-up);
- tinymim+compile+inference-teacher: compiled, and the teacher's compiled forward run under
                         torch.inference_mode, its outputs cloned outside it (the loss keeps tensors
                         made from them for the backward, which inference tensors cannot be);
- tinymim+inference-teacher: the same, eager (a CPU-cheap check of that arm's code);
- tinymim+compile+ckpt:  compiled with activation checkpointing at --ckpt-batches, in order, until one
                         does not fit: the largest batch that fits and its rate;
- tinymim+ckpt:          eager with activation checkpointing at --ckpt-batches.
Every measured row: images/s (--warmup steps, compilation included, then the mean of --steps), MFU,
peak memory, warm-up seconds. FLOPs per image are counted with torch.utils.flop_counter on tinymim's
eager step (the baseline's own count is printed beside it); MFU = counted FLOPs x images/s over the
bf16 matmul peak measured in the same run. Arms past --budget-s are skipped (said in the JSON).

    python benchmarks/speed/gpu_throughput.py [--json OUT.json] [--batch 2048] [--batches 2048]
        [--ckpt-batches 4096 8192] [--arms ...] [--budget-s 300] [--img 224] [--device cuda]
    python benchmarks/speed/gpu_throughput.py --smoke --json OUT.json   # tiny models on a CPU: the script runs
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

ARMS = {  # name -> (how tinymim_step builds it; None: the release baseline), whether it searches ckpt batches
    "release": (None, False),
    "tinymim": ({}, False),
    "tinymim+compile": ({"compile_": True}, False),
    "tinymim+compile:reduce-overhead": ({"compile_": True, "mode": "reduce-overhead"}, False),
    "tinymim+compile+inference-teacher": ({"compile_": True, "inference_teacher": True}, False),
    "tinymim+compile+ckpt": ({"compile_": True, "ckpt": True}, True),
    "tinymim+compile:max-autotune": ({"compile_": True, "mode": "max-autotune"}, False),
    "tinymim+inference-teacher": ({"inference_teacher": True}, False),
    "tinymim+ckpt": ({"ckpt": True}, True),
}
DEFAULT_ARMS = ["release", "tinymim", "tinymim+compile", "tinymim+compile:reduce-overhead",
                "tinymim+compile+inference-teacher", "tinymim+compile+ckpt", "tinymim+compile:max-autotune"]


class InferenceTeacher:
    """The task's (compiled) teacher run under torch.inference_mode, in its own compiled region. Its
    outputs are cloned outside inference mode: the relation loss itself only saves maps computed from
    them (which would be fine), but a feature or class-token target compares the student with the
    teacher's tensors directly and saves them for the backward, which autograd refuses for inference
    tensors; the clone is one copy of the target block's outputs, small beside the step."""

    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, x):
        with torch.inference_mode():
            out = self.teacher(x)
        return {k: v.clone() for k, v in out.items()}


def tinymim_step(batch: int, img: int, device: torch.device, compile_: bool = False, ckpt: bool = False,
                 small: bool = False, mode: str | None = None, inference_teacher: bool = False):
    """A closure running one full tinymim training step, built as `tinymim distill` builds it."""
    from tinymim.data.pretrain import DataConfig
    from tinymim.models.vit import ModelConfig
    from tinymim.tasks.distill import build_distill_task
    from tinymim.tasks.distill_config import DistillConfig, TeacherConfig
    from tinymim.train.config import TrainConfig
    from tinymim.train.optim import build_optimizer

    if small:  # a CPU dry run of this script
        student = ModelConfig(name="vit_custom", patch_size=16, embed_dim=64, depth=2, num_heads=2,
                              drop_path_rate=0.1, drop_path_schedule="constant", init="mae", pos_embed="sincos")
        teacher = ModelConfig(name="vit_custom", patch_size=16, embed_dim=96, depth=2, num_heads=4)
    else:
        student = DistillConfig().student  # ViT-S, the release's student setup
        teacher = ModelConfig(name="vit_base_patch16_224")
    cfg = DistillConfig(student=student, teacher=TeacherConfig(model=teacher, relation_heads=None if small else 12),
                        data=DataConfig(img_size=img))
    torch.manual_seed(0)  # every arm the same weights and drop-path draws: their losses are comparable
    task = build_distill_task(cfg).to(device)
    task.prepare(device, "bf16")
    if ckpt:
        task.set_grad_checkpointing(True)
    if compile_:
        task.compile(mode=mode)
    if inference_teacher:
        task.wrapped["teacher"] = InferenceTeacher(task.wrapped.get("teacher", task.teacher))
    opt = build_optimizer(task.get_trainable_module(), TrainConfig(lr=1e-4))
    g = torch.Generator().manual_seed(0)
    data = {"image": torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, generator=g),
            "jitter": 0.6 + 0.8 * torch.rand(batch, 3, generator=g),
            "jitter_order": torch.stack([torch.randperm(3, generator=g) for _ in range(batch)]),
            "label": torch.zeros(batch, dtype=torch.long), "skipped": 0}
    if device.type == "cuda":
        data = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in data.items()}
    graphs = compile_ and mode in ("reduce-overhead", "max-autotune")

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # as the engine does: a new iteration of the graphs
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = task(dict(data))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out["loss"].detach().float().clone()

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
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
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


def out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, also when a compiler wrapped it (autotuning, a backend failure)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def summarize(out: dict) -> list[dict]:
    """One row per arm at its best batch (and, for batch searches, the largest batch that fit), with
    the release-equivalent step of the same run beside it."""
    release = {int(b): r for b, r in out["arms"].get("release", {}).items() if isinstance(r, dict)}
    best_release = max((r["images_per_s"] for r in release.values()), default=None)
    rows = []
    for arm, results in out["arms"].items():
        ok = {int(b): r for b, r in results.items() if isinstance(r, dict)}
        failed = {int(b): r for b, r in results.items() if not isinstance(r, dict)}
        if not ok:
            rows.append({"arm": arm, "batch": None, "note": "; ".join(f"{b}: {r}" for b, r in failed.items())})
            continue
        best = max(ok, key=lambda b: ok[b]["images_per_s"])
        r = ok[best]
        same = release.get(best)
        rows.append({"arm": arm, "batch": best, "images_per_s": r["images_per_s"], "mfu": r["mfu"],
                     "peak_mem_gib": r["peak_mem_gib"], "warmup_s": r["warmup_s"],
                     "vs_release_best": r["images_per_s"] / best_release if best_release else None,
                     "vs_release_same_batch": r["images_per_s"] / same["images_per_s"] if same else None,
                     "largest_batch_that_fit": max(ok),
                     "note": "; ".join(f"{b}: {v}" for b, v in failed.items())})
    return rows


def markdown(out: dict) -> str:
    """The step table: every arm beside the release-equivalent step measured in the same run."""
    release = out.get("release_best")
    lines = [f"release-equivalent step in this run: {release['images_per_s']:,.0f} images/s at batch "
             f"{release['batch']}" if release else "release-equivalent step: not measured",
             "", "| arm | batch | images/s | vs release (same run) | MFU | peak GiB | warm-up s | "
             "largest batch that fit |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out.get("summary", []):
        if r["batch"] is None:
            lines.append(f"| {r['arm']} | - | - | - | - | - | - | none ({r['note']}) |")
            continue
        vs = f"{r['vs_release_best']:.2f}x" if r["vs_release_best"] else "-"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        note = f" ({r['note']})" if r["note"] else ""
        lines.append(f"| {r['arm']} | {r['batch']} | {r['images_per_s']:,.0f} | {vs} | {100 * r['mfu']:.1f}% | {mem} | "
                     f"{r['warmup_s']:.0f} | {r['largest_batch_that_fit']}{note} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS), help="in this order")
    ap.add_argument("--batch", type=int, default=2048, help="every arm's batch, except the searches")
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="release and tinymim (eager): these batches (default: --batch)")
    ap.add_argument("--ckpt-batches", type=int, nargs="+", default=[4096, 8192],
                    help="the +ckpt arms: tried in order until one does not fit")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=420, help="skip what is left after this many seconds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", "--small", dest="smoke", action="store_true",
                    help="tiny models, batches 8 (ckpt 16, 32), 1 warm-up and 2 steps: the script runs on a CPU")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="also write the step table here")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.batches, args.ckpt_batches = 8, None, [16, 32]
        args.steps, args.warmup = 2, 1
    batches = args.batches or [args.batch]
    device = torch.device(args.device)
    start = time.perf_counter()
    logging.getLogger("tinymim").setLevel(logging.ERROR)  # random teachers: the warning is expected here
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    import timm

    env = {"torch": torch.__version__, "timm": timm.__version__, "device": str(device),
           "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "cuda": torch.version.cuda, "img": args.img, "smoke": args.smoke}
    print(env, flush=True)
    out = {"env": env, "arms": {}}

    def save():  # after every measurement, summary included: a run cut short by its timeout keeps what it had
        out["summary"] = summarize(out)
        release = [r for r in out["summary"] if r["arm"] == "release" and r["batch"]]
        out["release_best"] = release[0] if release else None
        out["summary_images_per_s"] = {r["arm"]: r["images_per_s"] for r in out["summary"] if r["batch"]}
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    sizes = (256, 512) if args.smoke else (4096, 8192)
    out["peak_bf16_flops"] = peak = matmul_peak(torch.bfloat16, device, sizes=sizes,
                                                seconds=0.2 if args.smoke else 2.0)
    print(f"bf16 matmul peak {peak / 1e12:.2f} TFLOP/s", flush=True)
    fb = 4 if args.smoke else 32
    out["flops_per_image"] = count_flops(lambda: tinymim_step(fb, args.img, device, small=args.smoke)) / fb
    free()
    out["release_flops_per_image"] = count_flops(lambda: release_step(fb, args.img, device, small=args.smoke)) / fb
    free()
    print(f"counted GFLOP/image: tinymim {out['flops_per_image'] / 1e9:.2f}, "
          f"release {out['release_flops_per_image'] / 1e9:.2f}", flush=True)
    save()

    def search(arm, make, arm_batches, stop_at_oom=True):
        rows = out["arms"].setdefault(arm, {})
        for b in arm_batches:
            if time.perf_counter() - start > args.budget_s:
                rows[str(b)] = "skipped: time budget"
                print(f"{arm} batch {b}: skipped (time budget)", flush=True)
                continue
            oom = None
            try:
                r = measure(lambda: make(b), device, args.warmup, args.steps)
            except Exception as e:  # noqa: BLE001 - out of memory ends a search; anything else is reported
                oom = out_of_memory(e)
                rows[str(b)] = "out of memory" if oom else f"failed: {type(e).__name__}: {str(e)[:300]}"
                print(f"{arm} batch {b}: {rows[str(b)]}", flush=True)
            free()  # after the except block: the exception's frames no longer hold the step's tensors
            if oom is not None:
                if oom and stop_at_oom:
                    break
                continue
            r["images_per_s"] = b / r["step_s"]
            r["mfu"] = out["flops_per_image"] * r["images_per_s"] / peak
            rows[str(b)] = r
            mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "cpu"
            print(f"{arm} batch {b}: {r['images_per_s']:.0f} img/s, MFU {100 * r['mfu']:.1f}%, {mem}, "
                  f"warm-up {r['warmup_s']:.0f}s", flush=True)
            save()

    for arm in args.arms:
        kwargs, searches = ARMS[arm]
        if torch._dynamo is not None:
            torch._dynamo.reset()  # each compiled arm compiles its own graphs
        if kwargs is None:
            search(arm, lambda b: release_step(b, args.img, device, args.smoke), batches)
            continue
        arm_batches = args.ckpt_batches if searches else batches if arm == "tinymim" else [args.batch]
        search(arm, lambda b, kw=kwargs: tinymim_step(b, args.img, device, small=args.smoke, **kw), arm_batches)

    save()
    table = markdown(out)
    print("\n" + table, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
