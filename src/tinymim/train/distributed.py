"""Setting up a training process: torchrun's environment as a `DistContext` (a process group: gloo on
CPU, nccl on GPU), the CPU's process-wide speed settings, `HeldLogs` (a setup's log records held until
its checks pass) and seeding, with the RNG state a checkpoint keeps per process."""
from __future__ import annotations

import ctypes
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("tinymim")


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    distributed: bool = False  # launched by torchrun: a process group and DDP, even for one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistContext:
    """Read torchrun's environment; one process without it."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        if rank == 0 and (note := restart_store_warning(os.environ)):
            log.warning(note)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistContext(rank, world, local_rank, dev, launched)


def restart_store_warning(environ) -> str | None:
    """A note when torchrun may restart the workers (--max-restarts) while they share the agents' store:
    restarted workers then find the dead round's addresses there and hang in init_process_group
    (pytorch/pytorch#135712; tests/test_multinode.py)."""
    if int(environ.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("torchrun --max-restarts with the agents' shared store: a restart would hang; set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment")
    return None


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Every buffer of `module` (BatchNorm running statistics and counts, an EMA copy's, any registered
    tensor) made process `src`'s, in place; nothing to do without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buffer in module.buffers():
        if buffer.is_contiguous():
            dist.broadcast(buffer, src)
        else:  # a collective writes contiguous memory only
            contiguous = buffer.contiguous()
            dist.broadcast(contiguous, src)
            buffer.copy_(contiguous)


def cpu_performance_settings() -> None:
    """Two process-wide settings that make CPU training markedly faster (benchmarks/speed/distill_throughput.py):

    - flush denormals to zero: softmax tails produce them, and each costs a microcode assist;
    - keep freed memory in the process (glibc): otherwise every step's large activations are
      returned to the OS and page-faulted back in, which costs more than the ops that use them.
    """
    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # the largest value mallopt takes
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class HeldLogs:
    """Log records of a run's setup, held until its checks pass (`release()`), then shown: a run that
    cannot start prints its one-line error alone, not the notes of a setup that went nowhere."""

    class _Hold(logging.Handler):
        def __init__(self, records: list):
            super().__init__()
            self.records = records

        def emit(self, record) -> None:
            self.records.append(record)

    def __init__(self, logger: logging.Logger = log, replay: bool = True):
        self.logger, self.records, self.holding, self.replay = logger, [], False, replay

    def __enter__(self) -> "HeldLogs":
        self.handler, self.propagate = self._Hold(self.records), self.logger.propagate
        self.logger.addHandler(self.handler)
        self.logger.propagate, self.holding = False, True
        return self

    def _stop(self) -> None:
        if self.holding:
            self.logger.removeHandler(self.handler)
            self.logger.propagate, self.holding = self.propagate, False

    def release(self) -> None:
        if self.holding:
            self._stop()
            for record in self.records:
                self.logger.handle(record)
            self.records.clear()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and self.replay:
            self.release()
        self._stop()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """This process's RNG states as plain Python values (picklable anywhere, weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
