"""Run the tinymim CLI with one injected fault while it writes checkpoints/last.pt.

    python faulty_run.py FAULT N [FILE] -- tinymim arguments...

FAULT: enospc  the N-th write of FILE (default last.pt) fails with ENOSPC after 64 KiB (a full disk)
       kill    the process SIGKILLs itself after writing 64 KiB of the N-th FILE (a kill mid-write)
       startup start-up pauses (before anything is built) with FILE created, until a stop signal arrives:
               the test signals a process that is certainly still starting
       EOFError, ConnectionResetError, RuntimeError
               the N-th fetch of a batch from the loader's workers fails so, as when a worker dies
       evalfail the N-th evaluation of a fine-tuning run fails as when its loader's worker dies
       decodefail the N-th batch of JPEGs decoded on the device (data.decode=device) has no decodable
               file: every decode of it fails as libjpeg fails on a damaged file
       holdprefetch  the prefetch thread's N-th batch stays in flight (FILE created) until the run closes
               the prefetcher, and step N-1, the one training meanwhile, runs only once a stop signal has
               arrived: the test signals a run whose prefetch is certainly in flight; at the end the
               process prints the threads still alive
Everything else is the real program; only the file object the writer gets (or the one function
named) is wrapped.
"""
import errno
import os
import signal
import sys
import threading
import time

import tinymim.core.files as rundir  # atomic_write looks up _open_tmp here

HALF_WAY = 64 * 1024


class FailingFile:
    def __init__(self, f, fault: str):
        self.f, self.fault, self.written = f, fault, 0

    def write(self, data) -> int:
        if self.written + len(data) > HALF_WAY:
            if self.fault == "kill":
                self.f.write(data)
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


DEATHS = {"EOFError": EOFError(), "ConnectionResetError": ConnectionResetError(104, "Connection reset by peer"),
          "RuntimeError": RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")}


def pause_start_up(marker: str) -> None:
    import tinymim.train.engine as engine
    from tinymim.core import preempt

    real = engine.setup_distributed

    def setup_distributed(*a, **k):
        open(marker, "w").close()
        deadline = time.monotonic() + 300
        while preempt._early["received"] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return real(*a, **k)

    engine.setup_distributed = setup_distributed


def fail_batch_fetch(fault: str, n: int) -> None:
    from torch.utils.data import dataloader

    real, calls = dataloader._MultiProcessingDataLoaderIter._try_get_data, [0]

    def try_get_data(self, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise DEATHS[fault]
        return real(self, *a, **k)

    dataloader._MultiProcessingDataLoaderIter._try_get_data = try_get_data


def fail_evaluation(n: int) -> None:
    import tinymim.tasks.finetune as finetune

    real, calls = finetune.classification_sums, [0]

    def classification_sums(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise DEATHS["RuntimeError"]
        return real(*a, **k)

    finetune.classification_sums = classification_sums


def fail_decode(n: int) -> None:
    import tinymim.data.pretrain as pretrain

    real, batches = pretrain.decode_jpeg, [0]

    def decode_jpeg(data, *a, **k):
        if isinstance(data, list):  # a batch (then its files one by one, to find the damaged ones)
            batches[0] += 1
        if batches[0] == n:
            raise RuntimeError("Not a JPEG file: starts with 0x00 0x00")
        return real(data, *a, **k)

    pretrain.decode_jpeg = decode_jpeg


class HeldAfterNext:
    """The step's batches: the next one is taken (the prefetch thread starts the one after), then the
    step waits for a stop signal."""

    def __init__(self, batches, stop):
        self.batches, self.stop = batches, stop

    def __next__(self):
        batch = next(self.batches)
        deadline = time.monotonic() + 300
        while self.stop.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return batch


def hold_prefetch(n: int, marker: str) -> None:
    import tinymim.train.engine as engine
    from tinymim.tasks.distill import DistillTask

    real_prefetch, calls = DistillTask.prefetch, [0]

    def prefetch(self, batch):
        calls[0] += 1
        if calls[0] == n:
            open(marker, "w").close()
            threading.current_thread().stopping.wait(300)  # in flight until the prefetcher is closed
        return real_prefetch(self, batch)

    DistillTask.prefetch = prefetch
    real_step = engine.train_step

    def train_step(loop, batches):
        if loop.state.step == n - 2:  # step n-1 (1-based): the one that trains while batch n is prepared
            batches = HeldAfterNext(batches, loop.stop)
        return real_step(loop, batches)

    engine.train_step = train_step


def main() -> int:
    fault, n = sys.argv[1], int(sys.argv[2])
    target = sys.argv[3] if sys.argv[3] != "--" else "last.pt"
    args = sys.argv[sys.argv.index("--") + 1:]
    if fault == "startup":
        pause_start_up(target)
    elif fault in DEATHS:
        fail_batch_fetch(fault, n)
    elif fault == "evalfail":
        fail_evaluation(n)
    elif fault == "decodefail":
        fail_decode(n)
    elif fault == "holdprefetch":
        hold_prefetch(n, target)
    else:
        wrap_checkpoint_writes(fault, n, target)
    from tinymim.cli import main as cli

    code = cli(args)
    if fault == "holdprefetch":
        print("threads alive:", ",".join(sorted(t.name for t in threading.enumerate())), flush=True)
    return code


def wrap_checkpoint_writes(fault: str, n: int, target: str) -> None:
    real_open, writes = rundir._open_tmp, [0]

    def open_tmp(path):
        tmp, f = real_open(path)
        if path.name == target:
            writes[0] += 1
            if writes[0] == n:
                return tmp, FailingFile(f, fault)
        return tmp, f

    rundir._open_tmp = open_tmp


if __name__ == "__main__":
    sys.exit(main())
