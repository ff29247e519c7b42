"""Will a distillation run fit this machine's memory? An estimate of its peak from the sizes alone
(nothing built), what the machine has free, and the largest batch that fits: checked before a run
starts, so that a run too big is refused in one line instead of being killed by the kernel unannounced.

The estimate counts, in bytes: the teacher's weights; the student's weights, gradients and AdamW's two
moments; per image, the student's saved activations (per block about 24 N x D values and 3 H x N x N
attention values, N tokens, width D, H heads), the teacher's largest block in flight, the relation maps
with their gradients and the image views; plus the Python/PyTorch process and each loader worker. fp32
sizes throughout (autocast keeps part of it in fp32), so it errs on the high side; it is a guard against
runs several times too big, not a prediction to the percent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tinymim.core.config import ConfigError

GiB = 2 ** 30
PROCESS_BYTES = 0.6 * GiB  # Python, PyTorch and timm in the training process
WORKER_BYTES = 0.25 * GiB  # what each loader worker adds (its own Python objects; the rest is shared)
SAFETY = 0.85  # the share of the free memory a run may plan to use


class MemoryFitError(ConfigError):
    """A run whose estimated peak memory exceeds what the machine has free."""


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_bytes() -> int | None:
    """Memory free for a new run: the kernel's MemAvailable, or a cgroup's remaining limit when lower;
    None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            text = Path(limit).read_text().strip()
            if text != "max" and int(text) < 2 ** 60:
                found.append(int(text) - int(Path(used).read_text()))
        except (OSError, ValueError):
            continue
    return min(found) + heap_free_bytes() if found else None


def heap_free_bytes() -> int:
    """Bytes the process's glibc heap holds free: memory that cpu_performance_settings keeps in the process
    after earlier work (timed steps, a k-NN) and that a run here reuses, though the kernel counts it as used;
    0 where it cannot be read (not glibc)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        return int(libc.mallinfo2().fordblks)
    except (OSError, AttributeError):
        return 0


@dataclass
class Sizes:
    """A ViT's sizes as the estimate needs them."""

    tokens: int
    width: int
    depth: int
    heads: int
    params: int

    @classmethod
    def of(cls, sizes: dict, img_size: int, blocks: int | None = None) -> "Sizes":
        """From tinymim.models.vit.vit_sizes's dict at `img_size`, up to `blocks` blocks."""
        d, depth = sizes["embed_dim"], blocks or sizes["depth"]
        grid = img_size // sizes["patch_size"]
        tokens = grid * grid + int(sizes.get("class_token", True)) + (sizes.get("reg_tokens") or 0)
        params = depth * 12 * d * d + (tokens + 3 * sizes["patch_size"] ** 2) * d
        return cls(tokens, d, depth, sizes["num_heads"], params)


@dataclass
class Estimate:
    fixed: float  # bytes whatever the batch
    per_image: float  # bytes per image of a process's micro batch

    def peak(self, batch: int) -> float:
        return self.fixed + batch * self.per_image

    def largest_batch(self, free: float, multiple: int = 8) -> int:
        """The largest micro batch (a multiple of `multiple`, or a power of two below it) that fits `free`."""
        n = int((free * SAFETY - self.fixed) // self.per_image)
        if n >= multiple:
            return n // multiple * multiple
        return 1 << (n.bit_length() - 1) if n >= 1 else 0


def estimate(teacher: Sizes, student: Sizes, relation_heads: int, relations: int, img_size: int,
             workers: int, grad_checkpointing: bool = False) -> Estimate:
    f = 4  # bytes per value
    n, d, h = student.tokens, student.width, student.heads
    block = (24 * n * d + 3 * h * n * n) * f
    saved = (n * d * f * (student.depth - 1) + block) if grad_checkpointing else block * student.depth
    nt, dt = teacher.tokens, teacher.width
    teacher_block = (10 * nt * dt + 2 * teacher.heads * nt * nt) * f + 3 * nt * dt * f  # in flight + its targets
    maps = relations * 6 * relation_heads * n * n * f
    views = 4 * 3 * img_size * img_size * f
    fixed = PROCESS_BYTES + workers * WORKER_BYTES + teacher.params * f + student.params * f * 4
    return Estimate(fixed, saved + teacher_block + maps + views)


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def distill_estimate(cfg, world: int = 1) -> tuple[Estimate, int, str]:
    """(estimate, micro batch per process, a few words on what runs) of a resolved DistillConfig."""
    from tinymim.models.vit import TEACHER_FAMILIES, vit_sizes

    t_sizes, s_sizes = vit_sizes(cfg.teacher.model, TEACHER_FAMILIES), vit_sizes(cfg.student)
    img = cfg.data.img_size
    teacher = Sizes.of(t_sizes, cfg.teacher.model.img_size or img, cfg.teacher.target_block)
    student = Sizes.of(s_sizes, cfg.student.img_size or img)
    relations = len(cfg.loss.relation.relations) if cfg.loss.relation.weight > 0 else 1
    workers = min(cfg.data.num_workers, usable_cores())
    est = estimate(teacher, student, cfg.teacher.relation_heads or t_sizes["num_heads"], relations, img, workers,
                   cfg.train.activation_checkpointing)
    micro = max(1, cfg.train.batch_size // max(1, world) // cfg.train.accum_steps)
    what = (f"teacher {cfg.teacher.model.name} {t_sizes['embed_dim']} wide x {teacher.depth} blocks, student "
            f"{cfg.student.name} {s_sizes['embed_dim']} wide x {s_sizes['depth']}, {img} px, {micro} images "
            f"per step, {workers} loader workers")
    return est, micro, what


def runs_on_cpu(device: str) -> bool:
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


def check_distill_fits(cfg, free: float | None = None) -> None:
    """Refuse, in one line naming the batch that would fit, a CPU distillation run whose estimated peak
    exceeds the free memory (on a GPU the device's own out-of-memory error speaks; host memory holds
    little there). Nothing is built."""
    if not runs_on_cpu(cfg.train.device):
        return
    free = available_bytes() if free is None else free
    if free is None:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    est, micro, what = distill_estimate(cfg, world)
    if est.peak(micro) <= free:
        return
    fit = est.largest_batch(free)
    if fit < 1:
        raise MemoryFitError(f"this run needs about {gib(est.peak(1))} of memory even at 1 image per step ({what}), "
                             f"and this machine has {gib(free)} free; choose a smaller teacher, student or "
                             "data.img_size")
    per_step = fit * world * cfg.train.accum_steps
    accum = -(-micro // fit) * cfg.train.accum_steps
    keep = (f", or keep the batch with train.accum_steps={accum}" if cfg.train.batch_size % (accum * world) == 0
            and cfg.train.batch_size // (accum * world) <= fit else "")
    raise MemoryFitError(f"this run needs about {gib(est.peak(micro))} of memory ({what}), and this machine has "
                         f"{gib(free)} free: it would be killed; train.batch_size={per_step} fits{keep}")
