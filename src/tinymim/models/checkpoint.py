"""Weights in and out: any layout (MAE, DeiT, TinyMIM*-T, timm, tinymim runs) into a timm ViT, and
safetensors files written atomically (through tinymim.core.files).

Pickled checkpoints are only ever read with `torch.load(weights_only=True)`: a file that would run
code while unpickling is refused. safetensors files are preferred for weights.
"""
from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from timm.layers import resample_abs_pos_embed

from tinymim.core.files import CheckpointError, atomic_write, safe_torch_load  # noqa: F401 - re-exported
from tinymim.core.hub import HUB_NAME_PREFIXES, hub_or_cache, offline_message, unfetchable
from tinymim.core.rundir import RunDir

log = logging.getLogger("tinymim")


# checkpoint containers used by MAE, DeiT, timm and others
_CONTAINER_KEYS = ("model", "state_dict", "model_state", "module", "student")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .safetensors/.pt/.pth file or a tinymim run directory."""
    path = Path(path)
    if path.is_dir():
        weights = RunDir(path).weights()
        if weights is not None:
            return load_state_dict(weights)
        raise CheckpointError(f"{path} is a directory without final weights (*.safetensors); "
                              "is it a tinymim run, and is the run finished?")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({e})") from e
    obj = safe_torch_load(path)
    for key in _CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        kind = type(obj).__name__ if not isinstance(obj, dict) else f"dict with keys {list(obj)[:6]}"
        raise CheckpointError(
            f"{path} is not a state dict (a mapping of parameter names to tensors), it holds a {kind}; "
            f"pass a model checkpoint, e.g. MAE's mae_pretrain_vit_base.pth or a .safetensors file")
    # strip DDP / compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


# teachers shipped with the package (tinymim/teachers/NAME: a run directory), named `builtin:NAME`
BUILTIN_PREFIX = "builtin:"
BUILTIN_TEACHERS = Path(__file__).resolve().parents[1] / "teachers"  # tinymim/teachers


def builtin_teacher(spec: str) -> Path:
    """The run directory of a shipped teacher, `builtin:NAME`."""
    name = spec[len(BUILTIN_PREFIX):]
    path = BUILTIN_TEACHERS / name
    if not name or "/" in name or not path.is_dir():
        known = sorted(p.name for p in BUILTIN_TEACHERS.iterdir() if p.is_dir()) if BUILTIN_TEACHERS.is_dir() else []
        raise CheckpointError(f"no built-in teacher {spec!r}; shipped: {', '.join(BUILTIN_PREFIX + k for k in known)}")
    return path


def is_timm_weights(spec) -> bool:
    """Whether a checkpoint spec names weights timm fetches (`hf-hub:org/repo`, `vit_base_patch16_224.mae`)
    rather than a file, a run directory or a built-in teacher."""
    if not spec or str(spec).startswith(BUILTIN_PREFIX) or Path(str(spec)).exists():
        return False
    name = str(spec)
    return name.startswith(("hf-hub:", "hf_hub:")) or (timm.is_model(name.split(".")[0]) and not looks_like_path(name))


WEIGHTS_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")


def looks_like_path(spec) -> bool:
    """Whether a checkpoint or teacher spec is written as a path (a separator, a leading . or ~, a weights
    suffix), not as a timm/hub name: one that does not exist is a missing file, never a name to fetch."""
    name = str(spec)
    if name.startswith((BUILTIN_PREFIX, *HUB_NAME_PREFIXES)):
        return False
    return "/" in name or "\\" in name or name.startswith((".", "~")) or name.lower().endswith(WEIGHTS_SUFFIXES)


def missing_path(spec, what: str = "teacher") -> str:
    """The one line for a spec that looks like a path (looks_like_path) and names nothing on disk."""
    tilde = " (~ is not expanded here: give the full path)" if str(spec).startswith("~") else ""
    return (f"{what} {spec} does not exist{tilde}: give a run folder, a weights file, builtin:NAME or a timm name")


def _refuse_unfetchable(name: str) -> None:
    """A timm/hub name whose hub repository cannot be had here, refused before timm builds the model it
    would load them into (a ViT-B's random initialization alone takes seconds)."""
    if name.startswith(HUB_NAME_PREFIXES):
        repo = name.split(":", 1)[1]
    else:
        try:
            cfg = timm.get_pretrained_cfg(name)
        except RuntimeError:  # an unknown tag: timm's own error, below, names it
            cfg = None
        repo = getattr(cfg, "hf_hub_id", None)  # None: weights from a URL (torch's hub cache), not checked here
    reason = unfetchable(f"hf-hub:{repo}") if repo else None
    if reason is not None:
        raise CheckpointError(offline_message(name, OSError(reason)))


def load_weights(spec: str | Path) -> dict[str, torch.Tensor]:
    """Weights from whatever `spec` names: a .safetensors/.pth/.pt file (MAE, TinyMIM, timm or our
    layouts), a tinymim run directory, a teacher shipped with tinymim (`builtin:NAME`), or a timm
    name with pretrained weights (`vit_base_patch16_224.mae`, `hf-hub:org/repo`), which needs the
    network or the hub cache."""
    if str(spec).startswith(BUILTIN_PREFIX):
        return load_state_dict(builtin_teacher(str(spec)))
    path = Path(spec)
    if path.exists():
        return load_state_dict(path)
    name = str(spec)
    if is_timm_weights(name):
        _refuse_unfetchable(name)
        try:
            with hub_or_cache():
                return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
        except OSError as e:  # offline, no cache: huggingface_hub's errors are OSErrors
            raise CheckpointError(offline_message(name, e)) from e
        except Exception as e:  # noqa: BLE001 - an unknown tag, a repo that is not a timm model ...
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise CheckpointError(f"could not fetch timm weights {name!r} ({type(e).__name__}: {first}); check the "
                                  "name (timm.list_pretrained()), or give the weights as a file") from e
    raise CheckpointError(missing_path(spec, "checkpoint") if looks_like_path(spec) else
                          f"checkpoint {spec} does not exist (neither a file, a run directory nor a timm model name)")


def save_weights(state: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """A safetensors file, written atomically (see tinymim.core.files)."""
    data = save({k: v.detach().contiguous().cpu() for k, v in state.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda f: f.write(data))


# keys of MAE pre-training checkpoints that belong to the decoder, never to the encoder
_MAE_DECODER_PREFIXES = ("decoder_", "mask_token")
# classifier-side modules of fine-tuned / TinyMIM*-T checkpoints: not part of a plain encoder
_CLASSIFIER_MODULES = ("head", "head_dist", "fc_norm", "fc", "pre_logits", "conv1x1")
# what a tinymim.models.star.DistilledViT adds to a plain ViT: may start fresh when loading a plain checkpoint
_DISTILLED_EXTRAS = ("conv1x1.", "fc_norm.", "head.", "head_dist.")


def _timm_layer_scale_name(key: str) -> str:
    """BEiT / the release's layer scale `blocks.i.gamma_1` / `gamma_2` -> timm's `blocks.i.ls1.gamma` / `ls2.gamma`."""
    for old, new in ((".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")):
        if key.startswith("blocks.") and key.endswith(old):
            return key[: -len(old)] + new
    return key


def load_vit_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint",
                     ignore_prefixes: tuple[str, ...] = _MAE_DECODER_PREFIXES,
                     fresh: tuple[str, ...] = (), antialias: bool = True) -> list[str]:
    """Load a ViT state dict into a timm VisionTransformer; returns the keys set aside.

    Understands the official MAE layouts (pre-training: decoder keys and mask_token set aside;
    fine-tuned: head/fc_norm set aside, and a final `norm` the global-pool checkpoint lacks stays at
    its init) and released TinyMIM*-T checkpoints: into a plain ViT, the distillation token and its
    position, head_dist/fc_norm/conv1x1 set aside; into a tinymim.models.star.DistilledViT, every key loaded.
    A plain checkpoint (one class token) into a DistilledViT: the distillation token and its position
    start as copies of the class token's, and conv1x1/fc_norm/head/head_dist keep their init. A
    classifier head (head, head_dist) for another class count is set aside and keeps its init; a final
    `norm` the model does not have (global pooling, conv1x1) is set aside. Every key set aside is
    returned, every parameter left at its init is logged. Position embeddings are resized (bicubic,
    prefix tokens kept apart) when the patch grid differs: antialiased as timm resizes them, or, with
    `antialias=False`, plain bicubic as the MAE / BEiT / TinyMIM segmentation code does (segmentation's
    init; the two differ by up to 5e-2 on a sin-cos table enlarged 14 -> 32). Model keys containing one of `fresh`
    (parameters a task adds, such as segmentation's relative position bias tables) may be missing:
    they keep their init and are reported as newly initialised; BEiT-style layer scale names
    (gamma_1/gamma_2) are read as timm's. Any other mismatch (a missing encoder key, a key of another
    architecture, a shape mismatch) is an error: no silent partial loads.
    """
    state = {_timm_layer_scale_name(k): v for k, v in state.items()}
    own = model.state_dict()
    set_aside = sorted(k for k in state if k.startswith(ignore_prefixes))
    pe, fresh_extras = state.get("pos_embed"), []
    if "dist_token" in state and "dist_token" not in own:  # TinyMIM*-T / DeiT: [cls, dist, patches]
        set_aside.append("dist_token")
        if pe is not None and pe.shape[1] == model.patch_embed.num_patches + 2:
            state["pos_embed"] = torch.cat([pe[:, :1], pe[:, 2:]], dim=1)
    elif "dist_token" in own and "dist_token" not in state and "cls_token" in state:  # plain -> DistilledViT
        state["dist_token"] = state["cls_token"].clone()
        if pe is not None and ((pe.shape[1] - 1) ** 0.5).is_integer():  # one class-token row: copy it
            state["pos_embed"] = torch.cat([pe[:, :1], pe[:, :1], pe[:, 1:]], dim=1)
        fresh_extras.append("dist_token and its position (copies of the class token's)")
    set_aside += sorted(k for k in state if k not in own and k.split(".")[0] in _CLASSIFIER_MODULES
                        and k not in set_aside)
    if "norm.weight" not in own:  # the model has no final per-token norm (global pooling, conv1x1)
        set_aside += sorted(k for k in state if k.startswith("norm.") and k not in set_aside)
    other_classes = sorted(k for k in state if k.split(".")[0] in ("head", "head_dist") and k in own
                           and state[k].shape[1:] == own[k].shape[1:] and state[k].shape != own[k].shape)
    if other_classes:
        log.info("%s: its classifier is for %d classes, the model's for %d: %s set aside, kept at their init",
                 source, state[other_classes[0]].shape[0], own[other_classes[0]].shape[0], ", ".join(other_classes))
        set_aside += other_classes
    state = {k: v for k, v in state.items() if k not in set_aside}
    pe = state.get("pos_embed")
    if (pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape
            and pe.shape[-1] == own["pos_embed"].shape[-1]):
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(model.patch_embed.grid_size),
                                                    num_prefix_tokens=prefix, antialias=antialias)
    missing = sorted(set(own) - set(state))
    new = [k for k in missing if any(f in k for f in fresh)]
    if "dist_token" in own:  # a DistilledViT's additions to a plain ViT
        new += [k for k in missing if k.startswith(_DISTILLED_EXTRAS) and k not in new]
    missing = [k for k in missing if k not in new]
    kept = []
    if any(k.startswith("fc_norm.") for k in set_aside):  # global-pool fine-tuned: no final per-token norm
        kept = [k for k in missing if k.startswith("norm.")]
        missing = [k for k in missing if k not in kept]
    unexpected = sorted(set(state) - set(own))
    bad_shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        lines = [f"{source} does not fit the model ({type(model).__name__}, "
                 f"width {own['cls_token'].shape[-1] if 'cls_token' in own else '?'}, {len(model.blocks)} blocks):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): "
                         f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        if bad_shape:
            lines.append("  shape mismatches: " + "; ".join(bad_shape[:4]))
        lines.append("  check that the model config (name/sizes) matches the architecture "
                     "the checkpoint was trained with")
        raise CheckpointError("\n".join(lines))
    if kept:
        log.info("%s has no final norm (global-pool fine-tuned layout); model.norm keeps its init", source)
    if new or fresh_extras:
        in_blocks = [k for k in new if k.startswith("blocks.")]
        parts = fresh_extras + sorted({k.split(".")[0] for k in new if k not in in_blocks})
        if in_blocks:
            kinds = sorted({k.split(".", 2)[-1] for k in in_blocks})
            parts.append(f"{', '.join(kinds)} in {len(in_blocks)} places")
        log.info("%s: newly initialised (not in the weights): %s", source, ", ".join(parts))
    model.load_state_dict(state, strict=False)
    return set_aside
