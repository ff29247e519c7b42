"""A trained model as a plain timm VisionTransformer, ready to leave tinymim: the classifier of a
fine-tuning run, else a feature extractor, from a run directory (its architecture from its config), a
shipped teacher or a weights file; with the run's own preprocessing and licence in its pretrained_cfg.
What `tinymim export` writes (evaluate/export.py), what `tinymim knn` scores and what `tinymim.load_vit`
returns.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import timm
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from tinymim.core.errors import TinymimError
from tinymim.core.rundir import RunDir
from tinymim.models.checkpoint import BUILTIN_PREFIX, CheckpointError, builtin_teacher, load_vit_weights, load_weights
from tinymim.models.vit import ModelConfig, create_vit, size_args, timm_architecture
from tinymim.tasks import TASKS, load_trained

log = logging.getLogger("tinymim")

FEATURES = ("final", "relation-input")
POOLS = ("avg", "token")  # an encoder's output: the mean of its patch tokens (k-NN's features), or its class token
# weights released under CC-BY-NC-4.0 (MAE's) that a teacher name or file may point at
_NON_COMMERCIAL_MARKS = ("mae_pretrain", "mae_finetuned", "mae_visualize", ".mae")


def _run_info(path: Path) -> tuple[ModelConfig, dict, str]:
    """(the model the run produced, its config, its kind) of a tinymim run directory."""
    run = RunDir(path)
    cfg, section = run.stored_config() or {}, run.model_section()
    if section and isinstance(cfg.get(section), dict):
        known = {k: v for k, v in cfg[section].items() if k in ModelConfig.__dataclass_fields__}
        return ModelConfig(**known), cfg, run.task()
    raise CheckpointError(f"{path}/config.yaml describes no model (no 'student' or 'model' section)")


def _not_a_run(folder: Path) -> str:
    """Why a folder without a run config cannot be exported, and what to export instead."""
    entries = sorted(folder.iterdir())
    stages = [p for p in entries if (p / RunDir.RECORD).is_file()]
    if stages:  # a pipeline's folder: each stage is a run of its own
        named = ", ".join(str(p) for p in stages[:6]) + (f" and {len(stages) - 6} more" if len(stages) > 6 else "")
        return f"{folder} is a pipeline folder, not a run: export one of its stages' run folders instead ({named})"
    if (folder / RunDir.RECORD).is_file():
        return (f"{folder} is a pipeline stage whose run has not started (no config.yaml): run its pipeline again, "
                "then export it")
    if not entries:
        return (f"{folder} is an empty folder: it holds no run; give a tinymim run directory (or a weights file "
                "with --model)")
    return (f"{folder} holds no tinymim run (no config.yaml); give a run directory, or a weights file with --model "
            "(a timm name such as vit_small_patch16_224)")


def data_config(run_cfg: dict, img_size: int, kind: str) -> dict:
    """The preprocessing the run used, in timm's pretrained_cfg terms."""
    data = run_cfg.get("data") or {}
    crop = data.get("eval_crop_pct") if kind == "finetune" else None
    if crop is None:
        crop = 1.0 if img_size <= 64 else 0.875  # as tinymim's k-NN evaluation of pre-trained features
    return {"input_size": (3, img_size, img_size), "mean": tuple(data.get("mean") or IMAGENET_DEFAULT_MEAN),
            "std": tuple(data.get("std") or IMAGENET_DEFAULT_STD), "crop_pct": float(crop), "crop_mode": "center",
            "interpolation": "bicubic"}


def build_exportable(source: str | Path, model_name: str | None = None, features: str = "final",
                     pool: str = "avg") -> tuple[torch.nn.Module, dict]:
    """A timm-created VisionTransformer holding the weights of a run directory or checkpoint file:
    the classifier of a fine-tuning run, else a feature extractor whose output is the mean of its
    patch tokens after the final norm (pool="avg": the features `tinymim knn` reads) or its class
    token (pool="token")."""
    if features not in FEATURES:
        raise TinymimError(f"--features must be one of {', '.join(FEATURES)}, got {features!r}")
    if pool not in POOLS:
        raise TinymimError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if str(source).startswith(BUILTIN_PREFIX):  # a shipped teacher: its run directory
        source = builtin_teacher(str(source))
    source = Path(source)
    run_dir = source.is_dir() and RunDir(source).stored_config() is not None
    if run_dir:
        model_cfg, run_cfg, kind = _run_info(source)
    elif source.is_dir() and RunDir(source).weights() is None:  # with weights: a bare checkpoint's folder
        raise TinymimError(_not_a_run(source))
    elif source.exists():
        if not model_name:
            raise TinymimError(f"{source} is a bare checkpoint: say which architecture it holds with --model "
                               "(a timm name such as vit_small_patch16_224)")
        model_cfg, run_cfg, kind = ModelConfig(name=model_name), {}, "checkpoint"
    else:
        raise CheckpointError(f"{source} does not exist")
    exports = TASKS[kind].exports if kind in TASKS else "encoder"
    if exports == "probe":
        raise TinymimError(f"{source} is a linear probe (a frozen backbone + BatchNorm + linear head): export the "
                           "run its backbone came from (its `init`) instead")
    if exports == "segmenter":
        raise TinymimError(f"{source} is a segmentation run: its segmenter.safetensors loads with "
                           "tinymim.tasks.segment.build_segment_task; timm has no UperNet to export it to")
    classifier = exports == "classifier"
    if classifier and features != "final":
        raise TinymimError(f"{source} is a fine-tuned classifier: --features applies to pre-trained encoders")
    # default head counts everywhere (the relation block's only changed how Q/K/V were split)
    model_cfg = replace(model_cfg, block_heads={}, drop_path_rate=0.0, pretrained=False)
    arch, model_args = timm_architecture(model_cfg), size_args(model_cfg)
    if model_args.get("img_size") is None and (run_cfg.get("data") or {}).get("img_size"):
        model_args["img_size"] = run_cfg["data"]["img_size"]
    # a run's weights through its own model (load_trained: the one reader of run directories), a file as it is
    state = load_trained(source).model.state_dict() if run_dir else load_weights(source)
    if classifier:
        pool = run_cfg.get("global_pool", "avg")
        model_args.update(global_pool=pool, fc_norm=pool == "avg")
        if model_cfg.dist_token:  # TinyMIM*-T's classifier: tinymim builds it (timm has no conv1x1 / avg-pool DeiT)
            model = create_vit(replace(model_cfg, img_size=model_args.get("img_size")),
                               num_classes=int(run_cfg["num_classes"]), global_pool=pool, fc_norm=pool == "avg")
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=int(run_cfg["num_classes"]), **model_args)
        model.load_state_dict(state)  # all of it: encoder, fc_norm, head
        ignored = []
    else:
        if features == "relation-input":
            depth = model_args.get("depth") or len(timm.create_model(arch, pretrained=False).blocks)
            last = f"blocks.{depth - 1}."
            state = {k: v for k, v in state.items() if not k.startswith((last, "norm."))}
            model_args.update(depth=depth - 1, final_norm=False, global_pool="avg", fc_norm=False)
        else:  # the final norm on every token, then the pooling (no fc_norm: none was trained)
            model_args.update(global_pool=pool, fc_norm=False)
        model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
        ignored = load_vit_weights(model, state, source=str(source))
    if ignored:
        log.info("export: set aside %d keys that are not part of the encoder (%s)",
                 len(ignored), ", ".join(ignored[:5]))
    model.eval()
    size = model.patch_embed.img_size[0]
    preprocessing = data_config(run_cfg, size, kind)
    # the run's own pretrained_cfg, not the base timm model's (its tag, source and preprocessing)
    model.pretrained_cfg = {"architecture": arch, "tag": None, **preprocessing, "num_classes": model.num_classes,
                            "first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": True,
                            "license": licence(run_cfg)}
    return model, {"architecture": arch, "model_args": model_args, "run_config": run_cfg, "task": kind,
                   "source": str(source), "features": features, "classifier": classifier, "pool": pool,
                   "data_config": preprocessing, "title": vit_title(model)}


def vit_title(model: torch.nn.Module) -> str:
    """What the model is, from the model itself (a custom size rides on a timm name that is not it)."""
    return (f"ViT, {len(model.blocks)} blocks {model.embed_dim} wide, {model.blocks[0].attn.num_heads} heads, "
            f"patch {model.patch_embed.patch_size[0]}, {model.patch_embed.img_size[0]}px")


def load_vit(spec: str | Path, model_name: str | None = None, features: str = "final") -> torch.nn.Module:
    """A timm VisionTransformer with trained weights, in eval mode: a tinymim run directory (its
    architecture from its config), a shipped teacher (`builtin:NAME`), or a weights file with its timm
    architecture (`model_name`). A fine-tuning run gives its classifier, anything else its encoder."""
    return build_exportable(spec, model_name, features)[0]


def licence(run_cfg: dict) -> str:
    """cc-by-nc-4.0 when the weights descend from MAE's released (non-commercial) weights, else apache-2.0."""
    teacher = (run_cfg.get("teacher") or {}) if isinstance(run_cfg, dict) else {}
    lineage = " ".join(str(x) for x in (teacher.get("checkpoint"), (teacher.get("model") or {}).get("name"),
                                         run_cfg.get("init") if isinstance(run_cfg, dict) else None) if x)
    return "cc-by-nc-4.0" if any(m in lineage.lower() for m in _NON_COMMERCIAL_MARKS) else "apache-2.0"
