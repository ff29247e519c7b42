"""Take a trained model elsewhere: a timm / Hugging Face hub folder, or ONNX.

`tinymim export RUN_DIR_OR_CHECKPOINT --format timm|onnx --output PATH`

- timm: PATH/config.json (architecture + model_args) + PATH/model.safetensors + PATH/README.md
  (a model card), written by timm's own `save_for_hf`, so `timm.create_model("local-dir:PATH",
  pretrained=True)` rebuilds the model and the folder can be pushed to the hub as it is. The
  relation block's head count goes back to the model's default: qkv weights do not depend on it.
- onnx: the feature extractor (pooled features) through torch.onnx, checked against onnxruntime.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import timm
import torch
import yaml

from tinymim.checkpoint import CheckpointError, load_vit_weights, load_weights
from tinymim.errors import TinymimError
from tinymim.models import ModelConfig, size_args, timm_architecture

log = logging.getLogger("tinymim")

def _run_info(path: Path) -> tuple[ModelConfig, dict, str]:
    """(the model the run produced, its config, its kind) of a tinymim run directory."""
    from tinymim.rundir import RunDir

    cfg = RunDir(path).stored_config() or {}
    for section in RunDir.MODEL_SECTIONS:
        if isinstance(cfg.get(section), dict):
            known = {k: v for k, v in cfg[section].items() if k in ModelConfig.__dataclass_fields__}
            kind = "distill" if section == "student" else "mae" if "decoder" in cfg else "finetune"
            return ModelConfig(**known), cfg, kind
    raise CheckpointError(f"{path}/config.yaml describes no model (no 'student' or 'model' section)")


def build_exportable(source: str | Path, model_name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """A timm-created VisionTransformer holding the weights of a run directory or checkpoint file."""
    source = Path(source)
    if source.is_dir() and (source / "config.yaml").is_file():
        model_cfg, run_cfg, task = _run_info(source)
    elif source.exists():
        if not model_name:
            raise TinymimError(f"{source} is a bare checkpoint: say which architecture it holds with --model "
                               "(a timm name such as vit_small_patch16_224)")
        model_cfg, run_cfg, task = ModelConfig(name=model_name), {}, "checkpoint"
    else:
        raise CheckpointError(f"{source} does not exist")
    # default head counts everywhere (the relation block's only changed how Q/K/V were split)
    model_cfg = replace(model_cfg, block_heads={}, drop_path_rate=0.0, pretrained=False)
    arch, model_args = timm_architecture(model_cfg), size_args(model_cfg)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **model_args)
    ignored = load_vit_weights(model, load_weights(source), source=str(source))
    if ignored:
        log.info("export: set aside %d keys that are not part of the encoder (%s)", len(ignored), ", ".join(ignored[:5]))
    model.eval()
    return model, {"architecture": arch, "model_args": model_args, "run_config": run_cfg, "task": task,
                   "source": str(source)}


def model_card(info: dict) -> str:
    cfg = info["run_config"]
    teacher = (cfg.get("teacher") or {}) if isinstance(cfg, dict) else {}
    data = (cfg.get("data") or {}) if isinstance(cfg, dict) else {}
    lines = [
        "---", "library_name: timm", "license: apache-2.0", "tags: [image-feature-extraction, timm, tinymim]", "---",
        f"# {info['architecture']} pre-trained with tinymim ({info['task']})", "",
        "A plain timm VisionTransformer without a classifier head (`num_classes=0`).", "",
        "```python", "import timm",
        "model = timm.create_model('local-dir:PATH', pretrained=True)  # or hf-hub:USER/REPO once pushed",
        "```", "",
        "| | |", "|---|---|",
        f"| architecture | {info['architecture']} {json.dumps(info['model_args'])} |",
        f"| task | {info['task']} |",
    ]
    if teacher:
        t = teacher.get("model") or {}
        lines.append(f"| teacher | {t.get('name')} from {teacher.get('checkpoint') or 'random init'}, "
                     f"block {teacher.get('target_block')} |")
        lines.append(f"| relations | {', '.join((cfg.get('loss') or {}).get('relations', []))} |")
    if data:
        lines.append(f"| data | {data.get('name')} {data.get('root') or ''} at {data.get('img_size')}px |")
    train = cfg.get("train") or {} if isinstance(cfg, dict) else {}
    if train:
        lines.append(f"| schedule | {train.get('epochs')} epochs, batch {train.get('batch_size')}, blr {train.get('blr')} |")
    lines += ["", "## Results", "", "No downstream results recorded with this export.", "", "## Licence", "",
              "Apache-2.0 for the code that produced it."]
    ckpt = str(teacher.get("checkpoint") or "") + str((teacher.get("model") or {}).get("name") or "")
    if "mae" in ckpt.lower():
        lines.append("The teacher's MAE weights are released under CC-BY-NC-4.0; weights distilled from them may "
                     "carry that licence's non-commercial terms.")
    return "\n".join(lines) + "\n"


def export_timm(source, output, model_name: str | None = None) -> Path:
    from timm.models import save_for_hf

    model, info = build_exportable(source, model_name)
    out = Path(output)
    save_for_hf(model, str(out), model_args=info["model_args"], safe_serialization=True)
    (out / "README.md").write_text(model_card(info))
    return out


def export_onnx(source, output, model_name: str | None = None, atol: float = 1e-4) -> float:
    """Write an ONNX feature extractor and return its max abs difference to PyTorch (checked)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise TinymimError("ONNX export needs onnx and onnxruntime: pip install 'tinymim[onnx]'") from e
    model, info = build_exportable(source, model_name)
    size = model.patch_embed.img_size
    example = torch.randn(2, 3, *size)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (example,), str(out), input_names=["image"], output_names=["features"],
                      dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}}, opset_version=17, dynamo=False)
    check = torch.randn(3, 3, *size)
    with torch.no_grad():
        expected = model(check).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": check.numpy()})[0]
    diff = float(abs(got - expected).max())
    if diff > atol:
        raise TinymimError(f"ONNX model differs from PyTorch by {diff:.2e} (> {atol}); {out} is not trustworthy")
    return diff
