"""Which features a trained run gives: one definition that every way out of tinymim shares
(`load_trained(run).model`, `load_vit`, the timm folder and ONNX of `tinymim export`, `tinymim knn`).

An encoder's features are its tokens pooled (`pool`): "avg", the mean of its patch tokens, or
"token", its class token; taken (`features`) at

- "final": after every block and the final norm (the whole encoder), or
- "relation-input": entering the last block, without a final norm: the tokens a distilled student's
  relation block reads, and what the distill task's k-NN monitor scores.
- "auto" (the default): "relation-input" for a distilled student when the path after its last
  block's Q/K/V holds parts no loss reached (relation targets train only Q/K/V there; the final
  norm is trained only by the auxiliary MAE decoder), else "final". Default features then come
  from trained weights only; "final" keeps the whole student (to fine-tune it elsewhere).

A classifier (fine-tuning, linear probe) gives its logits; its features are its pre-logits.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from tinymim.method.targets import ATTENTION_OUTPUT, FINAL_NORM, MLP, STUDENT_PARTS, enabled_targets
from tinymim.models.vit import tokens_before_block, vit_sizes

FEATURES = ("auto", "final", "relation-input")
POOLS = ("avg", "token")


def target_sites(loss: Any) -> set[str]:
    """Block features the enabled targets of `loss` (a DistillLossConfig) read from the teacher's target
    block and the student's last: the distill task builds and freezes by them, and exports judge by them."""
    return set().union(*(target.sites(section) for _, section, target in enabled_targets(loss)))


def kept_parts(loss: Any) -> frozenset[str]:
    """The student parts after its last block's Q/K/V (STUDENT_PARTS) that an enabled target of `loss`
    (a DistillLossConfig) trains."""
    return frozenset().union(*(target.keeps(section) for _, section, target in enabled_targets(loss)))


def untrained_parts(loss: Any, depth: int) -> list[str]:
    """The parts of a distilled student after its last block's Q/K/V that none of the losses in
    `loss` (a DistillLossConfig) reached, as the distill task freezes them (DistillStudent)."""
    kept = kept_parts(loss)
    names = {ATTENTION_OUTPUT: f"block {depth}'s attention projection", MLP: f"block {depth}'s MLP",
             FINAL_NORM: "the final norm"}
    return [names[part] for part in STUDENT_PARTS if part not in kept]


def final_path_caveats(cfg: Any) -> list[str]:
    """Why a distill run's "final" features are not what it trained (a resolved DistillConfig): the
    parts never trained, and a relation block whose attention output was trained split into other
    heads than the model's own (a timm folder holds one head count for every block)."""
    sizes = vit_sizes(cfg.student)
    depth, heads = sizes["depth"], sizes["num_heads"]
    caveats = untrained_parts(cfg.loss, depth)
    trained_heads = {int(k): int(v) for k, v in (cfg.student.block_heads or {}).items()}.get(depth, heads)
    if trained_heads != heads and f"block {depth}'s attention projection" not in caveats:
        caveats.append(f"block {depth}'s attention as trained ({trained_heads} heads; exported with the "
                       f"model's {heads})")
    return caveats


def default_features(task: str, cfg: Any) -> str:
    """What features="auto" means for a run of `task` with the resolved config `cfg`."""
    return "relation-input" if task == "distill" and final_path_caveats(cfg) else "final"


class RelationInputViT(VisionTransformer):
    """A timm VisionTransformer whose features are the tokens entering its last block, without the
    final norm (then pooled as timm pools). Every weight stays in the module (its state dict is the
    run's, the last block and final norm included): what `load_trained` gives for a distilled student
    whose default features are "relation-input"."""

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return tokens_before_block(self, x, len(self.blocks))


def feature_view(vit: torch.nn.Module, features: str, pool: str = "avg") -> torch.nn.Module:
    """`vit` (a head-less timm VisionTransformer, weights loaded) made to return `features` pooled by
    `pool` from model(x), in place: the features the timm export of the same choice computes."""
    if features not in ("final", "relation-input") or pool not in POOLS:
        raise ValueError(f"features must be final or relation-input and pool avg or token, got {features}, {pool}")
    if type(vit) is not VisionTransformer or not isinstance(vit.fc_norm, torch.nn.Identity):
        return vit  # a DistilledViT, or a timm model built to pool through fc_norm: left as built
    vit.global_pool = pool  # timm's pooling after the final norm (fc_norm stays Identity: none was trained)
    if features == "relation-input":
        vit.__class__ = RelationInputViT  # the same module and weights; forward_features stops earlier
    return vit
