"""The distill task's config (tasks/distill.py builds the task from it): the teacher, the loss targets,
the student, the data and the schedule; how a recipe is read (a teacher that is a run directory
supplies its own architecture); and the keys derived from the teacher/student pairing (`resolve`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm

from tinymim.core.config import ConfigError, checked_copy, load_config, merge, parse_overrides, read_recipe
from tinymim.core.rundir import RunDir, architecture_overrides
from tinymim.data.pretrain import DataConfig
from tinymim.method.mae import DecoderConfig
from tinymim.method.relations import RELATION_NAMES
from tinymim.method.targets import TARGETS, enabled_targets
from tinymim.models.checkpoint import BUILTIN_PREFIX, builtin_teacher, is_timm_weights
from tinymim.models.distillation import grid_matched_size
from tinymim.models.vit import HUB_PREFIXES, TEACHER_FAMILIES, ModelConfig, check_input_size, vit_sizes
from tinymim.tasks.base import resolves_once
from tinymim.train.config import TrainConfig
from tinymim.train.knn import KNNMonitorConfig

# the paper's teacher block for its pairs: (teacher width, teacher depth, student width) -> block
PAPER_TARGET_BLOCKS = {(1024, 24, 768): 18}


@dataclass
class TeacherConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="vit_base_patch16_224"))
    # weights: .safetensors / .pth (MAE, TinyMIM layouts) / a tinymim run directory / a timm name with
    # pretrained weights (vit_base_patch16_224.mae, hf-hub:...); None = random init
    checkpoint: str | None = None
    # 1-indexed block whose relations are the target; None = the paper's choice or the last block
    target_block: int | None = None
    # heads the teacher's relation block is split into (a choice, not part of the weights: qkv does not
    # depend on it). Recipes declare it, following the paper's table (docs/method.md section 2): 16 for MAE
    # ViT-L -> ViT-B, 12 for ViT-B -> ViT-S and ViT-S -> ViT-T. None = the head count of teacher.model
    # (never what a run directory's student was trained with: a file and a run dir pair the same way).
    relation_heads: int | None = None
    # drop path in the teacher's blocks while training (the paper's ablation; 0 = none, its best)
    drop_path_rate: float = 0.0
    # the teacher's register tokens (DINOv2/DINOv3 with registers): "drop" leaves them out of its maps
    # and targets (the class token stays; softmax rows renormalize over the tokens kept), "keep" keeps
    # them for a student with as many registers (student.reg_tokens)
    registers: Literal["drop", "keep"] = "drop"
    # per-channel mean the teacher's weights expect (its view is normalized with it on the device); null:
    # timm's pretrained config when the weights come from timm (a timm or hub name), else the data's
    mean: list[float] | None = None
    std: list[float] | None = None  # per-channel std to go with teacher.mean; null: as teacher.mean


@dataclass
class RelationLossConfig:
    """TinyMIM's target: KL between teacher and student relation maps (method/relations.py)."""

    weight: float = 1.0  # 0 = off
    # relation maps to match: qk, vv (the paper's), also qq, kk, kq, qv, vq, kv, vk
    relations: list[str] = field(default_factory=lambda: ["qk", "vv"])
    weights: list[float] | None = None  # per relation; None = 1 each
    softmax: bool = True  # compare softmax maps by KL (the paper); false: raw scaled products by MSE

    def validate(self) -> None:
        unknown = [r for r in self.relations if r not in RELATION_NAMES]
        if unknown:
            raise ValueError(f"unknown relation(s) {unknown}; choose from {list(RELATION_NAMES)}")


@dataclass
class ClassTokenLossConfig:
    """The class-token baseline (method/targets.py): student class token vs the teacher's."""

    weight: float = 0.0  # 0 = off
    criterion: Literal["smooth_l1", "kl"] = "smooth_l1"  # smooth_l1 between tokens, or kl between their softmaxes
    beta: float = 2.0  # smooth-L1 threshold
    teacher_norm: bool = True  # parameter-free LayerNorm on the teacher token


@dataclass
class FeatureLossConfig:
    """The feature-distillation baseline (method/targets.py): projected student feature vs whitened teacher's."""

    weight: float = 0.0  # 0 = off
    # where in the blocks the features are taken (block output, FFN, attention, qkv ...)
    site: Literal["block", "ffn", "ffn_residual", "attn", "attn_residual", "qkv"] = "block"
    beta: float = 2.0  # smooth-L1 threshold
    teacher_norm: bool = True  # whiten the teacher's features (parameter-free LayerNorm)


@dataclass
class MAELossConfig:
    """Auxiliary MAE reconstruction of the masked patches from the student's output (needs mask_ratio > 0)."""

    weight: float = 0.0  # 0 = off
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(embed_dim=256, depth=2, num_heads=8))
    norm_pix_loss: bool = True  # reconstruct per-patch normalized pixels (MAE's default)


@dataclass
class DistillLossConfig:
    """One section per target of method/targets.py's TARGETS, named as its row there."""

    relation: RelationLossConfig = field(default_factory=RelationLossConfig)
    class_token: ClassTokenLossConfig = field(default_factory=ClassTokenLossConfig)
    feature: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    mae: MAELossConfig = field(default_factory=MAELossConfig)

    def validate(self) -> None:
        # a target that reads no teacher feature (MAE reconstruction) distils nothing on its own
        if not any(target.sites(section) for _, section, target in enabled_targets(self)):
            distilling = [name for name, target in TARGETS.items() if target.sites(getattr(self, name))]
            raise ValueError(f"no distillation target: give {', '.join(f'loss.{n}' for n in distilling[:-1])} "
                             f"or loss.{distilling[-1]} a weight > 0")


@dataclass
class DistillConfig:
    # the release's student: MAE's init and a fixed sin-cos position embedding (fine-tuning then
    # trains the loaded table), drop path 0.1 in every block but the relation block
    student: ModelConfig = field(default_factory=lambda: ModelConfig(
        name="vit_small_patch16_224", drop_path_rate=0.1, drop_path_schedule="constant", init="mae",
        pos_embed="sincos"))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    # fraction of the student's patches removed, as MAE masks (the teacher sees the whole image and its
    # targets are taken at the student's visible tokens); 0 = full image, the paper's best
    mask_ratio: float = 0.0
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KNNMonitorConfig = field(default_factory=KNNMonitorConfig)

    def validate(self) -> None:
        check_input_size(self.student, self.data.img_size, "student")  # the teacher's: resolve's grid rule
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.loss.mae.weight > 0 and self.mask_ratio == 0:
            raise ValueError("loss.mae needs masked student input to reconstruct: set mask_ratio (MAE uses 0.75)")


@resolves_once
def resolve(cfg: DistillConfig) -> DistillConfig:
    """A copy of `cfg` with every derived key filled, nothing built: the models' input size (the
    data's), the teacher's target block (the paper's for its pairs, else the last), the heads its
    relation block is split into, and the student's relation block given that head count. Checks
    what only the pairing can tell (a block out of range, heads that cannot split the student)."""
    cfg = checked_copy(cfg)  # validated, as a loaded config is
    if cfg.student.img_size is None:
        cfg.student.img_size = cfg.data.img_size
    t, s = vit_sizes(cfg.teacher.model, TEACHER_FAMILIES), vit_sizes(cfg.student)
    cfg.teacher.model.img_size = teacher_input_size(cfg.teacher.model, t["patch_size"], cfg.data.img_size,
                                                    s["patch_size"])
    check_prefix_tokens(cfg.teacher, t, s, cfg.loss.class_token.weight > 0)
    if cfg.teacher.mean is None or cfg.teacher.std is None:
        mean, std = teacher_norm(cfg.teacher, cfg.data)
        cfg.teacher.mean, cfg.teacher.std = cfg.teacher.mean or mean, cfg.teacher.std or std
    k = cfg.teacher.target_block
    if k is None:
        k = cfg.teacher.target_block = PAPER_TARGET_BLOCKS.get((t["embed_dim"], t["depth"], s["embed_dim"]),
                                                               t["depth"])
    if not 1 <= k <= t["depth"]:
        raise ConfigError(f"teacher.target_block={k} is out of range: the teacher has blocks 1..{t['depth']}")
    if cfg.teacher.relation_heads is None:
        cfg.teacher.relation_heads = cfg.teacher.model.block_heads.get(k, t["num_heads"])
    elif t["embed_dim"] % cfg.teacher.relation_heads:
        raise ConfigError(f"teacher.relation_heads={cfg.teacher.relation_heads}: a block of width {t['embed_dim']} "
                          f"cannot be split into {cfg.teacher.relation_heads} heads")
    t_heads, s_depth = cfg.teacher.relation_heads, s["depth"]
    if cfg.loss.relation.weight > 0:
        if s["embed_dim"] % t_heads:
            raise ConfigError(f"incompatible heads: the teacher's block {k} has {t_heads} heads, and the student's "
                              f"width {s['embed_dim']} cannot be split into {t_heads} heads; choose a student width "
                              f"divisible by {t_heads} or another teacher")
        set_heads = cfg.student.block_heads.get(s_depth)
        if set_heads is not None and set_heads != t_heads:
            raise ConfigError(f"student.block_heads gives the relation block (block {s_depth}) {set_heads} heads, "
                              f"but the teacher's block {k} has {t_heads}; the maps must have the same head count")
        cfg.student.block_heads = {**cfg.student.block_heads, s_depth: t_heads}
    return cfg


def teacher_input_size(model: ModelConfig, teacher_patch: int, img_size: int, student_patch: int) -> int:
    """The grid rule: the teacher sees the student's images resized so its patch grid equals the
    student's (grid x teacher patch: 196 px for a patch-14 teacher of a patch-16 student at 224)."""
    grid = img_size // student_patch
    size = grid_matched_size(grid, teacher_patch)
    if model.img_size is not None and model.img_size != size:
        raise ConfigError(
            f"teacher.model.img_size={model.img_size} gives a {model.img_size / teacher_patch:g}-patch grid (patch "
            f"{teacher_patch}), but the student sees a {grid} x {grid} grid (data.img_size {img_size} / patch "
            f"{student_patch}); no other teacher size matches it: leave teacher.model.img_size unset (tinymim "
            f"feeds the teacher {size} px) or set it to {size}")
    return size


def check_prefix_tokens(teacher: TeacherConfig, t: dict, s: dict, class_token_target: bool = False) -> None:
    """Class and register tokens must pair up: the teacher's class token with the student's (a teacher
    without one, as SigLIP's: the student's is left out of the maps), its registers dropped (student
    without registers) or kept (student with as many)."""
    if not t["class_token"] and class_token_target:
        raise ConfigError(f"teacher {teacher.model.name!r} has no class token (as SigLIP's): the class-token "
                          "target needs one; use loss.relation or loss.feature, or a teacher with a class token")
    if teacher.registers == "keep" and s["reg_tokens"] != t["reg_tokens"]:
        raise ConfigError(f"teacher.registers=keep: the teacher has {t['reg_tokens']} register tokens and the "
                          f"student {s['reg_tokens']}; give the student as many (student.reg_tokens="
                          f"{t['reg_tokens']}) or drop them (teacher.registers=drop)")
    if teacher.registers == "drop" and s["reg_tokens"]:
        raise ConfigError(f"the student has {s['reg_tokens']} register tokens and the teacher's are dropped "
                          "(teacher.registers=drop): keep the teacher's (teacher.registers=keep, as many) or give "
                          "the student none (student.reg_tokens=0)")


def teacher_norm(teacher: TeacherConfig, data: DataConfig) -> tuple[list[float], list[float]]:
    """The mean/std the teacher's weights expect: timm's pretrained config when they come from timm, else
    the data's (a file or run directory was trained on tinymim's or MAE's, i.e. the data's, normalization)."""
    source = teacher.checkpoint if is_timm_weights(teacher.checkpoint) else (
        teacher.model.name if teacher.model.pretrained else None)
    if source:
        name = source.split(":", 1)[1].split("/", 1)[-1] if source.startswith(HUB_PREFIXES) else source
        pretrained = timm.get_pretrained_cfg(name) if timm.is_model(name.split(".")[0]) else None
        if pretrained is not None and pretrained.mean and pretrained.std:
            return list(pretrained.mean), list(pretrained.std)
    return list(data.mean), list(data.std)


def load(recipe, overrides) -> DistillConfig:
    """The recipe with its overrides; a teacher that is a tinymim run directory (or a shipped teacher)
    supplies its own architecture for every teacher.model key the recipe and overrides leave unset."""
    given = merge(read_recipe(recipe) if recipe is not None else {}, parse_overrides(overrides))
    teacher = given.get("teacher") if isinstance(given.get("teacher"), dict) else {}
    return load_config(DistillConfig, recipe, [*teacher_architecture(teacher), *overrides])


def teacher_architecture(teacher: dict) -> list[str]:
    """teacher.model overrides read from what teacher.checkpoint names: a run directory's architecture
    (its image size aside: the grid rule sets the teacher's), or a timm/hub name as the model's name."""
    spec = teacher.get("checkpoint")
    if not spec:
        return []
    model = teacher.get("model") if isinstance(teacher.get("model"), dict) else {}
    if is_timm_weights(str(spec)):
        return [] if "name" in model else [f"teacher.model.name={json.dumps(str(spec))}"]
    path = builtin_teacher(str(spec)) if str(spec).startswith(BUILTIN_PREFIX) else Path(str(spec))
    if not path.is_dir():
        return []
    arch = RunDir(path).architecture()
    if not arch:
        return []
    return architecture_overrides({k: v for k, v in arch.items() if k != "img_size"}, "teacher.model", model)
