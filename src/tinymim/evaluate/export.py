"""Take a trained model elsewhere: a timm / Hugging Face hub folder, or ONNX.

`tinymim export RUN_DIR_OR_CHECKPOINT --format timm|onnx --output PATH [--features auto|final|relation-input]
[--pool avg|token] [--overwrite]`

PATH must be a new or empty folder (timm) or a new file (onnx) unless --overwrite; a run folder never.
The files get the umask's mode, as a run directory's do, and move in together: all are written and synced
in a staging folder beside PATH, then renamed into place at once (`_write_files`), so a full disk or a kill
leaves the earlier export whole, or no PATH; a second export into PATH waits for the first's lock.

- timm: PATH/config.json (architecture, model_args, pretrained_cfg) + PATH/model.safetensors +
  PATH/README.md (a model card, with no local paths: a run or data folder appears by its name), written
  by timm's own `save_for_hf`, so `timm.create_model("local-dir:PATH", pretrained=True)` rebuilds the
  model (its pooling in model_args) and `timm.data.resolve_data_config` gives the run's own
  preprocessing: its mean/std, input size, crop and interpolation (no tag or source of the base timm
  model). The relation block's head count goes back to the model's default: qkv weights do not
  depend on it.
- A fine-tuning run exports as the classifier it is: head, pooling and fc_norm included, the same
  logits; a linear probe as one too, its BatchNorm folded into its head. Class names go into
  config.json's label_names. A classifier with a distillation token (model.dist_token,
  tinymim.models.star.DistilledViT) exports to ONNX only: timm cannot rebuild it from a hub folder.
- A pre-training run exports as a feature extractor (`num_classes=0`) whose output is what
  `tinymim.load_trained(RUN).model`, `tinymim.load_vit` and `tinymim knn` give for the same choices
  (tinymim.models.features). By default (`--features auto`) a distilled student whose last block
  distillation did not wholly train (relation targets train only its Q/K/V; only the auxiliary MAE
  decoder trains the final norm) stops before that block: the tokens it did train, which its k-NN
  monitor read; one printed line names what was left out, the model card too. `--features final`
  keeps the whole student.
- onnx: the same model through torch.onnx, checked against onnxruntime.

The model these write (`build_exportable`): evaluate/exportable.py.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import warnings
from pathlib import Path

import torch
from timm.models import save_for_hf

from tinymim.core.errors import TinymimError
from tinymim.core.files import DiskFullError, RunDirError, _free_bytes, write_error, write_text
from tinymim.core.rundir import RunDir
from tinymim.evaluate.exportable import build_exportable, licence, plain_timm_snippet

log = logging.getLogger("tinymim")


def check_output(source, output, fmt: str = "timm", overwrite: bool = False) -> Path:
    """Refuse an --output whose files an export would replace unasked (or ever: a run's own), before
    anything is built or written."""
    out = Path(output)
    if out.exists() and out.resolve() == Path(source).resolve():
        raise TinymimError(f"--output {out} is the source itself; choose another --output")
    if out.is_dir():
        run = RunDir(out)
        if any(p.exists() for p in (run.config, run.checkpoint, run.info_file, out / RunDir.RECORD)):
            raise TinymimError(f"--output {out} is a tinymim run folder: an export there would replace its files; "
                               "choose another --output")
    if fmt == "onnx":
        if out.is_dir():
            raise TinymimError(f"--output {out} is a folder: --format onnx writes one file; give a file name, "
                               f"e.g. {out / 'model.onnx'}")
        if out.exists() and not overwrite:
            raise TinymimError(f"--output {out} already exists; choose a new file name, or pass --overwrite to "
                               "replace it")
        return out
    if out.exists() and not out.is_dir():
        raise TinymimError(f"--output {out} is a file: --format timm writes a folder; choose a new or empty folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise TinymimError(f"--output {out} is not empty (it holds {', '.join(held[:4])}"
                           f"{' ...' if len(held) > 4 else ''}); choose a new or empty folder, or pass --overwrite "
                           "to replace the files an export writes there")
    return out


# ---------------------------------------------------------------------------------------------
# moving an export in: every file at once, or none


def _export_error(e: BaseException, out: Path, existed: bool) -> TinymimError | None:
    """The one line for a write of the export that failed (a full disk, a folder that cannot be written;
    safetensors reports a full disk as a SafetensorError naming os error 28), or None for another failure."""
    kept = (f"the earlier export in {out} is as it was" if existed else f"nothing was written to {out}")
    for err in (e, e.__cause__, e.__context__):
        if err is None:
            continue
        if isinstance(err, OSError):
            code = err.errno
        elif "No space left on device" in str(err) or "os error 28" in str(err) or "os error 122" in str(err):
            code = errno.ENOSPC
        else:
            continue
        if code in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(out)
            return DiskFullError(
                f"no space left on the device holding {out}"
                f"{f' ({free / 2**20:.0f} MiB free)' if free is not None else ''} while writing the export; "
                f"{kept}: free some space (or choose an --output on another device) and run the same command again")
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = "the file system is read-only" if code == errno.EROFS else "permission denied"
            return RunDirError(f"cannot write the export beside {out} ({why}); {kept}: choose an --output "
                               "folder you can write to")
        if isinstance(err, OSError):
            return RunDirError(f"cannot write the export to {out} ({err.strerror or err}); {kept}")
    if type(e).__name__ == "SafetensorError":  # another I/O failure of the weights file
        return RunDirError(f"cannot write the export's model.safetensors for {out} ({e}); {kept}")
    return None


def _export_name(out: Path, name: str) -> re.Match | None:
    """A staging folder (`OUT.tmp-PID-HEX`) or an earlier export moved aside (`OUT.old-PID-HEX`) of `out`."""
    return re.fullmatch(re.escape(out.name) + r"\.(tmp|old)-(\d+)-[0-9a-f]{8}", name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _recover(out: Path) -> None:
    """Tidy what an export killed part way left beside `out` (only ever called under `_lock(out)`).

    An export writes everything into `OUT.tmp-PID-HEX` beside `out`; replacing an earlier export, it
    renames `out` to `OUT.old-PID-HEX`, renames the staging folder to `out`, then removes the old one.
    A process killed between those two renames leaves no `out` and an `.old-` folder: this renames it
    back, so the earlier export is whole again. An `.old-` folder beside an `out` that exists is the
    earlier export after the new one moved in: removed. A staging folder whose process is gone is
    removed (one whose process still runs is that export's, writing)."""
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return
    found = [(m.group(1), int(m.group(2)), p) for p in entries if (m := _export_name(out, p.name))]
    aside = [p for kind, _, p in found if kind == "old"]
    if aside and not os.path.lexists(out):
        keep = max(aside, key=lambda p: p.stat().st_ctime_ns)
        os.rename(keep, out)
        log.info("restored the earlier export in %s (an export replacing it was stopped part way)", out)
        aside.remove(keep)
    for p in aside:
        _remove(p)
    for kind, pid, p in found:
        if kind == "tmp" and not _alive(pid):
            _remove(p)


@contextlib.contextmanager
def _lock(out: Path):
    """An exclusive lock on exporting into `out` (flock on `.OUT.lock` beside it, removed afterwards):
    a second export into the same place waits until the first has moved its files in, then checks
    `out` afresh, so two exports never both write into it and the result is always one export's set."""
    path = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _export_error(e, out, out.exists()) or write_error(e, path) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
                log.info("waiting for the export into %s by process %s to finish", out, holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                log.warning("%s does not support file locks: nothing stops two exports into %s at once",
                            out.parent, out)
            # the holder before us removes the file when done: a lock on a removed file is no lock
            same = os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        with contextlib.suppress(OSError):  # the holder's pid, for the message of one that waits
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _carry_over(old: Path, staging: Path) -> None:
    """What `old` holds that an export does not write (a hub clone's .git, a user's notes) into the
    staging folder too, as hard links (no space needed): --overwrite replaces an export's files only."""
    for entry in old.iterdir():
        dst = staging / entry.name
        if os.path.lexists(dst):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dst)
        elif entry.is_dir():
            shutil.copytree(entry, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(dst))


def _write_files(out: Path, write, folder: bool = True, check=None) -> None:
    """`_publish`, and a failed one leaves no folder it made for --output's parents either."""
    made, parent = [], out.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)  # deepest first
        parent = parent.parent
    try:
        _publish(out, write, folder, check)
    except BaseException:
        for folder_made in made:
            with contextlib.suppress(OSError):
                folder_made.rmdir()
        raise


def _publish(out: Path, write, folder: bool, check) -> None:
    """Publish an export whole or not at all. write(staging) fills a new folder beside `out` (same file
    system): with folder=True that folder becomes `out`, else it holds the one file `out`. Every file
    gets the umask's mode and is synced; then, under `_lock(out)` (with check() run again there: another
    export may have written `out` meanwhile), one rename moves the set in: a new `out` is the staging
    folder renamed; an earlier export is renamed aside, the staging folder renamed to `out`, the old one
    removed (a kill between the renames is undone by the next export: `_recover`). A failure anywhere (a
    full disk on any file, an ONNX model that differs from PyTorch, a signal) leaves `out` as it was and
    no staging folder; a full or read-only disk is one line saying so."""
    existed = os.path.lexists(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with _lock(out):
            _recover(out)
        staging = out.parent / f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as e:
        raise _export_error(e, out, existed) or write_error(e, out) from e
    try:
        try:
            write(staging)
            mode = _umask_mode()  # safetensors alone would make its file 0600
            for f in sorted(p for p in staging.rglob("*") if p.is_file()):
                os.chmod(f, mode)
                _sync(f)
            _sync(staging)
        except Exception as e:  # noqa: BLE001 - a full disk reaches here as OSError, SafetensorError or ours
            error = _export_error(e, out, existed)
            if error is None:
                raise
            raise error from e
        try:
            with _lock(out):
                _recover(out)
                existed = os.path.lexists(out)
                if check is not None:
                    check()
                if not folder:
                    os.replace(staging / out.name, out)
                elif existed:
                    _carry_over(out, staging)
                    with contextlib.suppress(OSError):
                        os.chmod(staging, out.stat().st_mode & 0o7777)
                    aside = out.parent / f"{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                    os.rename(out, aside)
                    try:
                        os.rename(staging, out)
                    except BaseException:  # an error or Ctrl-C between the renames: the earlier export back
                        if not os.path.lexists(out):
                            os.rename(aside, out)
                        raise
                    _remove(aside)
                else:
                    os.rename(staging, out)
                with contextlib.suppress(OSError):  # make the renames themselves durable
                    _sync(out.parent)
        except OSError as e:
            raise _export_error(e, out, existed) or write_error(e, out) from e
    finally:
        if staging.exists():
            _remove(staging)


def _what_features(info: dict) -> str:
    if info["classifier"]:
        pool = info["run_config"].get("global_pool", "avg")
        read = "mean of the patch tokens + fc_norm" if pool == "avg" else "the class token after the final norm"
        if info["probe"]:
            return (f"class logits ({info['run_config'].get('num_classes')} classes) of a linear probe: {read} "
                    "-> BatchNorm without affine (folded into the head) -> head; the backbone was frozen")
        return f"class logits ({info['run_config'].get('num_classes')} classes): {read} -> head"
    pooled = "the mean of the patch tokens" if info["pool"] == "avg" else "the class token"
    if info["features"] == "relation-input":
        return (f"{pooled} entering the last (relation) block, i.e. the output of the block before it, without "
                "a final norm (`num_classes=0`): the features relation distillation trained, which the k-NN "
                "monitor of the distill run read")
    return f"{pooled} after every block and the final norm (`num_classes=0`)"


def _features_row(info: dict) -> list[str]:
    """The model card's account of a distilled student's features: which choice was made and why."""
    if info["classifier"] or info["task"] != "distill":
        return []
    caveats = info.get("untrained") or []
    if not caveats:
        return ["| features | every part of the student was trained: the whole of it is exported |"]
    parts = "; ".join(caveats)
    if info["features"] == "relation-input":
        return [f"| features | the export stops before the last block: these were never trained ({parts}). "
                "`tinymim export RUN --features final` keeps the whole student (to fine-tune it elsewhere); "
                "`tinymim finetune init=RUN` fine-tunes it whole |"]
    return [f"| features | these were never trained, and the features pass through them: {parts}. Fine-tune "
            "before use, or export with `--features relation-input` |"]


def _first_blocks(info: dict) -> str:
    """A relation-input export holds all but the student's last block: the title says so."""
    if info["classifier"] or info["features"] != "relation-input":
        return ""
    kept = info["model_args"]["depth"]
    return f": the first {kept} of its {kept + 1} blocks"


def _public(value) -> str:
    """A file or folder a run was made from, as a model card may show it: its name, never the local path
    (a builtin:, hf-hub: or timm name as it is)."""
    text = str(value)
    if text.startswith(("builtin:", "hf-hub:", "hf_hub:")) or "/" not in text:
        return text
    return Path(text.rstrip("/")).name


def model_card(info: dict) -> str:
    cfg = info["run_config"] if isinstance(info["run_config"], dict) else {}
    teacher = cfg.get("teacher") or {}
    data = cfg.get("data") or {}
    train = cfg.get("train") or {}
    lic = licence(cfg)
    dc = info["data_config"]
    lines = [
        "---", "library_name: timm", f"license: {lic}",
        f"tags: [{'image-classification' if info['classifier'] else 'image-feature-extraction'}, timm, tinymim]",
        "---",
        f"# {info['title']}, {'fine-tuned' if info['classifier'] else 'pre-trained'} with tinymim "
        f"({info['task']}){_first_blocks(info)}", "",
        "```python", "import timm",
        "model = timm.create_model('local-dir:PATH', pretrained=True)  # or hf-hub:USER/REPO once pushed",
        "config = timm.data.resolve_data_config({}, model=model)  # the run's own preprocessing",
        "```", "",
        "| | |", "|---|---|",
        f"| architecture | {info['architecture']} {json.dumps(info['model_args'])} |",
        f"| task | {info['task']} |",
        f"| output | {_what_features(info)} |",
        *_features_row(info),
        f"| preprocessing | {dc['input_size'][1]}px, mean {list(dc['mean'])}, std {list(dc['std'])}, crop "
        f"{dc['crop_pct']}, {dc['interpolation']} |",
    ]
    if teacher:
        t = teacher.get("model") or {}
        arch = t.get("name") if t.get("name") != "vit_custom" else (
            f"ViT {t.get('embed_dim')} wide, {t.get('depth')} blocks, patch {t.get('patch_size')}")
        lines.append(f"| teacher | {arch} from {_public(teacher.get('checkpoint') or 'random init')}; block "
                     f"{teacher.get('target_block')}, {teacher.get('relation_heads') or 'its own'} relation heads |")
        losses = cfg.get("loss") or {}
        rel = losses.get("relation") or {}
        targets = []
        if rel.get("weight", 0) > 0:
            targets.append(f"relations {', '.join(rel.get('relations') or [])} (KL, "
                           f"{'softmax' if rel.get('softmax', True) else 'no softmax'}, weight {rel.get('weight')})")
        for name in ("class_token", "feature"):
            if (losses.get(name) or {}).get("weight", 0) > 0:
                targets.append(f"{name.replace('_', ' ')} (weight {losses[name]['weight']})")
        lines.append(f"| targets | {'; '.join(targets) or 'none recorded'} |")
    if cfg.get("init") is not None or info["classifier"]:
        lines.append(f"| initialized from | {_public(cfg.get('init') or 'random init')} |")
    if data:
        subset = f", a sample of {data['subset']} images" if data.get("subset") else ""
        root = f" {_public(data['root'])}" if data.get("root") else ""
        lines.append(f"| data | {data.get('name')}{root} at {data.get('img_size')}px{subset} |")
    if train:
        cap = f" (at most {train['max_steps']} steps)" if train.get("max_steps") else ""
        lines.append(f"| schedule | {train.get('epochs')} epochs{cap}, batch {train.get('batch_size')}, "
                     f"blr {train.get('blr')}, {train.get('precision')} |")
    if info.get("snippet"):
        lines += ["", "The same model with plain timm, from the run's own weights file:", "", "```python",
                  info["snippet"], "```"]
    lines += ["", "## Results", "", "No downstream results recorded with this export.", "", "## Licence", ""]
    if lic == "cc-by-nc-4.0":
        lines.append("CC-BY-NC-4.0: these weights descend from MAE's released weights, which carry that licence's "
                     "non-commercial terms. The tinymim code that produced them is Apache-2.0.")
    else:
        lines.append("Apache-2.0, as the tinymim code that produced them; check the licence of the training data "
                     "and of any teacher weights you supplied yourself.")
    return "\n".join(lines) + "\n"


def _with_snippet(source, info: dict) -> dict:
    """info plus the plain-timm snippet for the run's weights file, named by the run folder's name."""
    weights = RunDir(source).weights() if Path(source).is_dir() else None
    name = f"{Path(source).name}/{weights.name}" if weights is not None else Path(source).name
    return {**info, "snippet": plain_timm_snippet(info, name)}


def export_timm(source, output, model_name: str | None = None, features: str = "auto",
                overwrite: bool = False, pool: str = "avg") -> Path:
    """A timm / hub folder; a non-empty `output` is refused unless overwrite=True."""
    out = check_output(source, output, "timm", overwrite)
    model, info = build_exportable(source, model_name, features, pool)
    if info["note"]:
        log.info("%s", info["note"])
    info = _with_snippet(source, info)
    if hasattr(model, "dist_token"):
        raise TinymimError(f"{source} is a classifier with a distillation token "
                           "(tinymim.models.star.DistilledViT), which "
                           "timm cannot rebuild from a hub folder: export it with --format onnx, or load the run "
                           "with tinymim.load_vit")
    model_config = {}
    if info["classifier"]:
        classes = RunDir(source).read_classes() if Path(source).is_dir() else None
        if classes:
            model_config["label_names"] = classes

    def write(tmp: Path) -> None:
        save_for_hf(model, str(tmp), model_config=model_config, model_args=info["model_args"],
                    safe_serialization=True, data_config=dict(info["data_config"]))
        write_text(tmp / "README.md", model_card(info))

    _write_files(out, write, check=lambda: check_output(source, out, "timm", overwrite))
    return out


def export_onnx(source, output, model_name: str | None = None, atol: float = 1e-4, features: str = "auto",
                overwrite: bool = False, pool: str = "avg") -> float:
    """Write an ONNX feature extractor and return its max abs difference to PyTorch (checked before
    the file reaches `output`); an existing `output` is refused unless overwrite=True."""
    try:
        import onnxruntime as ort  # lazy: optional dependency (tinymim[onnx])
    except ImportError as e:
        raise TinymimError("ONNX export needs onnx and onnxruntime: pip install 'tinymim[onnx]'") from e
    out = check_output(source, output, "onnx", overwrite)
    model, info = build_exportable(source, model_name, features, pool)
    if info["note"]:
        log.info("%s", info["note"])
    size = model.patch_embed.img_size
    diffs = []

    def write(tmp: Path) -> None:
        path = tmp / out.name
        with warnings.catch_warnings():  # the tracer's notes on timm's shape checks: the check below is the proof
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (torch.randn(2, 3, *size),), str(path), input_names=["image"],
                              output_names=["features"], dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
                              opset_version=17, dynamo=False)
        check = torch.randn(3, 3, *size)
        with torch.no_grad():
            expected = model(check).numpy()
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        diffs.append(float(abs(session.run(None, {"image": check.numpy()})[0] - expected).max()))
        if diffs[0] > atol:
            raise TinymimError(f"ONNX model differs from PyTorch by {diffs[0]:.2e} (> {atol}): not written to {out}")

    _write_files(out, write, folder=False, check=lambda: check_output(source, out, "onnx", overwrite))
    return diffs[0]
