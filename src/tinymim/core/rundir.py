"""The run directory: the one place that knows what a run leaves on disk and how it is written.

    RUN_DIR/config.yaml          the resolved config (a copy: the one inside last.pt is authoritative)
    RUN_DIR/metrics.jsonl        one JSON record per line
    RUN_DIR/checkpoints/last.pt  resumable state, loadable with torch.load(weights_only=True)
    RUN_DIR/<weights>.safetensors  the task's final weights (student / encoder / model)
    RUN_DIR/classes.json         classification runs: the class names, in the head's order
    RUN_DIR/.lock                held (flock) by the process that trains in the directory

Guarantees, for every task:
- one process at a time: `RunDir.lock()` takes an exclusive lock for the life of the run (for a group
  of torchrun processes: tinymim.core.guards.locked); a second process refuses at once and names the
  holder. The kernel drops the lock when its holder dies, so a killed run never leaves the directory
  blocked (a stale .lock file means nothing);
- no half-written file: every file is written to a temporary file in the same folder, synced, then
  renamed over the old one (`atomic_write`, in tinymim.core.files). A temporary file orphaned by a kill
  is removed by the next run that takes the lock;
- files get the mode the umask gives (0644 under the usual 022), like any other file a user writes,
  so a team can share its teachers;
- writing errors are the user's to fix and say so in one line: disk full, read-only, no permission.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml

from tinymim import __version__
from tinymim.core.config import ConfigError, describe_diffs, diff_configs
from tinymim.core.files import (
    TMP_SUFFIX,
    CheckpointError,
    RunDirError,
    read_json,
    read_jsonl,
    read_yaml,
    safe_torch_load,
    write_error,
    write_json,
    write_text,
)

log = logging.getLogger("tinymim")


class RunLockedError(RunDirError):
    """Another process is training in the run directory."""


_HELD: set[Path] = set()  # run directories this process has locked


# keys that may change between a run and its resumption: they do not change the result. data.root
# may move (a mounted copy elsewhere): the data's fingerprint, not its path, must match.
RESUMABLE_CHANGES = frozenset((
    "train.progress", "train.log_every", "train.checkpoint_every", "train.tensorboard", "train.loggers",
    "train.wandb_project", "train.wandb_mode", "train.mlflow_uri", "train.mlflow_experiment",
    "data.num_workers", "data.root", "data.val_root", "data.shard_cache", "train.device",
    "train.compile", "train.compile_mode", "train.activation_checkpointing", "data.prefetch"))


def result_changes(old: dict, new: dict) -> dict:
    """The keys (with their old and new values) in which config `new` differs from the stored `old` in
    a way that changes results: keys added to tinymim since `old` was written are no difference (the
    run ran without them), nor are the RESUMABLE_CHANGES."""
    return {k: v for k, v in diff_configs(old, new, new_keys_ok=True).items() if k not in RESUMABLE_CHANGES}


class RunDir:

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoint = self.path / "checkpoints" / "last.pt"
        self.classes_file = self.path / "classes.json"
        self.info_file = self.path / "run.json"
        self.lock_file = self.path / ".lock"
        self._lock_fd: int | None = None

    # -- the lock ---------------------------------------------------------------------------

    def check_output(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--output {self.path} is a file, not a folder; choose a folder (new or a run to resume)")

    @contextlib.contextmanager
    def lock(self):
        """Hold the directory's exclusive lock for the block; a directory this call created and the
        block left holding nothing but the lock is removed again (a run that failed to start)."""
        self.check_output()
        key = self.path.resolve()
        if key in _HELD:  # this process holds it already (a task run by a caller that locked the run)
            yield self
            return
        created = [p for p in (self.path, *self.path.parents) if not p.exists()]  # leaf first

        def remove_created() -> None:
            with contextlib.suppress(OSError):
                self.lock_file.unlink(missing_ok=True)
                for p in created:
                    p.rmdir()

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            remove_created()
            raise write_error(e, self.lock_file) from e
        try:
            # a POSIX record lock: owned by this process alone (forked loader workers do not hold it,
            # so a killed run frees the directory at once), and honoured over NFS
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without locks
                log.warning("%s does not support file locks: nothing stops a second process from using this "
                            "run directory at the same time", self.path)
            else:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise write_error(e, self.lock_file) from e
                raise RunLockedError(
                    f"{self.path} is in use by another tinymim process ({holder or 'unknown holder'}); wait for "
                    "it to end, or choose another --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._lock_fd = fd
        _HELD.add(key)
        ok = False
        try:
            self.remove_orphans()
            yield self
            ok = True
        finally:
            _HELD.discard(key)
            self._lock_fd = None
            if created and not ok and {p.name for p in self.path.iterdir()} <= {self.lock_file.name}:
                remove_created()
            os.close(fd)  # releases the lock

    def remove_orphans(self) -> None:
        """Temporary files of a writer that was killed (only ever called under the lock)."""
        for folder in (self.path, self.checkpoint.parent):
            if folder.is_dir():
                for tmp in folder.glob(f"*{TMP_SUFFIX}"):
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                        log.info("removed %s, left by an interrupted write", tmp)

    # -- the checkpoint ---------------------------------------------------------------------

    CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "global_step", "world", "rng", "finished")

    def read_checkpoint(self) -> dict:
        """last.pt, checked: written atomically, it can only be damaged from outside (a copy cut
        short, a disk error), and then the user decides."""
        fix = ("move it away to start this run over (its weights are lost), or restore it from a copy")
        try:
            state = safe_torch_load(self.checkpoint)
        except CheckpointError as e:
            raise RunDirError(f"{e}; {fix}") from None
        missing = [k for k in self.CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise RunDirError(f"{self.checkpoint} is not a tinymim checkpoint (no {', '.join(missing[:4])}); {fix}")
        return state

    # -- config -----------------------------------------------------------------------------

    def stored_config(self, checkpoint: dict | None = None) -> dict | None:
        """The run's config: the one inside last.pt, else config.yaml (None when neither is usable)."""
        if checkpoint is not None and isinstance(checkpoint.get("config"), dict):
            return checkpoint["config"]
        return read_yaml(self.config)

    def check_config(self, config: dict, checkpoint: dict | None = None) -> None:
        """A resumed run must use the config it started with (bar settings that do not change results)."""
        old = self.stored_config(checkpoint)
        if old is None:
            return
        if not set(old) <= set(config):  # a section tinymim added since is no difference (see below)
            raise ConfigError(f"{self.path} holds another kind of run (its config has sections "
                              f"{', '.join(sorted(old))}); choose a new --output directory")
        diffs = result_changes(old, config)
        if diffs:
            raise ConfigError(
                f"{self.path} holds a run with a different config ({describe_diffs(diffs)}); choose a new --output "
                "directory, or repeat the original settings to resume")

    def write_config(self, config: dict) -> None:
        write_text(self.config, yaml.safe_dump(config, sort_keys=False))

    # -- metrics ----------------------------------------------------------------------------

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics)

    def truncate_metrics(self, step: int, evaluated: bool = True) -> None:
        """Keep the records up to `step` (the checkpoint resumed from; 0: a fresh start), dropping a
        partial last line and anything logged after the checkpoint; evaluated=False: the checkpoint was
        written before its step's evaluation, whose record (if any) goes too."""
        if not self.metrics.exists():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) < step or r.get("step", 0) == step and
                (evaluated or not any(k.startswith("val_") for k in r))]
        write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    # -- what the run produced ---------------------------------------------------------------

    ARCHITECTURE_KEYS = ("name", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "reg_tokens")

    def model_section(self) -> str | None:
        """The config section of the model the run produced, as run.json records it (the task registry's
        fact); runs made before run.json existed: the distill student, else `model`."""
        info = read_json(self.info_file, "the run's task record") if self.info_file.is_file() else None
        if info and info.get("model_section"):
            return info["model_section"]
        config = self.stored_config() or {}
        return next((s for s in ("student", "model") if isinstance(config.get(s), dict)), None)

    def architecture(self) -> dict | None:
        """The architecture (ARCHITECTURE_KEYS) of the model the run produced; None without a usable config."""
        section = self.model_section()
        return produced_architecture(self.stored_config(), section) if section else None

    # -- weights and classes ----------------------------------------------------------------

    BEST = "best.safetensors"  # fine-tuning: the weights of the best evaluation so far

    def weights(self, best: bool = False) -> Path | None:
        """The final weights file of the run (the task's: student, encoder or model.safetensors), when
        there is one; with best=True the best evaluation's weights when the run kept them."""
        if best and (self.path / self.BEST).is_file():
            return self.path / self.BEST
        found = sorted(p for p in self.path.glob("*.safetensors") if p.name != self.BEST)
        return found[0] if found else None

    def write_info(self, task: str, model_section: str) -> None:
        """RUN_DIR/run.json: which task made the run and where its config keeps the produced model
        (tools read it instead of guessing from the config)."""
        write_json(self.info_file, {"task": task, "model_section": model_section, "tinymim": __version__})

    def task(self) -> str | None:
        """The task that made the run: from run.json, else recognized by its config's sections."""
        info = read_json(self.info_file, "the run's task record") if self.info_file.is_file() else None
        if info and info.get("task"):
            return info["task"]
        config = self.stored_config()
        if not config:
            return None
        if "student" in config:
            return "distill"
        if "decoder" in config:
            return "mae"
        return "finetune" if "layer_decay" in config else "linprobe" if "model" in config else None

    def write_classes(self, classes: list[str]) -> None:
        write_json(self.classes_file, {"classes": list(classes)})

    def read_classes(self) -> list[str] | None:
        obj = read_json(self.classes_file, "the class names of the run's head")
        return None if obj is None else list(obj["classes"])

    RECORD = "pipeline.json"  # a pipeline stage's record: what it was run from

    def read_record(self) -> dict | None:
        return read_json(self.path / self.RECORD, "a pipeline stage record")

    def write_record(self, record: dict) -> None:
        write_json(self.path / self.RECORD, record)


def produced_architecture(config: dict | None, section: str) -> dict | None:
    """The architecture of the model in `section` of a run's config (image size filled from the data)."""
    model = config.get(section) if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return None
    arch = {k: model.get(k) for k in RunDir.ARCHITECTURE_KEYS}
    if arch["img_size"] is None:
        arch["img_size"] = (config.get("data") or {}).get("img_size")
    return {k: v for k, v in arch.items() if v is not None}


def architecture_overrides(arch: dict, prefix: str, given: list[str] | dict) -> list[str]:
    """Overrides giving `prefix` (e.g. teacher.model) an architecture, except for the keys already
    `given` (override strings or a mapping); none at all when the model's name is given."""
    def is_given(key: str) -> bool:
        if isinstance(given, dict):
            return key in given
        return any(o.split("=", 1)[0].strip() == f"{prefix}.{key}" for o in given)

    if is_given("name"):
        return []
    return [f"{prefix}.{k}={json.dumps(v)}" for k, v in arch.items() if not is_given(k)]
