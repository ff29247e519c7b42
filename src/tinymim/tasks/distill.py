"""Distilling a frozen teacher into a student ViT: TinyMIM's relations, and every target it is compared with.

Teacher: its block k (1-indexed) on the output of block k-1; blocks after k are dropped. Frozen,
eval mode, no grad, no drop path unless teacher.drop_path_rate asks for some (an ablation).
Student: its last block is matched to the teacher's block k by the enabled targets (weights > 0):
- relations (TinyMIM, default): the student's last block takes the teacher's head count, so both
  relation maps are B x M_t x N x N; only that block's norm1 + qkv feed the loss;
- features at a block site, or the class token (method/targets.py), through a learned linear projection;
- with `mask_ratio` > 0 the student sees only a random subset of patches (targets at those tokens),
  and `loss.mae` adds MAE reconstruction of the hidden patches through a light decoder.
Student parts no loss reaches are frozen, so DDP needs no `find_unused_parameters`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from tinymim.core.config import ConfigError, checked_copy
from tinymim.data.pretrain import DataConfig, paired_views
from tinymim.method.mae import DecoderConfig, MAEDecoder, random_masking, reconstruction_loss
from tinymim.method.relations import RELATION_NAMES, RelationLoss, block_qkv, split_heads
from tinymim.method.targets import ClassTokenLoss, FeatureLoss, block_parts
from tinymim.models.checkpoint import load_vit_weights, load_weights, save_weights
from tinymim.models.distillation import FrozenTeacher
from tinymim.models.vit import (
    ModelConfig,
    TokenFeatures,
    create_vit,
    embed,
    num_tokens,
    run_blocks,
    set_block_heads,
    set_drop_path,
    tokens_before_block,
    vit_sizes,
)
from tinymim.tasks.base import Task, TaskSpec
from tinymim.train.config import TrainConfig
from tinymim.train.knn import KNNMonitor, KNNMonitorConfig

log = logging.getLogger("tinymim")

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
    # depend on it). Recipes declare it, following the paper's table (TINYMIM.md section 2): 16 for MAE
    # ViT-L -> ViT-B, 12 for ViT-B -> ViT-S and ViT-S -> ViT-T. None = the head count of teacher.model
    # (never what a run directory's student was trained with: a file and a run dir pair the same way).
    relation_heads: int | None = None
    # drop path in the teacher's blocks while training (the paper's ablation; 0 = none, its best)
    drop_path_rate: float = 0.0


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
    relation: RelationLossConfig = field(default_factory=RelationLossConfig)
    class_token: ClassTokenLossConfig = field(default_factory=ClassTokenLossConfig)
    feature: FeatureLossConfig = field(default_factory=FeatureLossConfig)
    mae: MAELossConfig = field(default_factory=MAELossConfig)

    def validate(self) -> None:
        if not any(t.weight > 0 for t in (self.relation, self.class_token, self.feature)):
            raise ValueError("no distillation target: give loss.relation, loss.class_token or loss.feature a "
                             "weight > 0")


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
        from tinymim.models.vit import check_input_size

        check_input_size(self.student, self.data.img_size, "student")
        check_input_size(self.teacher.model, self.data.img_size, "teacher.model")
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.loss.mae.weight > 0 and self.mask_ratio == 0:
            raise ValueError("loss.mae needs masked student input to reconstruct: set mask_ratio (MAE uses 0.75)")


def _sites(loss: DistillLossConfig) -> set[str]:
    """Block features the enabled targets need from the teacher's target block / the student's last."""
    sites = set()
    if loss.relation.weight > 0:
        sites.add("qkv")
    if loss.feature.weight > 0:
        sites.add(loss.feature.site)
    if loss.class_token.weight > 0:
        sites.add("block")
    return sites


class DistillStudent(nn.Module):
    """The trainable side: the student ViT plus the losses' projections and the optional MAE decoder.

    forward(image, teacher features) -> dict of named losses and their weighted sum "loss".
    """

    def __init__(self, vit: nn.Module, cfg: DistillLossConfig, teacher_dim: int, teacher_heads: int,
                 mask_ratio: float = 0.0):
        super().__init__()
        self.vit, self.cfg, self.mask_ratio = vit, cfg, mask_ratio
        self.teacher_heads = teacher_heads
        self.sites = _sites(cfg)
        dim = vit.embed_dim
        self.relation = (RelationLoss(cfg.relation.relations, cfg.relation.weights, cfg.relation.softmax)
                         if cfg.relation.weight > 0 else None)
        self.feature = (FeatureLoss(dim, teacher_dim, cfg.feature.beta, cfg.feature.teacher_norm,
                                    parts=3 if cfg.feature.site == "qkv" else 1) if cfg.feature.weight > 0 else None)
        self.class_token = (ClassTokenLoss(dim, teacher_dim, cfg.class_token.criterion, cfg.class_token.beta,
                                           cfg.class_token.teacher_norm) if cfg.class_token.weight > 0 else None)
        self.decoder = None
        if cfg.mae.weight > 0:
            self.decoder = MAEDecoder(dim, vit.patch_embed.grid_size, vit.patch_embed.patch_size[0], cfg.mae.decoder)
        # parts of the student that never reach a loss: frozen, so no optimizer state and no DDP
        # unused-parameter error (relations only need the last block's norm1 + qkv)
        last = vit.blocks[-1]
        unused = [vit.fc_norm, vit.head]
        if self.decoder is None:
            unused.append(vit.norm)
            if not self.sites & {"block", "ffn", "ffn_residual"}:
                unused += [last.norm2, last.mlp, last.ls2]
                if not self.sites & {"attn", "attn_residual"}:
                    unused += [last.attn.proj, getattr(last.attn, "norm", None), last.ls1]
        for module in unused:
            if module is not None:
                module.requires_grad_(False)

    def forward(self, x: torch.Tensor, teacher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        vit = self.vit
        tokens = embed(vit, x)
        restore = mask = None
        if self.mask_ratio > 0:
            # the student sees a random subset of patches; the teacher's targets are taken at them
            p = vit.num_prefix_tokens
            visible_tokens, visible, restore, mask = random_masking(tokens[:, p:], self.mask_ratio)
            tokens = torch.cat([tokens[:, :p], visible_tokens], dim=1)
            index = torch.cat([torch.arange(p, device=x.device).expand(x.shape[0], -1), visible + p], dim=1)
            teacher = {k: v.gather(1, index.unsqueeze(-1).expand(-1, -1, v.shape[-1])) for k, v in teacher.items()}
        tokens = run_blocks(vit, tokens, vit.blocks[:-1])
        last = vit.blocks[-1]
        sites = self.sites | ({"block"} if self.decoder is not None else set())
        student = block_parts(last, tokens, sites)

        losses, total = {}, 0.0
        if self.relation is not None:
            rel = self.relation(split_heads(teacher["qkv"], self.teacher_heads),
                                split_heads(student["qkv"], last.attn.num_heads))
            losses.update({k: v for k, v in rel.items() if k != "loss"})
            losses["loss_relation"] = rel["loss"]
            total = total + self.cfg.relation.weight * rel["loss"]
        if self.feature is not None:
            site = self.cfg.feature.site
            losses["loss_feature"] = self.feature(teacher[site], student[site])
            total = total + self.cfg.feature.weight * losses["loss_feature"]
        if self.class_token is not None:
            losses["loss_class_token"] = self.class_token(teacher["block"][:, 0], student["block"][:, 0])
            total = total + self.cfg.class_token.weight * losses["loss_class_token"]
        if self.decoder is not None:
            pred = self.decoder(vit.norm(student["block"]), restore)
            patch = vit.patch_embed.patch_size[0]
            losses["loss_mae"] = reconstruction_loss(pred, x, mask, patch, self.cfg.mae.norm_pix_loss)
            total = total + self.cfg.mae.weight * losses["loss_mae"]
        losses["loss"] = total
        return losses


class DistillTask(Task):
    name = "distill"
    weights = "student.safetensors"
    model_section = "student"

    def __init__(self, student: nn.Module, teacher: nn.Module, target_block: int, data_cfg: DataConfig,
                 config: DistillConfig):
        loss = config.loss
        teacher_block = teacher.blocks[target_block - 1]
        trainable = DistillStudent(student, loss, teacher.embed_dim, teacher_block.attn.num_heads, config.mask_ratio)
        super().__init__(trainable)
        self.student = student
        # the public API's teacher (models/distillation.py): frozen, up to the target block, its features
        self.teacher = FrozenTeacher(teacher, target_block, teacher_block.attn.num_heads, trainable.sites,
                                     drop_path=True)
        self.data_cfg = data_cfg
        self.config = config
        self.knn = KNNMonitor(config.knn, data_cfg) if config is not None and config.knn.every_epochs else None

    def prepare(self, device: torch.device, precision: str) -> None:
        super().prepare(device, precision)  # the student's attention path; the frozen teacher only runs forward
        # The frozen teacher's linear layers would be cast to the autocast dtype at every step;
        # cast them once instead (same numbers: autocast runs them in that dtype anyway). Norms and
        # embeddings stay fp32, so the residual stream stays fp32 as under plain autocast.
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            for m in self.teacher.modules():
                if isinstance(m, nn.Linear):
                    m.to(dtype)

    def compile(self, backend: str = "inductor", mode=None, **kw):
        self.wrapped["teacher"] = torch.compile(self.teacher, backend=backend, mode=mode, **kw)
        return super().compile(backend, mode, **kw)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        teacher_x, student_x = paired_views(batch, self.data_cfg, self.device)
        teacher_out = self.wrapped.get("teacher", self.teacher)(teacher_x)
        return self.trainable_forward(student_x, teacher_out)

    @torch.no_grad()
    def relation_qkv(self, x: torch.Tensor):
        """(teacher Q, K, V at its target block, student Q, K, V at its last block) for images x."""
        teacher = self.teacher.qkv(x)  # split into the teacher's relation heads, as the loss splits them
        depth = len(self.student.blocks)
        return teacher, block_qkv(self.student.blocks[-1], tokens_before_block(self.student, x, depth))

    def evaluate(self, epoch: int) -> dict | None:
        """k-NN accuracy of the student's features (patch tokens entering its last block: with
        relation targets the blocks after it are not trained) when the k-NN monitor is due."""
        if self.knn is None or not self.knn.due(epoch):
            return None
        return self.knn(TokenFeatures(self.student, len(self.student.blocks)), self.device)

    def export(self, run_dir: Path) -> None:
        meta = {"format": "timm.VisionTransformer"}
        if self.config is not None:
            meta["student"] = json.dumps(asdict(self.config.student))
        save_weights(self.student.state_dict(), Path(run_dir) / self.weights, meta)


def resolve(cfg: DistillConfig) -> DistillConfig:
    """A copy of `cfg` with every derived key filled, nothing built: the models' input size (the
    data's), the teacher's target block (the paper's for its pairs, else the last), the heads its
    relation block is split into, and the student's relation block given that head count. Checks
    what only the pairing can tell (a block out of range, heads that cannot split the student)."""
    cfg = checked_copy(cfg)  # validated, as a loaded config is
    for model in (cfg.student, cfg.teacher.model):
        if model.img_size is None:
            model.img_size = cfg.data.img_size
    t, s = vit_sizes(cfg.teacher.model), vit_sizes(cfg.student)
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


def build_teacher(cfg: TeacherConfig) -> nn.Module:
    """The teacher ViT of a resolved config (its input size set), its weights loaded."""
    teacher = create_vit(cfg.model)
    if cfg.drop_path_rate > 0:
        set_drop_path(teacher, cfg.drop_path_rate)
    if cfg.checkpoint:
        ignored = load_vit_weights(teacher, load_weights(cfg.checkpoint), source=f"teacher checkpoint {cfg.checkpoint}")
        if ignored:
            log.info("teacher checkpoint: set aside %d non-encoder keys (%s%s)", len(ignored),
                     ", ".join(ignored[:5]), " ..." if len(ignored) > 5 else "")
    elif not cfg.model.pretrained:
        log.warning("the teacher has random weights (teacher.checkpoint is not set): its relations carry no "
                    "knowledge; fine for smoke tests, not for pre-training")
    return teacher


def build_distill_task(cfg: DistillConfig) -> DistillTask:
    """Build and check a teacher/student pair from `cfg` (resolved here: the caller's is not changed);
    errors name the mismatch and the fix."""
    cfg = resolve(cfg)
    k, t_heads = cfg.teacher.target_block, cfg.teacher.relation_heads
    teacher = build_teacher(cfg.teacher)
    t_depth, t_width = len(teacher.blocks), teacher.embed_dim
    try:
        set_block_heads(teacher.blocks[k - 1], t_heads)
    except ValueError as e:
        raise ConfigError(f"teacher.relation_heads={t_heads}: {e}") from e
    student = create_vit(cfg.student)
    s_depth = len(student.blocks)
    set_drop_path(student, 0.0, range(s_depth - 1, s_depth))  # the target block has none (as the release)
    log.info("pairing: teacher block %d of %d, %d heads of size %d -> student block %d of %d, %d heads of size %d"
             "%s", k, t_depth, t_heads, t_width // t_heads, s_depth, s_depth, student.blocks[-1].attn.num_heads,
             student.blocks[-1].attn.head_dim,
             "" if cfg.loss.relation.weight > 0 else " (no relation target: the head split does not matter)")

    if num_tokens(teacher) != num_tokens(student):
        raise ConfigError(
            f"token counts differ: the teacher sees {num_tokens(teacher)} tokens "
            f"(img {teacher.patch_embed.img_size}, patch {teacher.patch_embed.patch_size}), the student "
            f"{num_tokens(student)} (img {student.patch_embed.img_size}, patch {student.patch_embed.patch_size}); "
            "relation maps need the same tokens: match patch sizes or image sizes")
    return DistillTask(student, teacher, k, cfg.data, cfg)


def load(recipe, overrides) -> DistillConfig:
    """The recipe with its overrides; a teacher that is a tinymim run directory (or a shipped teacher)
    supplies its own architecture for every teacher.model key the recipe and overrides leave unset."""
    from tinymim.core.config import load_config, merge, parse_overrides, read_recipe

    given = merge(read_recipe(recipe) if recipe is not None else {}, parse_overrides(overrides))
    teacher = given.get("teacher") if isinstance(given.get("teacher"), dict) else {}
    return load_config(DistillConfig, recipe, [*teacher_architecture(teacher), *overrides])


def teacher_architecture(teacher: dict) -> list[str]:
    """teacher.model overrides read from the run directory teacher.checkpoint names, if it names one."""
    from tinymim.core.rundir import RunDir, architecture_overrides
    from tinymim.models.checkpoint import BUILTIN_PREFIX, builtin_teacher

    spec = teacher.get("checkpoint")
    if not spec:
        return []
    path = builtin_teacher(str(spec)) if str(spec).startswith(BUILTIN_PREFIX) else Path(str(spec))
    if not path.is_dir():
        return []
    arch = RunDir(path).architecture()
    model = teacher.get("model") if isinstance(teacher.get("model"), dict) else {}
    return architecture_overrides(arch, "teacher.model", model) if arch else []




SPEC = TaskSpec(task=DistillTask, config=DistillConfig, resolve=resolve, build=build_distill_task,
                trained=lambda cfg: create_vit(cfg.student),
                load=load, kind="pretrain",
                upstream="teacher", exports="encoder",
                help="TinyMIM relation-distillation pre-training of a student ViT")
