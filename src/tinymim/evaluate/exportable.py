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
from tinymim.models.features import FEATURES, POOLS, default_features, final_path_caveats
from tinymim.models.vit import ModelConfig, create_vit, size_args, timm_architecture
from tinymim.tasks import TASKS, load_trained

log = logging.getLogger("tinymim")

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


def _folded_probe(state: dict, eps: float) -> dict:
    """A linear probe's state (backbone.*, head.0 = BatchNorm1d without affine, head.1 = Linear) as one
    classifier: the BatchNorm's running statistics folded into the linear head, W' = W / s and
    b' = b - W' mean with s = sqrt(var + eps) (float64, then float32): the same logits in eval mode."""
    mean, var = state["head.0.running_mean"].double(), state["head.0.running_var"].double()
    weight, bias = state["head.1.weight"].double(), state["head.1.bias"].double()
    folded = weight / (var + eps).sqrt()
    head = {"head.weight": folded.float(), "head.bias": (bias - folded @ mean).float()}
    return {**{k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, **head}


def build_exportable(source: str | Path, model_name: str | None = None, features: str = "auto",
                     pool: str = "avg") -> tuple[torch.nn.Module, dict]:
    """A timm-created VisionTransformer holding the weights of a run directory or checkpoint file: the
    classifier of a fine-tuning run or a linear probe (its BatchNorm folded into its head), else a
    feature extractor (tinymim.models.features): its patch tokens' mean (pool="avg") or class token
    ("token"), after the final norm (features="final") or entering the last block ("relation-input");
    "auto": the latter for a distilled student whose last block distillation did not wholly train.
    info["note"]: one line on which parts a distilled student's features leave out or pass through."""
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
    if exports == "segmenter":
        raise TinymimError(f"{source} is a segmentation run: its segmenter.safetensors loads with "
                           "tinymim.tasks.segment.build_segment_task; timm has no UperNet to export it to")
    classifier = exports in ("classifier", "probe")
    if classifier and features not in ("auto", "final"):
        raise TinymimError(f"{source} is a {'linear probe' if exports == 'probe' else 'fine-tuned classifier'}: "
                           "--features applies to pre-trained encoders (its features are its pre-logits)")
    # a run's weights through its own model (load_trained: the one reader of run directories), a file as it is
    trained = load_trained(source) if run_dir else None
    state = trained.model.state_dict() if trained is not None else load_weights(source)
    caveats = final_path_caveats(trained.config) if kind == "distill" else []
    if features == "auto":
        features = default_features(kind, trained.config) if trained is not None else "final"
    if classifier:
        features = "final"
    # default head counts everywhere (the relation block's only changed how Q/K/V were split)
    model_cfg = replace(model_cfg, block_heads={}, drop_path_rate=0.0, pretrained=False)
    arch, model_args = timm_architecture(model_cfg), size_args(model_cfg)
    if model_args.get("img_size") is None and (run_cfg.get("data") or {}).get("img_size"):
        model_args["img_size"] = run_cfg["data"]["img_size"]
    if exports == "probe":
        state = _folded_probe(state, trained.model.head[0].eps)
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
            model_args.update(depth=depth - 1, final_norm=False)
        # the final norm on every token (if kept), then the pooling (no fc_norm: none was trained)
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
    info = {"architecture": arch, "model_args": model_args, "run_config": run_cfg, "task": kind,
            "source": str(source), "features": features, "classifier": classifier, "probe": exports == "probe",
            "pool": pool, "data_config": preprocessing, "title": vit_title(model), "untrained": caveats,
            "dist_token": bool(model_cfg.dist_token)}
    info["note"] = feature_note(info)
    return model, info


def feature_note(info: dict) -> str | None:
    """One line on a distilled student's features: which parts its export leaves out (relation-input)
    or passes through untrained (final), and the --features choice that does the other."""
    caveats = info.get("untrained") or []
    if info["classifier"] or not caveats:
        return None
    parts = ", ".join(caveats[:-1]) + (" and " if len(caveats) > 1 else "") + caveats[-1]
    if info["features"] == "relation-input":
        return (f"features: the tokens entering the last block, which distillation trained; left out, as never "
                f"trained: {parts} (--features final keeps the whole student, e.g. to fine-tune it elsewhere)")
    return (f"features: these pass through {parts}, which distillation never trained (--features relation-input "
            "stops before them, at the tokens it did train)")


def plain_timm_snippet(info: dict, weights: str) -> str | None:
    """Python that builds the same model as the export with plain timm and loads it from the run's own
    weights file `weights` (as written there: the whole model), or None where plain timm cannot (a
    distillation token): the snippet the model card shows and the tests run."""
    if info.get("dist_token"):
        return None
    args = dict(info["model_args"])
    relation_input = not info["classifier"] and info["features"] == "relation-input"
    if relation_input:  # the whole student is in the file: build it whole, then stop before its last block
        args["depth"] += 1
        args.pop("final_norm", None)
    classes = int(info["run_config"]["num_classes"]) if info["classifier"] else 0
    call = ", ".join([repr(info["architecture"]), f"num_classes={classes}",
                      *(f"{k}={v!r}" for k, v in args.items())])
    lines = ["import timm, torch", "from safetensors.torch import load_file",
             f"model = timm.create_model({call})"]
    if info["probe"]:  # the probe's BatchNorm (no affine, eps 1e-6) folded into its head, as the export does
        lines += [f"state = load_file({weights!r})",
                  "scale = (state['head.0.running_var'].double() + 1e-6).rsqrt()",
                  "weight = state['head.1.weight'].double() * scale",
                  "bias = state['head.1.bias'].double() - weight @ state['head.0.running_mean'].double()",
                  "model.load_state_dict({**{k[len('backbone.'):]: v for k, v in state.items() if "
                  "k.startswith('backbone.')}, 'head.weight': weight.float(), 'head.bias': bias.float()})"]
    else:
        lines.append(f"model.load_state_dict(load_file({weights!r}))")
    if relation_input:
        lines.append("model.blocks, model.norm = model.blocks[:-1], torch.nn.Identity()  # the tokens entering "
                     "the last block")
    return "\n".join([*lines, "model.eval()"])


def vit_title(model: torch.nn.Module) -> str:
    """What the model is, from the model itself (a custom size rides on a timm name that is not it)."""
    blocks = len(model.blocks)
    return (f"ViT, {blocks} block{'s' if blocks != 1 else ''} {model.embed_dim} wide, "
            f"{model.blocks[0].attn.num_heads} heads, patch {model.patch_embed.patch_size[0]}, "
            f"{model.patch_embed.img_size[0]}px")


def load_vit(spec: str | Path, model_name: str | None = None, features: str = "auto",
             pool: str = "avg") -> torch.nn.Module:
    """A timm VisionTransformer with trained weights, in eval mode: a tinymim run directory (its
    architecture from its config), a shipped teacher (`builtin:NAME`), or a weights file with its timm
    architecture (`model_name`). A fine-tuning run or a linear probe gives its classifier, anything
    else its encoder, whose model(x) are the features `tinymim export` and `tinymim knn` give for the
    same `features` and `pool` (build_exportable; by default those of load_trained(spec).model).

    With plain timm: timm.create_model("local-dir:FOLDER", pretrained=True) of the folder `tinymim
    export` writes; or from the run's own weights file (RUN/student.safetensors of a distill run,
    RUN/model.safetensors of an MAE run), as the export's model card shows (plain_timm_snippet):

        model = timm.create_model(ARCH, num_classes=0, global_pool="avg", fc_norm=False, **SIZES)
        model.load_state_dict(safetensors.torch.load_file(WEIGHTS))
        # features="relation-input": stop before the last block, without the final norm
        model.blocks, model.norm = model.blocks[:-1], torch.nn.Identity()"""
    model, info = build_exportable(spec, model_name, features, pool)
    if info["note"]:
        log.info("%s", info["note"])
    return model


def licence(run_cfg: dict) -> str:
    """cc-by-nc-4.0 when the weights descend from MAE's released (non-commercial) weights, else apache-2.0."""
    teacher = (run_cfg.get("teacher") or {}) if isinstance(run_cfg, dict) else {}
    lineage = " ".join(str(x) for x in (teacher.get("checkpoint"), (teacher.get("model") or {}).get("name"),
                                         run_cfg.get("init") if isinstance(run_cfg, dict) else None) if x)
    return "cc-by-nc-4.0" if any(m in lineage.lower() for m in _NON_COMMERCIAL_MARKS) else "apache-2.0"
