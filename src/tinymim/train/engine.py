"""The training engine every tinymim task shares, readable top to bottom in `train()`.

A task is a timm-style `TrainingTask`: a module whose forward takes a batch and returns a dict of
named losses ("loss" is optimized, the others are logged), with `get_trainable_module()`,
`prepare_distributed()` and `compile()` hooks, and `export(run_dir)` for its final weights.

The engine owns: torchrun/DDP setup (gloo on CPU, nccl on GPU), seeding, AdamW with the MAE
parameter groups, lr = blr x batch / 256 with per-iteration warmup + half-cycle cosine (fitted into
train.max_steps when that ends the run early), gradient accumulation, fp32/bf16/fp16 autocast
(GradScaler for fp16), optional torch.compile, a progress bar (and one for each evaluation),
metrics.jsonl (+ TensorBoard), atomic resumable checkpoints and the NaN guard.

Run directory:  RUN_DIR/config.yaml, RUN_DIR/metrics.jsonl, RUN_DIR/checkpoints/last.pt, and the
task's final weights. Running again on the same RUN_DIR resumes; a finished run says so and exits.

The loop is one object, `TrainingLoop`: start-up, the steps and clean-up, read top to bottom (nanoGPT
style). Its setup lives beside it (tinymim.train.config, tinymim.train.distributed), and so do its logs
and checkpoints (tinymim.train.bookkeeping).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from tinymim.core.config import plain
from tinymim.core.errors import WORKER_DEATH, DataError, NonFiniteLossError, loader_worker_death
from tinymim.core.guards import locked
from tinymim.core.preempt import Preempted, StopSignals, signal_name
from tinymim.core.rundir import RunDir
from tinymim.data.loader import build_loader
from tinymim.data.prefetch import Prefetcher, prefetched
from tinymim.train.bookkeeping import (
    FINISHED,
    Checkpointer,
    Loaders,
    Plan,
    RunLogs,
    TrainState,
    open_data,
    open_run,
    write_run_files,
)
from tinymim.train.config import TrainConfig
from tinymim.train.distributed import (
    DistContext,
    HeldLogs,
    broadcast_buffers,
    cpu_performance_settings,
    seed_everything,
    set_rng_state,
    setup_distributed,
)
from tinymim.train.loggers import preflight
from tinymim.train.optim import build_optimizer, build_scheduler, describe_schedule

log = logging.getLogger("tinymim")


# ---------------------------------------------------------------------------------------------
# the loop


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train(task, config, data_loader_fn, run_dir: str | Path, ctx: DistContext | None = None,
          optimizer_kwargs: dict | None = None, on_first_write=lambda: None):
    """Train `task` and write its run directory. `config` is the task's resolved config (a dataclass
    with a `train` section): the loop reads its `train` settings, the run directory records all of it.

    data_loader_fn(global_micro_batch, rank, world, seed) -> Loaders (tinymim.train.bookkeeping), or a
    plain (loader, sampler); the sampler has `set_epoch(epoch, start_step)` and `steps_per_epoch` (micro steps).
    on_first_write() is called once the run is checked, just before the directory is first written.
    Returns the final metrics record, or None when the run had already finished.
    """
    ctx = ctx or setup_distributed(config.train.device)
    run = RunDir(run_dir)
    with locked(run, ctx.is_main, ctx.distributed):
        return _train(task, config, data_loader_fn, run, ctx, optimizer_kwargs, on_first_write)


def _train(task, config, data_loader_fn, run: RunDir, ctx: DistContext, optimizer_kwargs, on_first_write):
    """train() in a run directory whose lock its caller holds (run_task takes it before building the task)."""
    with StopSignals() as stop:
        loop = TrainingLoop(task, config, run, ctx, stop)
        if not loop.start(data_loader_fn, optimizer_kwargs, on_first_write):
            return None
        try:
            loop.steps()
        finally:
            loop.close()
        return loop.logs.final()


class TrainingLoop:
    """One run's training in three phases: `start` (the run directory opened fresh, resumed or found
    finished; the data, optimizer, logs and checkpointer), `steps` (the loop) and `close` (its threads,
    loader workers and logs, however the loop ended). Its attributes are what the phases share."""

    def __init__(self, task, config, run: RunDir, ctx: DistContext, stop: StopSignals):
        self.task, self.run, self.ctx, self.stop = task, run, ctx, stop
        self.cfg, self.record = config.train, plain(config)  # the settings the loop reads; what the run records
        self.batches = None  # the current epoch's batches (a Prefetcher when the task prefetches)

    def start(self, data_loader_fn, optimizer_kwargs, on_first_write) -> bool:
        """Start-up: False when the run had already finished (nothing to do)."""
        task, cfg, ctx, run = self.task, self.cfg, self.ctx, self.run
        self.resume = resume = open_run(task, run, self.record, ctx)
        if resume == FINISHED:
            return False
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed + ctx.rank)
        self.loader, self.sampler, data_id, self.plan = open_data(task, cfg, data_loader_fn, ctx, run, resume)
        if ctx.is_main:
            preflight(cfg)  # a tracker that cannot start is said before anything is written
        on_first_write()  # from here on the directory is written
        if ctx.is_main:
            write_run_files(task, run, self.record, resume)
        self.state = state = TrainState(*_prepare(task, cfg, ctx, self.plan, optimizer_kwargs))
        if resume is not None:
            self.restore(resume)
        state.scheduler.step_update(state.step)
        self.logs = RunLogs(run, ctx, cfg, self.record, self.plan, task.name, state.step)
        self.checkpointer = Checkpointer(task, state, run, ctx, self.record, data_id)
        self.checkpointer.saved_step = state.step if resume is not None else None
        if self.stop.received is not None:  # asked during start-up: nothing new to save, nothing lost
            kept = f"its checkpoint at step {state.step} is kept" if resume is not None else "nothing had trained yet"
            raise Preempted(f"stopped on {signal_name(self.stop.received)} during start-up, before step "
                            f"{state.step + 1} of {self.plan.total}; {kept}; run the same command again to resume")
        return True

    def steps(self) -> None:
        """The loop, nanoGPT style: one optimizer step per iteration (`step`: then logging, evaluation at
        epoch ends, checkpoints, a stop on request), epoch after epoch, then the export."""
        task, state, plan = self.task, self.state, self.plan
        task.train()
        # stopped during its epoch's evaluation: every process restored the same checkpoint, buffers included
        if self.resume is not None and self.resume.get("evaluated") is False:
            self.logs.evaluation(self.evaluate())
            self.checkpointer.save()
        while state.step < plan.total:
            epoch, step_in_epoch = divmod(state.step, plan.per_epoch)
            self.sampler.set_epoch(epoch, step_in_epoch * self.cfg.accum_steps)
            _close_prefetch(self.batches)  # the last epoch's thread, before this epoch's loader starts
            # with the task's prefetch hook, batch n+1 is prepared in a thread while batch n trains
            self.batches = prefetched(iter(self.loader), task, self.ctx.device)
            for _ in range(step_in_epoch, min(plan.per_epoch, step_in_epoch + plan.total - state.step)):
                self.step()
        if self.ctx.is_main:
            task.export(self.run.path)
        self.checkpointer.save(finished=True)

    def step(self) -> None:
        """One optimizer step and what follows it: its logs; a checkpoint every train.checkpoint_every steps
        and at an epoch's end, then the epoch's evaluation; on a stop request, a checkpoint and Preempted."""
        state, plan, checkpointer = self.state, self.plan, self.checkpointer
        try:
            losses, stopping = train_step(self, self.batches)
        except DataError as e:
            kept = checkpointer.save_before_data_error(e)
            if kept is None:
                raise
            raise kept from e
        state.step += 1
        state.scheduler.step_update(state.step)
        self.task.after_step(state.step)
        self.logs.step(state.step, losses, state.optimizer)
        epoch_end = state.step % plan.per_epoch == 0 or state.step == plan.total
        saved = state.step % self.cfg.checkpoint_every == 0 or epoch_end
        if saved or epoch_end or stopping:  # what is saved, evaluated or exported next
            same_buffers(self.task, self.ctx)
        if saved:
            # the epoch's training is saved before its evaluation: an evaluation that fails (a bad
            # label, a killed worker) is redone on resume, the epoch is not
            checkpointer.save(evaluated=not epoch_end)
        if epoch_end:
            record = self.evaluate()
            self.logs.evaluation(record)
            if record is not None and state.step < plan.total:
                checkpointer.save()  # with the evaluation's best
        if stopping and not saved:
            checkpointer.save()
        if stopping and state.step < plan.total:
            raise Preempted(f"stopped on {signal_name(self.stop.received)} at step {state.step} of {plan.total}; "
                            f"checkpoint written to {self.run.checkpoint}; run the same command again to resume")

    def close(self) -> None:
        """Clean-up, however the loop ended: the prefetch thread, the loader's workers, the logs."""
        batches, self.batches = self.batches, None
        _close_prefetch(batches)  # its thread first: it may be reading from the loader
        # the loader's workers end now, not whenever the iterator is collected (an exception's
        # traceback may hold it; the workers ignore stop signals, so they must be told)
        source = batches.source if isinstance(batches, Prefetcher) else batches
        shutdown = getattr(source, "_shutdown_workers", None)
        if shutdown is not None:
            with contextlib.suppress(*WORKER_DEATH):  # a dead worker's pipe: the error on its way says so
                shutdown()
        self.logs.close()

    def restore(self, resume: dict) -> None:
        """The state of a checkpoint: the task's, the optimizer's, the schedule's, the RNG streams'."""
        state, ctx = self.state, self.ctx
        state.best = resume.get("best", state.best)
        self.task.load_trainable_state(resume["model"])
        state.optimizer.load_state_dict(resume["optimizer"])
        state.scheduler.load_state_dict(resume["scheduler"])
        state.scaler.load_state_dict(resume["scaler"])
        state.step = resume["global_step"]
        if resume["world"] == ctx.world:
            set_rng_state(resume["rng"][ctx.rank])
        else:  # RNG streams are per process; a new process count gets fresh, still seeded ones
            seed_everything(self.cfg.seed + ctx.rank + 7919 * state.step)
            if ctx.is_main:
                log.warning("resuming with %d processes instead of %d: drop-path randomness will differ",
                            ctx.world, resume["world"])
        if ctx.is_main:
            log.info("resuming %s from step %d", self.run.path, state.step)

    def evaluate(self) -> dict | None:
        """The task's end-of-epoch evaluation as a metrics record; a new best exports the best weights."""
        task, state, plan = self.task, self.state, self.plan
        task.eval()
        with torch.no_grad(), _autocast(self.ctx.device, self.cfg.precision):
            result = task.evaluate(-(-state.step // plan.per_epoch))
        task.train()
        if not result:
            return None
        record = {"step": state.step, "epoch": round(state.step / plan.per_epoch, 4),
                  **{f"val_{k}": v for k, v in result.items()}}
        if task.best_metric and result[task.best_metric] > state.best:
            state.best = result[task.best_metric]
            if self.ctx.is_main:
                task.export_best(self.run.path)
        if task.best_metric:
            record["val_best"] = state.best
        return record


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def train_step(loop: TrainingLoop, batches) -> tuple[dict[str, float], bool]:
    """One optimizer step over accum_steps micro batches (DDP syncs gradients on the last only).
    Returns the step's losses averaged over processes, and whether any process was asked to stop."""
    task, cfg, ctx, state, window = loop.task, loop.cfg, loop.ctx, loop.state, loop.logs.window
    sums = {}
    for micro in range(cfg.accum_steps):
        waited = time.perf_counter()
        batch = next_batch(batches)
        window.loader_wait += time.perf_counter() - waited  # blocked on the loader: it is behind the step
        sync = micro == cfg.accum_steps - 1
        with (contextlib.nullcontext() if sync else task.no_sync()):
            if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES:
                torch.compiler.cudagraph_mark_step_begin()  # the last micro step's graph outputs are consumed
            with _autocast(ctx.device, cfg.precision):
                out = task(batch)
            state.scaler.scale(out["loss"] / cfg.accum_steps).backward()
        for k, v in out.items():
            if k.startswith("loss"):
                sums[k] = sums.get(k, 0.0) + v.detach().float() / cfg.accum_steps
        window.images += len(batch["label"]) * ctx.world
        window.skipped += batch["skipped"]
    names = sorted(sums)
    # a stop request rides with the losses' all-reduce: every process sees it at the same step
    requested = torch.ones(1) if loop.stop.received is not None else torch.zeros(1)
    values = torch.cat([torch.stack([sums[k] for k in names]), requested.to(sums[names[0]])])
    if ctx.distributed:
        dist.all_reduce(values)
        values /= ctx.world
    # the step's one host sync point (the CPU waits for the device here): the NaN guard must stop a bad
    # step before the optimizer applies it, and the stop flag is read at the same step on every process
    *averaged, stop_requested = values.tolist()
    if not all(math.isfinite(v) for v in averaged):
        raise NonFiniteLossError(
            f"non-finite loss at step {state.step + 1}: {dict(zip(names, averaged))}. "
            + (f"The last good checkpoint, {loop.run.checkpoint}, is kept. " if loop.run.checkpoint.is_file() else
               "No checkpoint had been written yet: the run starts over. ")
            + "Lower the learning rate (train.blr), use train.precision=bf16 or fp32 instead of fp16, or set "
            "train.clip_grad.")
    if cfg.clip_grad is not None:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(task.get_trainable_module().parameters(), cfg.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    return dict(zip(names, averaged)), stop_requested > 0


def next_batch(batches):
    """next(batches), with a loader worker's death in every form it takes as one error."""
    try:
        return next(batches)
    except (RuntimeError, *WORKER_DEATH) as e:
        died = loader_worker_death(e)
        if died is None:
            raise
        raise died from e


# ---------------------------------------------------------------------------------------------
# the pieces the loop calls


def _close_prefetch(batches) -> None:
    """Stop a Prefetcher's thread (a plain loader iterator: nothing to do)."""
    if isinstance(batches, Prefetcher):
        batches.close()


def same_buffers(task, ctx: DistContext) -> None:
    """Under torchrun, every buffer of the task made rank 0's, for every task, before anything looks at
    the model (a checkpoint, an evaluation, an export). Why they differ: DDP (broadcast_buffers=True)
    copies rank 0's buffers into every process at the start of each training forward, but that forward
    then updates each process's BatchNorm running statistics with its own share of the batch, and an
    evaluation or export never goes through DDP's forward (it runs the plain module, in eval mode): each
    process would evaluate its own statistics (a linear probe's differed by up to 0.2) and the export
    would hold rank 0's. After this, what every process evaluates is what rank 0 saves and exports; the
    training itself is unchanged (the next forward would have copied rank 0's buffers anyway)."""
    if ctx.distributed:
        broadcast_buffers(task)


def _prepare(task, cfg: TrainConfig, ctx: DistContext, plan: Plan, optimizer_kwargs):
    """The task on its device (compiled, wrapped for DDP), its optimizer, schedule and grad scaler."""
    if ctx.device.type == "cpu":
        cpu_performance_settings()
    task.to(ctx.device)
    task.prepare(ctx.device, cfg.precision)
    if cfg.activation_checkpointing:
        task.set_grad_checkpointing(True)
    if cfg.compile:
        task.compile(mode=cfg.compile_mode)
    if ctx.distributed:
        task.prepare_distributed(device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    groups = task.param_groups(cfg.weight_decay)
    optimizer = build_optimizer(groups if groups is not None else task.get_trainable_module(), cfg, optimizer_kwargs)
    scheduler = build_scheduler(optimizer, cfg, plan.per_epoch)
    if ctx.is_main:
        log.info("%s", describe_schedule(cfg, plan.per_epoch))
    return optimizer, scheduler, torch.amp.GradScaler(ctx.device.type, enabled=cfg.precision == "fp16")


class TaskDefinition(Protocol):
    """What the engine uses of a task's registry entry (tinymim.tasks.base.TaskSpec)."""

    resolve: Callable  # config -> a copy with every derived key filled (nothing built)
    build: Callable  # resolved config -> the Task: models built, weights loaded
    loaders: Callable | None  # (task, global micro batch, rank, world, seed) -> Loaders
    optimizer_options: Callable  # config -> extra options of build_optimizer (e.g. layer_decay)
    fits: Callable | None  # resolved config -> None or a one-line error: checked before anything is built


def run_task(spec: TaskDefinition, cfg, output: str | Path):
    """Build the task of a config with `data` and `train` sections and train it.

    The model is built after seeding with train.seed, identically in every process (a random
    teacher must be the same on every rank); the resolved config is saved with the run. Without
    its own loaders a task gets the paired-view loader of pre-training.
    """
    ctx, run = setup_distributed(cfg.train.device), RunDir(output)
    # the run directory is locked once, before anything is built: a second process refuses at once
    with locked(run, ctx.is_main, ctx.distributed), HeldLogs() as held:
        # the run's one resolution (the builder trusts it): what the run directory records, every derived key filled
        cfg = spec.resolve(cfg)
        if spec.fits is not None:
            spec.fits(cfg)  # before anything is allocated: a run too big is refused, not killed unannounced
        seed_everything(cfg.train.seed)
        task = spec.build(cfg)

        def loader_fn(batch, rank, world, seed):
            if spec.loaders is not None:
                return spec.loaders(task, batch, rank, world, seed)
            # a task that prefetches copies into pinned buffers it reuses (tinymim.data.prefetch) instead
            return Loaders(*build_loader(cfg.data, batch, rank, world, seed, pin_memory=torch.cuda.is_available()
                                         and cfg.train.device != "cpu" and not task.prefetch_depth))

        return _train(task, cfg, loader_fn, run, ctx, spec.optimizer_options(cfg), on_first_write=held.release)
