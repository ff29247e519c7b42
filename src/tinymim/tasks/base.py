"""What every tinymim task adds to timm's TrainingTask (DDP of its trainable part, no_sync for
gradient accumulation, checkpoint state and final export), and `TaskSpec`: what a task module
declares about itself for the registry (tinymim.tasks)."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
from timm.task import TrainingTask
from torch.nn.parallel import DistributedDataParallel as DDP

from tinymim.core.config import from_run_config, load_config
from tinymim.core.rundir import RunDir
from tinymim.models.checkpoint import CheckpointError, load_state_dict
from tinymim.models.features import default_features, feature_view
from tinymim.train.bookkeeping import Loaders


class Task(TrainingTask):
    """What a tinymim task is to the training engine (tinymim.train.engine), its whole contract.

    Build (once, before the first step), the engine calls, in this order:
      attach(loaders, last_epoch)    the data the engine built from the task's loaders (eval loader, classes)
      to(device), prepare(device, precision), set_grad_checkpointing(True) (train.activation_checkpointing),
      compile(mode=...) (train.compile), prepare_distributed(device_ids) (under torchrun),
      param_groups(weight_decay), else get_trainable_module() for timm's groups: what the optimizer updates
      load_trainable_state(state)    on resume, the checkpoint's
    Step (every optimizer step):
      prefetch(batch)                in a background thread, when prefetch_depth > 0
      forward(batch)                 a dict of losses: "loss" is optimized, every other "loss*" key logged
      no_sync()                      around every micro step but the last of a gradient accumulation
      after_step(step)               after the optimizer step (e.g. an EMA update)
    End of an epoch, checkpoints and the end of the run:
      evaluate(epoch)                in eval mode under no_grad: metrics, or None when there is none
      export_best(run_dir)           on the main process, when evaluate()[best_metric] is a new best
      trainable_state()              what a checkpoint keeps
      export(run_dir)                on the main process, the run's final weights (`weights`)
    It reads, and never writes: name, weights, model_section (recorded in the run directory), best_metric,
    prefetch_depth, and classes (written to classes.json). It writes nothing into a task but through
    attach(), which sets eval_loader, eval_of, classes and last_epoch.
    """

    name = "task"
    weights = "model.safetensors"  # the file a finished run leaves in its directory
    model_section = "model"  # the config section of the model the task produces
    # what attach() sets: the evaluation loader (None: the task evaluates nothing of its own), the split's
    # full size when eval_limit cut that loader, the training data's class names (a classifier's), and the
    # epoch the run ends in (a task evaluating every N epochs still evaluates the last)
    eval_loader = None
    eval_of: int | None = None
    classes: list[str] | None = None
    last_epoch: int | None = None

    def __init__(self, trainable: nn.Module):
        super().__init__(verbose=False)
        self.trainable_module = trainable  # what the optimizer updates; wrapped by DDP when distributed
        # runtime views of registered modules (compiled, DDP): a plain dict keeps them out of the module
        # tree, so the task's state_dict, .to() and parameters() see every weight once
        self.wrapped: dict[str, nn.Module] = {}

    def attach(self, loaders: Loaders, last_epoch: int) -> None:
        """What the engine hands the task before training: the evaluation side of its loaders and the
        epoch the run ends in."""
        self.eval_loader, self.eval_of, self.classes = loaders.eval, loaders.eval_of, loaders.classes
        self.last_epoch = last_epoch

    def get_trainable_module(self, ema: bool = False) -> nn.Module:
        return self.trainable_module

    @property
    def trainable_forward(self) -> nn.Module:
        """The callable to run the trainable part through: DDP's wrapper when distributed, else the
        compiled module when compiled, else the module itself."""
        for key in ("ddp", "compiled"):
            if key in self.wrapped:
                return self.wrapped[key]
        return self.trainable_module

    def compile(self, backend: str = "inductor", mode=None, **kw) -> nn.Module:
        """torch.compile the trainable part (every task; timm's TrainingTask.compile differs between
        timm releases, so tinymim does not rely on it); mode: torch.compile's (train.compile_mode)."""
        self.wrapped["compiled"] = torch.compile(self.trainable_module, backend=backend, mode=mode, **kw)
        return self.wrapped["compiled"]

    def prepare_distributed(self, device_ids=None, **ddp_kwargs) -> "Task":
        self.wrapped["ddp"] = DDP(self.trainable_forward, device_ids=device_ids, **ddp_kwargs)
        return self

    def prepare(self, device: torch.device, precision: str) -> None:
        """Last choices that depend on where and how the task runs (called by the engine). By default:
        on CPU in bf16/fp16, PyTorch's fused attention backward is 2-3x slower than plain matmul +
        softmax (benchmarks/speed/distill_throughput.py), so trained ViT blocks use the plain path there."""
        explicit = device.type == "cpu" and precision in ("bf16", "fp16")
        for m in self.trainable_module.modules():
            if hasattr(m, "fused_attn") and hasattr(m, "qkv"):
                m.fused_attn = not explicit

    def param_groups(self, weight_decay: float) -> list[dict] | None:
        """The optimizer's parameter groups when the task assigns them itself (each a dict with params,
        weight_decay and lr_scale); None: timm's groups from the trainable module (the default)."""
        return None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every trained timm ViT (timm's own flag, which timm's forward and
        tinymim's block loops both honour)."""
        for m in self.trainable_module.modules():
            if hasattr(m, "set_grad_checkpointing") and hasattr(m, "blocks"):
                m.set_grad_checkpointing(enable)

    def no_sync(self):
        return self.wrapped["ddp"].no_sync() if "ddp" in self.wrapped else contextlib.nullcontext()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.trainable_module.state_dict()

    def load_trainable_state(self, state: dict) -> None:
        self.trainable_module.load_state_dict(state)

    def export(self, run_dir: Path) -> None:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (e.g. to update an EMA copy)."""

    # batches the engine prepares ahead of their step, running `prefetch` on each in a background thread
    # while the current step trains (tinymim.data.prefetch); 0: none, the step does all of its work
    prefetch_depth: int = 0

    def prefetch(self, batch: dict) -> dict:
        """The part of a batch's work that can run ahead of its step (in the prefetch thread; on CUDA on
        a side stream): nothing by default. It must draw no random numbers, so that a run's batches are
        the same with and without prefetching."""
        return batch

    # evaluation at each epoch end (optional): a dict of metrics, reduced over processes
    best_metric: str | None = None  # a key of evaluate()'s dict; higher is better

    def evaluate(self, epoch: int) -> dict | None:
        """Metrics after `epoch` epochs (1-based), or None when there is nothing to evaluate."""
        return None

    def export_best(self, run_dir: Path) -> None:
        """Called on the main process when evaluate()[best_metric] reaches a new best."""


_RESOLVED_AS = "_resolved_as"  # set on a config its task's resolve returned: its repr at that moment


def resolves_once(resolve: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A task's `resolve` that trusts its own work: the config it returns is marked, and a marked config
    that has not changed since (the same repr: every field, nested ones too) comes back as it is. So a run
    resolves once (the engine, before building), and a builder's own `cfg = resolve(cfg)`, there for
    callers who pass a config as loaded, costs nothing on a resolved one."""

    @functools.wraps(resolve)
    def once(cfg):
        if getattr(cfg, _RESOLVED_AS, None) == repr(cfg):
            return cfg
        resolved = resolve(cfg)
        object.__setattr__(resolved, _RESOLVED_AS, repr(resolved))  # an instance attribute, not a field
        return resolved

    return once


def _no_optimizer_options(cfg) -> dict:
    return {}


@dataclass(frozen=True)
class TaskSpec:
    """One task, as its module declares it: the objects the engine, the command line, pipelines and
    evaluation use. The registry (`tinymim.tasks.TASKS`) imports every module's spec."""

    task: type[Task]  # its name, weights file and model section are the class's
    config: type  # the typed config (a dataclass with `data` and `train` sections)
    # config -> a copy with every derived key filled; nothing is built (resolves_once: a config it resolved
    # comes back as it is)
    resolve: Callable[[Any], Any]
    build: Callable[[Any], Task]  # config -> Task: models built, weights loaded (an unresolved config resolved first)
    # a run's resolved config -> the module its weights file holds, built without loading any weights
    trained: Callable[[Any], nn.Module]
    kind: Literal["pretrain", "classify", "segment"]  # what its results are: losses and k-NN, top-1, mIoU
    upstream: Literal["teacher", "init"] | None  # what an earlier pipeline stage can give it
    exports: Literal["encoder", "classifier", "probe", "segmenter"]  # what `tinymim export` makes of them
    help: str
    # (task, global micro batch, rank, world, seed) -> Loaders; None: pre-training's paired views
    loaders: Callable[..., Loaders] | None = None
    optimizer_options: Callable[[Any], dict] = field(default=_no_optimizer_options)  # config -> e.g. layer_decay
    # (recipe, overrides) -> config; None: defaults <- recipe <- overrides (tinymim.core.config.load_config)
    load: Callable | None = None
    # the weights file's state -> what `trained` loads (a layout an older release wrote, mended)
    trained_state: Callable[[dict], dict] | None = None
    # where the trained module sits in the trainable module a checkpoint holds ("vit.": DistillStudent.vit)
    checkpoint_prefix: str = ""
    # a resolved config -> None, or a one-line ConfigError: what must hold before a run builds anything
    # (distill: the estimated peak memory fits the machine). Run by the engine only, not by build, so that
    # building a task to inspect it (tests, tinymim.build_task) allocates without asking
    fits: Callable[[Any], None] | None = None

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def weights(self) -> str:
        return self.task.weights

    @property
    def model_section(self) -> str:
        return self.task.model_section

    def load_config(self, recipe=None, overrides=()):
        """The task's typed config: defaults <- recipe (a YAML file or a built-in name) <- `section.key=value`."""
        if self.load is not None:
            return self.load(recipe, list(overrides))
        return load_config(self.config, recipe, list(overrides))


@dataclass
class TrainedRun:
    """A finished run's model (eval mode, its weights loaded) and what it was trained with. model(x)
    is what every other way out of tinymim gives for the run by default (tinymim.models.features):
    a classifier's logits, an encoder's mean patch token of its default `features`."""

    model: nn.Module
    config: Any  # the run's typed config, every derived key filled
    task: str
    weights: Path  # the file the weights came from
    classes: list[str] | None  # the class names of a classifier's outputs, when the run recorded them
    # an encoder's: final (after every block and the final norm) or relation-input (entering the last block)
    features: str | None = None


def load_run_model(spec: TaskSpec, run_dir: str | Path, best: bool = False, latest: bool = False) -> TrainedRun:
    """The one path from a run directory of `spec`'s task to its trained model: the stored config,
    the module it describes, the final (or with best=True the best evaluation's) weights; with
    latest=True a run still training gives its latest checkpoint's."""
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise CheckpointError(f"{run.path} does not exist; pass the --output folder of `tinymim {spec.name}`")
    raw, task = run.stored_config(), run.task()
    if raw is None or task != spec.name:
        what = f"a tinymim {task} run" if raw is not None and task else "not a tinymim run directory"
        raise CheckpointError(f"{run.path} is {what}, not a {spec.name} run with a usable config.yaml; pass the "
                              f"--output folder of `tinymim {spec.name}`")
    file = run.weights(best=best)
    if file is None and latest and run.checkpoint.is_file():
        checkpoint, file = run.read_checkpoint(), run.checkpoint
        raw, n = run.stored_config(checkpoint), len(spec.checkpoint_prefix)
        state = {k[n:]: v for k, v in checkpoint["model"].items() if k.startswith(spec.checkpoint_prefix)}
    elif file is None:
        raise CheckpointError(f"{run.path} holds no weights yet; is the {spec.name} run finished?")
    else:
        state = load_state_dict(file)
    cfg = spec.resolve(from_run_config(spec.config, raw))
    model = spec.trained(cfg)
    model.load_state_dict(spec.trained_state(state) if spec.trained_state else state)
    features = None
    if spec.exports == "encoder":  # model(x): the export's default features (its state dict unchanged)
        features = default_features(spec.name, cfg)
        model = feature_view(model, features, "avg")
    return TrainedRun(model.eval(), cfg, spec.name, file, run.read_classes(), features)
