"""TinyMIM relation distillation: a frozen teacher's Q-K / V-V relations taught to a student ViT.

Teacher: its block k (1-indexed) on the output of block k-1; blocks after k are dropped. Frozen,
eval mode, no grad, no drop path unless teacher.drop_path_rate asks for some (an ablation). Student: its last block, whose head count is set to the
teacher's, so both relation maps are B x M_t x N x N. Only that block's norm1 + qkv feed the loss;
its attention projection, MLP, norm2 and the final norm are frozen (they would get no gradient),
so DDP needs no `find_unused_parameters`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import yaml
from timm.layers import DropPath

from tinymim.checkpoint import load_vit_weights, load_weights, save_weights
from tinymim.config import ConfigError
from tinymim.data import DataConfig, paired_views
from tinymim.engine import TrainConfig
from tinymim.knn import KNNMonitorConfig
from tinymim.models import (ModelConfig, TokenFeatures, create_vit, num_tokens, set_drop_path, tokens_before_block,
                             truncate)
from tinymim.relations import RELATION_NAMES, RelationLoss, block_qkv
from tinymim.tasks.base import Task

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
    # drop path in the teacher's blocks while training (the paper's ablation; 0 = none, its best)
    drop_path_rate: float = 0.0


@dataclass
class RelationLossConfig:
    relations: list[str] = field(default_factory=lambda: ["qk", "vv"])
    weights: list[float] | None = None
    softmax: bool = True

    def validate(self) -> None:
        unknown = [r for r in self.relations if r not in RELATION_NAMES]
        if unknown:
            raise ValueError(f"unknown relation(s) {unknown}; choose from {list(RELATION_NAMES)}")


@dataclass
class DistillConfig:
    student: ModelConfig = field(default_factory=lambda: ModelConfig(
        name="vit_small_patch16_224", drop_path_rate=0.1, drop_path_schedule="constant"))
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: RelationLossConfig = field(default_factory=RelationLossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KNNMonitorConfig = field(default_factory=KNNMonitorConfig)


class TeacherRelations(nn.Module):
    """Frozen teacher that runs only up to its target block and returns that block's Q, K, V."""

    def __init__(self, vit: nn.Module, block: int):
        super().__init__()
        self.block = block
        self.vit = truncate(vit, block)
        self.vit.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "TeacherRelations":
        super().train(False)  # always eval (no dropout) ...
        for m in self.modules():  # ... except drop path, when the teacher was given some
            if isinstance(m, DropPath):
                m.train(mode)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        tokens = tokens_before_block(self.vit, x, self.block)
        return block_qkv(self.vit.blocks[self.block - 1], tokens)


class StudentRelations(nn.Module):
    """Student ViT run to its last block; returns that block's Q, K, V."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        last = vit.blocks[-1]
        # parts that never reach the loss: frozen, so no optimizer state and no DDP unused-param error
        unused = [getattr(last.attn, "proj", None), getattr(last.attn, "norm", None), last.ls1, last.ls2,
                  last.norm2, last.mlp, vit.norm, vit.fc_norm, vit.head]
        for module in unused:
            if module is not None:
                module.requires_grad_(False)

    def forward(self, x: torch.Tensor):
        tokens = tokens_before_block(self.vit, x, len(self.vit.blocks))
        return block_qkv(self.vit.blocks[-1], tokens)


class DistillTask(Task):
    name = "distill"

    def __init__(self, student: nn.Module, teacher: nn.Module, target_block: int, loss: RelationLoss,
                 data_cfg: DataConfig, config: DistillConfig | None = None):
        student_rel = StudentRelations(student)
        super().__init__(student_rel)
        self.student = student
        self.teacher = TeacherRelations(teacher, target_block)
        self.loss = loss
        self.data_cfg = data_cfg
        self.config = config

    def prepare(self, device: torch.device, precision: str) -> None:
        # On CPU, PyTorch's fused attention backward is 2-3x slower than plain matmul + softmax in
        # bf16/fp16 (benchmarks/distill_throughput.py); the frozen teacher only runs forward.
        explicit = device.type == "cpu" and precision in ("bf16", "fp16")
        for blk in self.student.blocks:
            blk.attn.fused_attn = not explicit
        # The frozen teacher's linear layers would be cast to the autocast dtype at every step;
        # cast them once instead (same numbers: autocast runs them in that dtype anyway). Norms and
        # embeddings stay fp32, so the residual stream stays fp32 as under plain autocast.
        if precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            for m in self.teacher.modules():
                if isinstance(m, nn.Linear):
                    m.to(dtype)

    def compile(self, backend: str = "inductor", mode=None, **kw):
        object.__setattr__(self, "_compiled", torch.compile(self.trainable_module, backend=backend, mode=mode, **kw))
        object.__setattr__(self, "_teacher_fn", torch.compile(self.teacher, backend=backend, mode=mode, **kw))
        object.__setattr__(self, "_loss_fn", torch.compile(self.loss, backend=backend, mode=mode, **kw))
        return self._compiled

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        teacher_x, student_x = paired_views(batch, self.data_cfg, self.device)
        teacher_qkv = getattr(self, "_teacher_fn", self.teacher)(teacher_x)
        student_qkv = self.trainable_forward(student_x)
        return getattr(self, "_loss_fn", self.loss)(teacher_qkv, student_qkv)

    def evaluate(self, epoch: int) -> dict | None:
        """k-NN accuracy of the student's features (patch tokens entering its relation block: the
        blocks after it are not trained by distillation) when the k-NN monitor is due."""
        return self.knn_monitor(epoch, TokenFeatures(self.student, len(self.student.blocks)))

    def export(self, run_dir: Path) -> None:
        meta = {"format": "timm.VisionTransformer"}
        if self.config is not None:
            meta["student"] = json.dumps(asdict(self.config.student))
        save_weights(self.student.state_dict(), Path(run_dir) / "student.safetensors", meta)


def _run_dir_block_heads(path: str) -> dict:
    """Head counts a tinymim run directory's student was trained with (its relation block's)."""
    cfg = Path(path) / "config.yaml"
    if Path(path).is_dir() and cfg.is_file():
        student = (yaml.safe_load(cfg.read_text()) or {}).get("student") or {}
        return {int(k): int(v) for k, v in (student.get("block_heads") or {}).items()}
    return {}


def build_teacher(cfg: TeacherConfig, img_size: int) -> nn.Module:
    if cfg.model.img_size is None:
        cfg.model.img_size = img_size
    if cfg.checkpoint and not cfg.model.block_heads:
        cfg.model.block_heads = _run_dir_block_heads(cfg.checkpoint)
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
    """Build and check a teacher/student pair; errors name the mismatch and the fix."""
    teacher = build_teacher(cfg.teacher, cfg.data.img_size)
    t_depth, t_width = len(teacher.blocks), teacher.embed_dim

    if cfg.student.img_size is None:
        cfg.student.img_size = cfg.data.img_size
    # the student's relation block takes the teacher's head count; build once to learn its depth
    probe = create_vit(ModelConfig(**{**asdict(cfg.student), "block_heads": {}}))
    s_depth, s_width = len(probe.blocks), probe.embed_dim

    k = cfg.teacher.target_block
    if k is None:
        k = PAPER_TARGET_BLOCKS.get((t_width, t_depth, s_width), t_depth)
        cfg.teacher.target_block = k
    if not 1 <= k <= t_depth:
        raise ConfigError(f"teacher.target_block={k} is out of range: the teacher has blocks 1..{t_depth}")
    t_heads = teacher.blocks[k - 1].attn.num_heads
    if s_width % t_heads:
        raise ConfigError(f"incompatible heads: the teacher's block {k} has {t_heads} heads, and the student's "
                          f"width {s_width} cannot be split into {t_heads} heads; choose a student width "
                          f"divisible by {t_heads} or another teacher")
    set_heads = cfg.student.block_heads.get(s_depth)
    if set_heads is not None and set_heads != t_heads:
        raise ConfigError(f"student.block_heads gives the relation block (block {s_depth}) {set_heads} heads, "
                          f"but the teacher's block {k} has {t_heads}; the maps must have the same head count")
    cfg.student.block_heads = {**cfg.student.block_heads, s_depth: t_heads}
    student = create_vit(cfg.student)

    if num_tokens(teacher) != num_tokens(student):
        raise ConfigError(
            f"token counts differ: the teacher sees {num_tokens(teacher)} tokens "
            f"(img {teacher.patch_embed.img_size}, patch {teacher.patch_embed.patch_size}), the student "
            f"{num_tokens(student)} (img {student.patch_embed.img_size}, patch {student.patch_embed.patch_size}); "
            "relation maps need the same tokens: match patch sizes or image sizes")
    loss = RelationLoss(cfg.loss.relations, cfg.loss.weights, cfg.loss.softmax)
    return DistillTask(student, teacher, k, loss, cfg.data, cfg)


def run(cfg: DistillConfig, output: str):
    from tinymim import engine

    return engine.run_task(build_distill_task, cfg, output)


def load(recipe, overrides) -> DistillConfig:
    from tinymim.config import load_config

    return load_config(DistillConfig, recipe, overrides)


