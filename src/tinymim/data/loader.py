"""The pre-training loader: batch samplers that give the same global batches for any number of
processes and resume mid-epoch (`GlobalBatchSampler`; `ShardBatchSampler`, whole shards per process),
the loader workers' start (stop signals left to the main process) and the end of leftover workers at
exit, and `build_loader`, which puts a source, PairedViewDataset and a sampler together."""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util  # noqa: F401 - its exit handler is registered first, so ours runs before it
import os
import signal

import numpy as np
import torch
import torch.utils.data as tud

from tinymim.core.errors import DataError
from tinymim.data.pretrain import DataConfig
from tinymim.data.shards import ShardImages
from tinymim.data.sources import build_source
from tinymim.data.view_dataset import PairedViewDataset, collate


class GlobalBatchSampler:
    """Yields this rank's slice of each global batch of an epoch as (index, sample_seed) pairs.

    The epoch's order is a permutation seeded by (seed, epoch); global batch t is positions
    [t*G, (t+1)*G) of it, and rank r takes the r-th contiguous 1/world of that batch. Incomplete
    final batches are dropped. `set_epoch(epoch, start_step)` resumes mid-epoch.
    """

    def __init__(self, length: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} processes")
        if length < global_batch:
            raise DataError(f"the dataset has {length} images, fewer than one global batch ({global_batch})")
        self.length, self.global_batch, self.rank, self.world, self.seed = length, global_batch, rank, world, seed
        self.local_batch = global_batch // world
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.length // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.length, generator=g).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * 1_000_003
        for step in range(self.start_step, self.steps_per_epoch):
            lo = step * self.global_batch + self.rank * self.local_batch
            yield [(perm[p], base + p) for p in range(lo, lo + self.local_batch)]


class ShardBatchSampler(GlobalBatchSampler):
    """Yields this rank's part of each global batch of an epoch as (index, sample_seed) pairs, reading
    whole shards per rank (tinymim.data.shards' docstring states the split); GlobalBatchSampler's length,
    steps and resumption, another order. Everything follows from (seed, epoch, step), so a run resumed
    mid-epoch sees what an uninterrupted one would."""

    def __init__(self, shard_ranges, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
        self.ranges = [r if isinstance(r, range) else range(*r) for r in shard_ranges]
        length = sum(len(r) for r in self.ranges)
        if world > len(self.ranges) and not global_batch % world:  # an indivisible batch: GlobalBatchSampler says so
            raise DataError(f"{world} processes but {len(self.ranges)} shards: each process reads whole shards; "
                            f"write smaller ones (tinymim shards SRC --output DIR --shard-size N, N at most "
                            f"{max(1, length // world)})")
        super().__init__(length, global_batch, rank, world, seed)

    def assignment(self, epoch: int) -> list[list[int]]:
        """Per rank, the shards (positions in shard_ranges) it reads in `epoch`, in its shuffled order."""
        order = _rng(1, self.seed, epoch, 0).permutation(len(self.ranges)).tolist()
        loads, out = [0] * self.world, [[] for _ in range(self.world)]
        # largest first (a stable sort: equal shards keep the shuffled order), each to the least loaded rank
        for s in sorted(order, key=lambda s: -len(self.ranges[s])):
            r = min(range(self.world), key=lambda r: (loads[r], r))
            out[r].append(s)
            loads[r] += len(self.ranges[s])
        return out

    def __iter__(self):
        mine = self.assignment(self.epoch)[self.rank]
        indices = np.concatenate([np.arange(self.ranges[s].start, self.ranges[s].stop) for s in mine])
        # all of the rank's shards mixed: reads are preads by offset, locality within a shard buys nothing
        perm = _rng(2, self.seed, self.epoch, self.rank).permutation(indices).tolist()
        n, high = self.local_batch, ((self.seed * 100_003 + self.epoch) << 32)
        for step in range(self.start_step, self.steps_per_epoch):
            lo = step * n
            # sample seeds: unique per (epoch, global position), below 2**63 (torch.manual_seed takes them)
            first = step * self.global_batch + self.rank * n
            yield [(perm[p % len(perm)], (high | (first + j)) & (2**63 - 1)) for j, p in enumerate(range(lo, lo + n))]


def _rng(*key: int) -> np.random.Generator:
    """A stream per key: a tag, then the numbers (numpy's seeding ignores trailing zeros, [1] and [1, 0]
    give one stream, so every key has the same length and its own tag)."""
    return np.random.default_rng([k % 2**64 for k in key])


def worker_init(worker_id: int) -> None:
    """Loader workers leave stop signals to the main process: a scheduler signals every process of a
    job, and a worker that died of SIGTERM would end the run before its checkpoint is written."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def _end_leftover_workers() -> None:
    """At exit, loader workers still alive (an iterator nobody shut down) are killed: they ignore the
    SIGTERM that multiprocessing's own exit handler sends, and it would wait for them forever."""
    for p in multiprocessing.active_children():
        if p.daemon:
            p.kill()
            p.join(1)


def _register_exit_handler() -> None:
    atexit.register(_end_leftover_workers)


_register_exit_handler()


def batch_sampler(source, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0):
    """The sampler for a source: whole shards per process for shards (ShardBatchSampler), GlobalBatchSampler
    for everything else (a subset of shards included)."""
    if isinstance(source, ShardImages):
        return ShardBatchSampler(source.shard_ranges, global_batch, rank, world, seed)
    return GlobalBatchSampler(len(source), global_batch, rank, world, seed)


def build_loader(cfg: DataConfig, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 pin_memory: bool = False) -> tuple[tud.DataLoader, GlobalBatchSampler]:
    source = build_source(cfg, seed)
    dataset = PairedViewDataset(source, cfg)
    sampler = batch_sampler(source, global_batch, rank, world, seed)
    # the loader gets its own generator: starting an iterator must not consume the global RNG
    # (drop path draws from it), or a run resumed mid-epoch would diverge from an uninterrupted one
    # no more workers than cores: more only add memory and switching (the views are the same either way)
    workers = min(cfg.num_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                  else os.cpu_count() or 1)
    loader = tud.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                            pin_memory=pin_memory, persistent_workers=False, worker_init_fn=worker_init,
                            generator=torch.Generator().manual_seed(seed),
                            prefetch_factor=4 if workers else None)
    return loader, sampler
