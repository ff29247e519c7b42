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
The config, how a recipe is read into it and the keys the pairing derives: tasks/distill_config.py.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from tinymim.core.config import ConfigError
from tinymim.data.pretrain import DataConfig, paired_views, with_device_images
from tinymim.method.attention import block_qkv, check_readable
from tinymim.method.mae import random_masking
from tinymim.method.targets import (
    TARGETS,
    Pairing,
    Target,
    TargetInputs,
    block_parts,
    enabled_targets,
    student_part_modules,
)
from tinymim.models.checkpoint import load_vit_weights, load_weights, save_weights
from tinymim.models.distillation import FrozenTeacher
from tinymim.models.features import kept_parts, target_sites
from tinymim.models.vit import (
    TEACHER_FAMILIES,
    TokenFeatures,
    create_vit,
    embed,
    num_tokens,
    prefix_layout,
    run_blocks,
    set_drop_path,
    tokens_before_block,
)
from tinymim.tasks.base import Task, TaskSpec
from tinymim.tasks.distill_config import DistillConfig, DistillLossConfig, TeacherConfig, load, resolve
from tinymim.train.knn import KNNMonitor
from tinymim.train.memory import check_distill_fits

log = logging.getLogger("tinymim")


class DistillStudent(nn.Module):
    """The trainable side: the student ViT plus the enabled targets (method/targets.py: their
    projections, the MAE decoder).

    forward(image, teacher features) -> dict of named losses and their weighted sum "loss".
    """

    def __init__(self, vit: nn.Module, cfg: DistillLossConfig, teacher_dim: int, teacher_heads: int,
                 mask_ratio: float = 0.0, skip_class_token: bool = False):
        super().__init__()
        self.vit, self.cfg, self.mask_ratio = vit, cfg, mask_ratio
        # a teacher without a class token (SigLIP): the student's is left out of the targets' tokens
        self.skip_class_token = skip_class_token
        self.teacher_heads = teacher_heads
        pairing = Pairing(vit.embed_dim, teacher_dim, vit.blocks[-1].attn.num_heads, teacher_heads,
                          tuple(vit.patch_embed.grid_size), vit.patch_embed.patch_size[0])
        enabled = enabled_targets(cfg)
        self.targets: dict[str, Target] = {name: target(section, pairing) for name, section, target in enabled}
        self.weights = {name: section.weight for name, section, _ in enabled}  # summed in TARGETS' order
        for name, target in TARGETS.items():  # each where a checkpoint holds it; None when off
            setattr(self, target.state_name or name, self.targets.get(name))
        self.sites = target_sites(cfg)  # what the teacher computes
        self.student_sites = set().union(*(target.student_sites(section) for _, section, target in enabled))
        # parts of the student that never reach a loss: frozen, so no optimizer state and no DDP
        # unused-parameter error (relations only need the last block's norm1 + qkv)
        kept = kept_parts(cfg)
        frozen = [vit.fc_norm, vit.head]
        for part, modules in student_part_modules(vit).items():
            if part not in kept:
                frozen += modules
        for module in frozen:
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
            pt = p - self.skip_class_token  # the teacher's prefix tokens among its targets
            index = torch.cat([torch.arange(pt, device=x.device).expand(x.shape[0], -1), visible + pt], dim=1)
            teacher = {k: v.gather(1, index.unsqueeze(-1).expand(-1, -1, v.shape[-1])) for k, v in teacher.items()}
        tokens = run_blocks(vit, tokens, vit.blocks[:-1])
        student = block_parts(vit.blocks[-1], tokens, self.student_sites)
        matched = {k: v[:, 1:] for k, v in student.items()} if self.skip_class_token else student
        inputs = TargetInputs(teacher, matched, student, x, mask, restore, vit.norm)

        losses, total = {}, 0.0
        for name, target in self.targets.items():
            parts = target.loss(inputs)
            losses.update({k: v for k, v in parts.items() if k != "loss"})
            losses[f"loss_{name}"] = parts["loss"]
            total = total + self.weights[name] * parts["loss"]
        losses["loss"] = total
        return losses


class DistillTask(Task):
    """A ViT student trained on a frozen teacher's token relations (TinyMIM), monitored by k-NN accuracy."""

    name = "distill"
    weights = "student.safetensors"
    model_section = "student"

    def __init__(self, student: nn.Module, teacher: nn.Module, target_block: int, data_cfg: DataConfig,
                 config: DistillConfig):
        loss, t = config.loss, config.teacher
        heads = t.relation_heads or teacher.blocks[target_block - 1].attn.num_heads
        self.skip_class_token = prefix_layout(teacher)[0] == 0  # SigLIP: no class token to match the student's
        trainable = DistillStudent(student, loss, teacher.embed_dim, heads, config.mask_ratio, self.skip_class_token)
        super().__init__(trainable)
        self.student = student
        # the public API's teacher (models/distillation.py): frozen, up to the target block, its features
        # at the grid-matched input size, registers dropped unless kept
        self.teacher = FrozenTeacher(teacher, target_block, heads, trainable.sites, drop_path=True,
                                     img_size=t.model.img_size, registers=t.registers)
        self.data_cfg = data_cfg
        self.prefetch_depth = data_cfg.prefetch  # the next batch's views built while this one trains
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

    def prefetch(self, batch: dict) -> dict:
        return with_device_images(batch, self.data_cfg, self.device)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        teacher_x, student_x = paired_views(batch, self.data_cfg, self.device, self.config.teacher.mean,
                                            self.config.teacher.std)
        teacher_out = self.wrapped.get("teacher", self.teacher)(teacher_x)
        return self.trainable_forward(student_x, teacher_out)

    @torch.no_grad()
    def relation_qkv(self, x: torch.Tensor):
        """(teacher Q, K, V at its target block, student Q, K, V at its last block) for images x."""
        teacher = self.teacher.qkv(x)  # split into the teacher's relation heads, as the loss splits them
        depth = len(self.student.blocks)
        student = block_qkv(self.student.blocks[-1], tokens_before_block(self.student, x, depth))
        if self.skip_class_token:  # the tokens the teacher has
            student = tuple(t[:, :, 1:] for t in student)
        return teacher, student

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



def build_teacher(cfg: TeacherConfig) -> nn.Module:
    """The teacher ViT (timm ViT or EVA) of a resolved config (its grid-matched input size set), its
    weights loaded (position embeddings resampled by timm when trained at another size)."""
    # the weights first: a checkpoint that cannot be had (a hub offline) is refused before a model is built
    state = load_weights(cfg.checkpoint) if cfg.checkpoint else None
    teacher = create_vit(cfg.model, families=TEACHER_FAMILIES)
    if cfg.drop_path_rate > 0:
        set_drop_path(teacher, cfg.drop_path_rate)
    if state is not None:
        ignored = load_vit_weights(teacher, state, source=f"teacher checkpoint {cfg.checkpoint}")
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
    if "qkv" in target_sites(cfg.loss):  # before anything reads its attention (FrozenTeacher checks it too)
        check_readable(teacher.blocks[k - 1], f"teacher block {k}")
        t_attn = teacher.blocks[k - 1].attn
        if t_heads != t_attn.num_heads and (rope_or_norm := _own_transforms(teacher, t_attn)):
            log.info("teacher block %d applies %s per head of its %d heads; its Q/K are taken after them and then "
                     "split into %d relation heads (maps that are no longer its own attention)", k, rope_or_norm,
                     t_attn.num_heads, t_heads)
    student = create_vit(cfg.student)
    s_depth = len(student.blocks)
    set_drop_path(student, 0.0, range(s_depth - 1, s_depth))  # the target block has none (as the release)
    log.info("pairing: teacher block %d of %d, %d heads of size %d -> student block %d of %d, %d heads of size %d"
             "%s", k, t_depth, t_heads, t_width // t_heads, s_depth, s_depth, student.blocks[-1].attn.num_heads,
             student.blocks[-1].attn.head_dim,
             "" if cfg.loss.relation.weight > 0 else " (no relation target: the head split does not matter)")

    cls, regs = prefix_layout(teacher)
    t_tokens = teacher.patch_embed.num_patches + cls + (regs if cfg.teacher.registers == "keep" else 0)
    if t_tokens + (1 - cls) != num_tokens(student):  # without a class token the student's is left out
        raise ConfigError(
            f"token counts differ: the teacher gives {t_tokens} tokens "
            f"(img {teacher.patch_embed.img_size}, patch {teacher.patch_embed.patch_size}), the student "
            f"{num_tokens(student)} (img {student.patch_embed.img_size}, patch {student.patch_embed.patch_size}); "
            "relation maps need the same tokens: match patch sizes or image sizes")
    return DistillTask(student, teacher, k, cfg.data, cfg)


def _own_transforms(teacher: nn.Module, attn: nn.Module) -> str:
    """What a teacher's attention does per head to Q/K beyond the projection: 'q/k norm', 'rotary embedding'."""
    found = [] if isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity) else ["q/k norm"]
    if getattr(teacher, "rope", None) is not None:
        found.append("rotary embedding")
    return " and ".join(found)


SPEC = TaskSpec(task=DistillTask, config=DistillConfig, resolve=resolve, build=build_distill_task,
                trained=lambda cfg: create_vit(cfg.student), checkpoint_prefix="vit.",
                load=load, kind="pretrain", fits=check_distill_fits,
                upstream="teacher", exports="encoder",
                help="TinyMIM relation-distillation pre-training of a student ViT")
