"""Your own images in one call: `tinymim distill --data DIR --teacher T --student S --output OUT`, and
`tinymim.distill(data=..., teacher=..., student=..., output=...)`.

Every setting the distill task needs is derived here from the three names and the data, and printed
before the first step; then the ordinary distill task trains (tinymim.tasks.run) and the student is
exported as a timm folder (OUT/timm). The rules:
- data: a folder of images (flat or nested, no labels), a .tar/.zip of them, a shard folder with an
  index.json, or a brace pattern of indexed shards;
- image size: the teacher's own input size, or the images' median short side when they are smaller
  (a multiple of the teacher's grid, so that a student patch tiles it);
- grid: the student's patch is chosen so that its grid equals the teacher's own (vit_tiny_patch16_224
  at 32 px takes patch 4 under an 8 x 8-grid teacher); the teacher is fed the size where its grid
  equals the student's (tasks/distill_config.py's grid rule);
- relation block and heads: the teacher's last block and its heads (the student's last block takes
  them), as resolve derives them;
- batch: at most 256, at most a quarter of the images (4 steps an epoch), and what fits the free
  memory (train/memory.py); loader workers: the cores but one;
- epochs: about 100,000 images seen, 5 to 300 epochs; warmup: 5% of them;
- time: two timed training steps at the batch; peak memory: train/memory.py's estimate before
  anything is built, then the high-water mark of those steps.
"""
from __future__ import annotations

import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch

from tinymim.core.config import ConfigError
from tinymim.core.errors import DataError, TinymimError
from tinymim.core.rundir import RunDir
from tinymim.models.checkpoint import (
    BUILTIN_PREFIX,
    builtin_teacher,
    is_timm_weights,
    load_state_dict,
    looks_like_path,
    missing_path,
)
from tinymim.models.vit import HUB_PREFIXES, ModelConfig, vit_sizes
from tinymim.train.memory import (
    WORKER_BYTES,
    MemoryFitError,
    available_bytes,
    distill_estimate,
    gib,
    runs_on_cpu,
    usable_cores,
)

MAX_BATCH = 256
IMAGES_SEEN = 100_000  # the epoch rule: about this many images seen in all ...
EPOCH_RANGE = (5, 300)  # ... within these bounds
SIZE_SAMPLE = 32  # images opened to learn the data's typical size
SIZES_RE = re.compile(r"^(dim|depth|heads|patch)(\d+)$")


@dataclass
class Plan:
    """What was derived: the distill task's overrides and the lines printed about them."""

    overrides: list[str]
    lines: list[str] = field(default_factory=list)
    images: int = 0
    batch: int = 0
    epochs: int = 0
    peak_bytes: float = 0.0


@dataclass
class Result:
    run: Path  # the distill run directory
    export: Path  # the student as a timm folder: timm.create_model(f"local-dir:{export}", pretrained=True)
    metrics: dict | None  # the run's last logged metrics (None: it had already finished)
    next_commands: list[str]


# -- data ------------------------------------------------------------------------------------------

def data_keys(data: str) -> list[str]:
    """data.name/data.root overrides for what `data` names."""
    path = Path(data)
    if "{" in data or (path.is_dir() and (path / "index.json").is_file()):
        return ["data.name=shards", f"data.root={json.dumps(data)}"]
    return ["data.name=images", f"data.root={json.dumps(data)}"]


def open_source(keys: list[str]):
    from tinymim.data.pretrain import DataConfig
    from tinymim.data.sources import build_source

    name, root = (json.loads(k.split("=", 1)[1]) if k.endswith('"') else k.split("=", 1)[1] for k in keys)
    return build_source(DataConfig(name=name, root=root))


def typical_short_side(source, where: str) -> int:
    """The median short side of up to SIZE_SAMPLE images spread over the source; refuses data none of
    which can be read."""
    n = len(source)
    picks = sorted({i * n // min(n, SIZE_SAMPLE) for i in range(min(n, SIZE_SAMPLE))})
    sides, first_error = [], None
    for i in picks:
        try:
            img, _ = source.load(i)
            sides.append(min(img.size))
        except Exception as e:  # noqa: BLE001 - any unreadable file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            first_error = first_error or f"{source.describe(i)}: {why}"
    if not sides:
        raise DataError(f"none of the {len(picks)} images sampled from {where} can be read ({first_error}); "
                        "point --data at real image files")
    return int(statistics.median(sides))


# -- teacher ---------------------------------------------------------------------------------------

def teacher_keys(teacher: str) -> tuple[list[str], dict, list[float] | None, list[float] | None]:
    """(overrides, the teacher's own sizes incl. img_size, its mean, its std) for a run directory,
    builtin:NAME, a timm/hub name or a weights file."""
    spec = str(teacher)
    keys = [f"teacher.checkpoint={json.dumps(spec)}"]
    if spec.startswith(BUILTIN_PREFIX) or Path(spec).is_dir():
        path = builtin_teacher(spec) if spec.startswith(BUILTIN_PREFIX) else Path(spec)
        run = RunDir(path)
        arch = run.architecture()
        if not arch or "patch_size" not in arch:
            raise TinymimError(f"teacher {spec} is a folder but not a tinymim run directory with a model; give a "
                               "run directory, a weights file, builtin:NAME or a timm name")
        data = (run.stored_config() or {}).get("data") or {}
        sizes = {**vit_sizes(ModelConfig(**{k: v for k, v in arch.items() if k != "block_heads"})), **arch}
        return keys, sizes, data.get("mean"), data.get("std")
    if not Path(spec).exists() and looks_like_path(spec):  # a missing file, not a timm name to fetch
        raise ConfigError(missing_path(spec))
    if is_timm_weights(spec):
        name = spec.split(":", 1)[1] if spec.startswith(HUB_PREFIXES) else spec
        pretrained = timm.get_pretrained_cfg(name) if not spec.startswith(HUB_PREFIXES) else None
        sizes = vit_sizes(ModelConfig(name=spec), ("VisionTransformer", "Eva"))
        img = pretrained.input_size[-1] if pretrained is not None else 224
        return keys, {**sizes, "img_size": img}, None, None
    path = Path(spec)
    if path.is_file():
        sizes = sizes_of_weights(path)
        keys += [f"teacher.model.{k}={v}" for k, v in (("name", "vit_custom"), *((k, sizes[k]) for k in (
            "patch_size", "embed_dim", "depth", "num_heads")))]
        return keys, sizes, None, None
    if timm.is_model(spec.split(".")[0]):
        raise ConfigError(f"teacher {spec!r} is a timm architecture without pretrained weights; name a tag with "
                          f"weights (see timm.list_pretrained('{spec.split('.')[0]}*')), or give a weights file")
    raise ConfigError(f"teacher {spec!r} is neither a run directory, a weights file, builtin:NAME nor a timm model "
                      "name; see timm.list_pretrained('vit_*') or tinymim's builtin:cifar10_mae_vit128x6")


def sizes_of_weights(path: Path) -> dict:
    """A plain ViT's sizes read from its weights' shapes (heads from the file's tinymim metadata, else
    64 channels a head, as timm's ViTs)."""
    state = load_state_dict(path)
    proj = next((v for k, v in state.items() if k.endswith("patch_embed.proj.weight")), None)
    pos = next((v for k, v in state.items() if k.endswith("pos_embed")), None)
    blocks = {int(m.group(1)) for k in state if (m := re.search(r"blocks\.(\d+)\.", k))}
    if proj is None or pos is None or not blocks:
        raise ConfigError(f"{path} does not hold a plain ViT's weights (patch_embed.proj, pos_embed, blocks.N); "
                          "give a run directory, builtin:NAME or a timm name instead")
    dim, patch = proj.shape[0], proj.shape[-1]
    grid = int(math.isqrt(pos.shape[1] - 1))
    heads = None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        for value in meta.values():
            if value.startswith("{") and '"num_heads"' in value:
                heads = json.loads(value).get("num_heads")
    except Exception:  # noqa: BLE001 - no metadata (a .pth file): the head rule below
        pass
    return {"patch_size": patch, "embed_dim": dim, "depth": max(blocks) + 1, "num_heads": heads or max(1, dim // 64),
            "img_size": grid * patch, "class_token": True, "reg_tokens": 0}


# -- student ---------------------------------------------------------------------------------------

def student_model(student: str) -> tuple[dict, int | None]:
    """(student.* keys, the patch it insists on: None for a timm name, whose patch may be adapted)."""
    parts = [p.strip() for p in str(student).split(",") if p.strip()]
    if parts and all(SIZES_RE.match(p) for p in parts):
        given = {SIZES_RE.match(p).group(1): int(SIZES_RE.match(p).group(2)) for p in parts}
        missing = [k for k in ("dim", "depth", "heads") if k not in given]
        if missing:
            raise ConfigError(f"--student {student}: sizes need dim, depth and heads (patch optional), e.g. "
                              f"dim192,depth12,heads3,patch4; missing {', '.join(missing)}")
        return ({"name": "vit_custom", "embed_dim": given["dim"], "depth": given["depth"],
                 "num_heads": given["heads"]}, given.get("patch"))
    name = str(student)
    if not timm.is_model(name.split(".")[0]) or not name.startswith(("vit_", "deit_")):
        close = timm.list_models(f"{name.split('_')[0]}*")[:3] if name else []
        close_text = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"--student {student!r}: timm has no ViT of that name{close_text}; "
                          "name one of timm.list_models('vit_*'), e.g. vit_tiny_patch16_224, or give sizes, "
                          "e.g. dim192,depth12,heads3,patch4")
    return {"name": name}, None


def student_patch(name_patch: int, fixed: int | None, img: int, teacher_grid: int) -> tuple[int, str]:
    """The student's patch and why: a given one must tile the images; a timm name's own patch is kept
    when it gives the teacher's grid, else changed to the patch that does."""
    if fixed is not None:
        if img % fixed:
            both = math.lcm(fixed, teacher_grid)  # an image size the patch tiles into the teacher's grid
            patch = f"patch{img // teacher_grid} or " if img % teacher_grid == 0 else ""
            raise ConfigError(f"the student's patch {fixed} does not tile {img} px images ({img} / {fixed} is not "
                              f"whole), so its grid cannot match the teacher's {teacher_grid} x {teacher_grid}; "
                              f"give {patch}an image size divisible by {fixed} (--img-size "
                              f"{fixed * teacher_grid if both == fixed * teacher_grid else both})")
        return fixed, "as given"
    if img % name_patch == 0 and img // name_patch == teacher_grid:
        return name_patch, "its own, which gives the teacher's grid"
    if img % teacher_grid == 0:
        return img // teacher_grid, f"changed from {name_patch} so that its grid equals the teacher's"
    if img % name_patch == 0:
        return name_patch, "its own (no whole patch gives the teacher's grid at this size)"
    raise ConfigError(f"neither the student's patch {name_patch} nor a patch giving the teacher's "
                      f"{teacher_grid} x {teacher_grid} grid tiles {img} px images; choose --img-size as a "
                      f"multiple of {teacher_grid} (e.g. {teacher_grid * max(1, round(img / teacher_grid))})")


# -- the plan --------------------------------------------------------------------------------------

def plan(data: str, teacher: str, student: str, img_size: int | None = None, batch_size: int | None = None,
         epochs: int | None = None, overrides=(), free: float | None = None):
    """(the resolved DistillConfig, the Plan): every key derived, every input checked, nothing written."""
    from tinymim.tasks.distill_config import load, resolve

    s_keys, s_patch = student_model(student)
    t_keys, t_sizes, t_mean, t_std = teacher_keys(teacher)
    d_keys = data_keys(str(data))
    source = open_source(d_keys)
    n = len(source)
    short = typical_short_side(source, str(data))

    t_img, t_patch = int(t_sizes["img_size"]), int(t_sizes["patch_size"])
    t_grid = t_img // t_patch
    if img_size is not None:
        img, img_rule = img_size, "as given"
    elif short >= t_img:
        img, img_rule = t_img, f"the teacher's own input size (images are {short} px on their short side)"
    else:
        img = max(t_grid, short // t_grid * t_grid)
        img_rule = (f"the images' median short side {short} px, a multiple of the teacher's {t_grid}-patch grid "
                    f"(the teacher's own size is {t_img} px)")
    s_sizes = vit_sizes(ModelConfig(**s_keys, patch_size=s_patch))
    if s_keys["name"] == "vit_custom" and s_patch is None and img % t_grid == 0:
        patch, patch_rule = img // t_grid, "chosen so that its grid equals the teacher's"
    else:
        patch, patch_rule = student_patch(s_sizes["patch_size"], s_patch, img, t_grid)
    grid = img // patch

    cores = usable_cores()
    workers = max(1, min(8, cores - 1)) if cores > 1 else 0
    keys = [*t_keys, *d_keys, *(f"student.{k}={json.dumps(v)}" for k, v in s_keys.items()),
            f"student.patch_size={patch}", f"student.img_size={img}", f"data.img_size={img}",
            f"data.num_workers={workers}", f"data.crop_scale={json.dumps([0.35, 1.0] if img <= 64 else [0.2, 1.0])}",
            "train.blr=1.0e-3", "train.weight_decay=0.05", "train.log_every=10"]
    if t_mean and t_std:  # a tinymim teacher: the normalization it was trained with, for both views
        keys += [f"data.mean={json.dumps(t_mean)}", f"data.std={json.dumps(t_std)}"]
    cfg = resolve(load(None, [*keys, *overrides]))
    if not (t_mean and t_std) and cfg.teacher.mean:  # a timm teacher: its pretrained normalization for both
        keys += [f"data.mean={json.dumps(cfg.teacher.mean)}", f"data.std={json.dumps(cfg.teacher.std)}"]

    # batch: what fits, at most a quarter of the images, at most MAX_BATCH
    on_cpu = runs_on_cpu(cfg.train.device)
    if free is None:
        free = available_bytes() if on_cpu else torch.cuda.mem_get_info()[0]
    est, _, _ = distill_estimate(cfg)
    fit = est.largest_batch(free) if free else MAX_BATCH
    where = "free memory" if on_cpu else "GPU memory"
    if batch_size is not None:
        if free and est.peak(batch_size) > free:
            raise MemoryFitError(f"--batch-size {batch_size} needs about {gib(est.peak(batch_size))} and this "
                                 f"machine has {gib(free)} {where}: it would be killed; --batch-size {fit} fits"
                                 if fit else f"--batch-size {batch_size} does not fit {gib(free)} {where}, nor "
                                 "does 1 image: choose a smaller teacher, student or --img-size")
        batch, batch_rule = batch_size, "as given"
    else:
        if fit < 1:
            raise MemoryFitError(f"even 1 image per step needs about {gib(est.peak(1))} and this machine has "
                                 f"{gib(free)} {where}: choose a smaller teacher, student or --img-size")
        by_data = 1 << max(0, (n // 4).bit_length() - 1)
        batch = max(1, min(MAX_BATCH, by_data, fit))
        batch_rule = (f"the smallest of {MAX_BATCH}, a quarter of the {n} images rounded down to a power of two "
                      f"({by_data}) and what fits {gib(free * 0.85)} of {where} ({fit})")
    steps_per_epoch = max(1, n // batch)
    epoch_rule = "as given"
    if epochs is None:
        epochs = min(max(round(IMAGES_SEEN / n), EPOCH_RANGE[0]), EPOCH_RANGE[1])
        epoch_rule = f"about {IMAGES_SEEN:,} images seen, {EPOCH_RANGE[0]} to {EPOCH_RANGE[1]} epochs"
    warmup = round(0.05 * epochs, 2)
    keys += [f"train.batch_size={batch}", f"train.epochs={epochs}", f"train.warmup_epochs={warmup}"]
    cfg = resolve(load(None, [*keys, *overrides]))  # the user's overrides win over every derived key
    if overrides:  # they may change what must fit (batch, image size, student): checked again, before any step
        est, _, _ = distill_estimate(cfg)
        if free and est.peak(cfg.train.batch_size) > free:
            fit = est.largest_batch(free)
            raise MemoryFitError(f"with the overrides given this run needs about {gib(est.peak(cfg.train.batch_size))}"
                                 f" and this machine has {gib(free)} {where}: it would be killed; "
                                 + (f"train.batch_size={fit} fits" if fit else "choose a smaller teacher, student "
                                    "or --img-size"))

    p = Plan([*keys, *overrides], images=n, batch=cfg.train.batch_size, epochs=cfg.train.epochs,
             peak_bytes=est.peak(cfg.train.batch_size))
    s_final = vit_sizes(cfg.student)
    p.lines = [
        f"data: {n} images in {data} ({'shards' if d_keys[0].endswith('shards') else 'no labels needed'})",
        f"teacher: {teacher} ({t_sizes['embed_dim']} wide, {t_sizes['depth']} blocks, patch {t_patch}, "
        f"{t_img} px: a {t_grid} x {t_grid} grid)",
        f"student: {student} ({s_final['embed_dim']} wide, {s_final['depth']} blocks, {s_final['num_heads']} heads)",
        f"image size: {cfg.data.img_size} px: {img_rule}",
        f"grid: student patch {cfg.student.patch_size} ({patch_rule}): {grid} x {grid}; the teacher is fed "
        f"{cfg.teacher.model.img_size} px so that its grid is {grid} x {grid} too",
        f"relation block: the teacher's block {cfg.teacher.target_block} of {t_sizes['depth']} split into "
        f"{cfg.teacher.relation_heads} heads -> the student's last block (block {s_final['depth']}), given "
        f"{cfg.teacher.relation_heads} heads; relations {'+'.join(cfg.loss.relation.relations)}",
        f"normalization: mean {cfg.data.mean}, std {cfg.data.std} " + (
            "(the teacher's)" if t_mean or is_timm_weights(str(teacher)) else "(ImageNet's: a weights file does not "
            "record its own; set data.mean, data.std, teacher.mean and teacher.std if it was trained with others)"),
        f"batch: {cfg.train.batch_size} ({batch_rule}); lr {cfg.train.blr:g} x batch / 256",
        f"loader workers: {cfg.data.num_workers} ({cores} cores: the cores but one)",
        f"epochs: {cfg.train.epochs} ({steps_per_epoch} steps each, {steps_per_epoch * cfg.train.epochs} in all; "
        f"{epoch_rule}), warmup "
        f"{cfg.train.warmup_epochs:g} epochs then cosine",
        f"peak memory: about {gib(p.peak_bytes)} estimated ({gib(free)} {where})" if free else
        f"peak memory: about {gib(p.peak_bytes)} estimated",
    ]
    return cfg, p


def timed_steps(cfg, repeats: int = 1) -> tuple[float, float | None]:
    """(seconds per training step, peak bytes) at the run's batch: teacher forward, student forward and
    backward as the engine runs them, on random images, timed after one warm-up step. The peak is the
    process's high-water mark (CPU) or the GPU's allocations; None where it cannot be read."""
    import resource

    from tinymim.tasks.distill import build_distill_task

    device = torch.device("cpu" if runs_on_cpu(cfg.train.device) else "cuda")
    if device.type == "cpu":
        from tinymim.train.distributed import cpu_performance_settings

        cpu_performance_settings()  # as the engine sets them: without, denormals slow the steps several-fold
    task = build_distill_task(cfg)
    task.to(device)
    task.prepare(device, cfg.train.precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    t_img, s_img, batch = cfg.teacher.model.img_size, cfg.data.img_size, cfg.train.batch_size // cfg.train.accum_steps
    x_t, x_s = torch.rand(batch, 3, t_img, t_img, device=device), torch.rand(batch, 3, s_img, s_img, device=device)
    took = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = task.trainable_module(x_s, task.teacher(x_t))
        losses["loss"].backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        took.append(time.perf_counter() - start)
    del task, losses
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return min(took[1:]) * cfg.train.accum_steps, peak


def finetune_recipe(cfg) -> str:
    """The fine-tuning recipe to suggest: small images get the short recipe's crop and flip (the defaults'
    mixup, cutmix and RandAugment are ImageNet's, for 224 px and long schedules)."""
    return "--config cifar10/finetune_short " if cfg.data.img_size <= 64 else ""


def next_commands(run: Path, export: Path, cfg) -> list[str]:
    return [
        f"k-NN of its features:  tinymim knn {run} --data LABELLED_TRAIN_FOLDER --val LABELLED_VAL_FOLDER",
        f"fine-tune it:          tinymim finetune {finetune_recipe(cfg)}--output {run}-finetune init={run} "
        f"data.name=folder data.root=LABELLED_TRAIN_FOLDER data.val_root=LABELLED_VAL_FOLDER "
        f"data.img_size={cfg.data.img_size} train.batch_size={cfg.train.batch_size} train.epochs=50 "
        "train.warmup_epochs=5",
        f"export it as ONNX:     tinymim export {run} --format onnx --output {run}/student.onnx",
        f"load it in plain timm: timm.create_model('local-dir:{export}', pretrained=True)",
    ]


def distill(data: str | Path, teacher: str, student: str, output: str | Path, *, img_size: int | None = None,
            batch_size: int | None = None, epochs: int | None = None, overrides=(), verbose: bool = True) -> Result:
    """Distill `teacher` into `student` on your own images, every other setting derived (printed when
    verbose), and export the student as a timm folder, OUTPUT/timm.

    data: a folder of images (flat or nested, no labels), a .tar/.zip of them, an indexed shard folder
    or a brace pattern of shards; teacher: a tinymim run directory, a weights file, builtin:NAME or a
    timm/hub name with weights; student: a timm ViT name (used at the data's size, its patch adapted to
    the teacher's grid) or sizes, e.g. "dim192,depth12,heads3,patch4"; overrides: `section.key=value`
    strings of the distill task that replace derived keys. Bad input (no images, an unknown student, a
    batch that cannot fit) raises a TinymimError naming the fix before anything is written."""
    from tinymim.evaluate.export import export_timm
    from tinymim.tasks import run

    say = print if verbose else (lambda *a, **k: None)
    cfg, p = plan(str(data), teacher, student, img_size, batch_size, epochs, list(overrides))
    for line in p.lines:
        say(f"  {line}", flush=True)
    per_step, peak = timed_steps(cfg)
    steps = max(1, p.images // cfg.train.batch_size) * cfg.train.epochs
    if cfg.train.max_steps:
        steps = min(steps, cfg.train.max_steps)
    say(f"  time: about {steps * per_step / 60:.1f} min of training ({steps} steps of {per_step:.2f} s, "
        f"{cfg.train.batch_size / per_step:.0f} images/s, from two timed steps)", flush=True)
    if peak is not None:
        workers = min(cfg.data.num_workers, usable_cores())
        say(f"  measured in those steps: peak memory {gib(peak)}" + (
            f" (+ about {gib(workers * WORKER_BYTES)} for {workers} loader workers)" if workers and runs_on_cpu(
                cfg.train.device) else " on the GPU"), flush=True)
    output = Path(output)
    metrics = run("distill", cfg, output)
    export = output / "timm"
    if metrics is not None or not export.is_dir():
        export_timm(output, export, overwrite=True)
    commands = next_commands(output, export, cfg)
    say(f"done: student in {output}, exported as a timm folder {export} (its README.md says which features it "
        "gives); next:")
    for line in commands:
        say(f"  {line}")
    return Result(output, export, metrics, commands)
