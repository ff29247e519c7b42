"""Batches prepared ahead of their training step: `Prefetcher` takes batch n+1 from the loader and runs
the task's `prefetch` hook on it (with data.decode=device: the JPEG decode, crop, resize and flip) in
a background thread while batch n trains.

On CUDA the thread copies the batch's host tensors into pinned buffers it reuses from batch to batch,
runs the hook on its own CUDA stream and moves what the hook left on the host to the device; the
batch is handed over only when that stream has finished it (an event the thread waits on), so the
step waits for nothing but a batch that is not ready yet, and the main stream waits on the event and
marks each tensor as used by it (`record_stream`), so the caching allocator does not give its memory
to the side stream while the step still reads it. The number of batches prepared or in preparation
ahead of the step is at most `depth`: that bounds the memory the side stream holds (its blocks in
the caching allocator are its own and are reused batch after batch). On the CPU the same thread runs
the same hook, without streams.

An exception in the thread (an unreadable batch, a dead loader worker) is raised, the same object
with its own type and message, by the `next()` that would have returned the batch; `close()` asks the
thread to stop and joins it (the engine calls it when an epoch's batches end, and on every exit:
finished, stopped by a signal, failed). The hook must draw no random numbers (every random choice
of a view is the loader workers'), so the batches are the same with and without prefetching.
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import Callable, Iterator

import torch

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0  # close(): how long to wait for a batch in preparation before leaving the thread


class PrefetchThread(threading.Thread):
    """The background thread; `stopping` is set when the consumer closes (a hook that waits on
    something may wait on it too)."""

    def __init__(self, run: Callable[[], None]):
        super().__init__(name="tinymim-prefetch", target=run, daemon=True)
        self.stopping = threading.Event()


class PinnedBuffers:
    """Page-locked host buffers, one per batch key, reused from batch to batch (grown when a batch
    needs more): a copy into one is a plain memcpy, and the copy to the device from it is asynchronous.
    A buffer is rewritten only after the device copies of the previous batch have finished (the
    thread waits for its batch's event before handing it over)."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def stage(self, batch: dict) -> dict:
        out = dict(batch)
        for key, value in batch.items():
            if not torch.is_tensor(value) or value.device.type != "cpu" or value.is_pinned():
                continue
            nbytes = value.numel() * value.element_size()
            buf = self.buffers.get(key)
            if buf is None or buf.numel() < nbytes:
                buf = self.buffers[key] = torch.empty(max(nbytes + nbytes // 4, 64), dtype=torch.uint8,
                                                      pin_memory=True)
            view = buf[:nbytes].view(value.dtype).view(value.shape)
            view.copy_(value)
            out[key] = view
        return out


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and v.device != device else v
            for k, v in batch.items()}


class Prefetcher:
    """An iterator over `source`'s batches, each passed through `hook` in a background thread, at most
    `depth` batches ahead of the consumer. `source` stays the loader's iterator (the engine shuts its
    workers down through it)."""

    def __init__(self, source: Iterator[dict], hook: Callable[[dict], dict], depth: int = 1,
                 device: torch.device | None = None):
        if depth < 1:
            raise ValueError(f"prefetch depth must be at least 1, got {depth}")
        self.source, self.hook, self.depth = source, hook, depth
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.cuda = self.device.type == "cuda"
        self.slots = threading.Semaphore(depth)  # one per batch prepared or in preparation ahead
        self.ready: queue.Queue = queue.Queue()  # ("batch", (batch, event)) | ("end", None) | ("error", exc)
        self.done = False
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pinned = PinnedBuffers() if self.cuda else None
        self.thread = PrefetchThread(self._run)
        self.thread.start()

    # the thread's side

    def _run(self) -> None:
        stopping = self.thread.stopping
        try:
            if self.cuda and self.device.index is not None:
                torch.cuda.set_device(self.device)  # the thread's current device: its allocations go there
            while True:
                while not self.slots.acquire(timeout=0.1):
                    if stopping.is_set():
                        return
                if stopping.is_set():
                    return
                try:
                    batch = next(self.source)
                except StopIteration:
                    self.ready.put(("end", None))
                    return
                item = self._prepare(batch)
                if stopping.is_set():
                    return
                self.ready.put(("batch", item))
        except BaseException as e:  # noqa: BLE001 - carried to the consumer, raised by its next()
            if not stopping.is_set():
                self.ready.put(("error", e))

    def _prepare(self, batch: dict):
        with torch.no_grad():  # the hook builds inputs: nothing of it is differentiated
            if not self.cuda:
                return self.hook(batch), None
            batch = self.pinned.stage(batch)
            with torch.cuda.stream(self.stream):
                batch = _to_device(self.hook(batch), self.device)
                event = torch.cuda.Event()
                event.record(self.stream)
            event.synchronize()  # ready means ready: the step never waits on the GPU for this batch
            return batch, event

    # the consumer's side

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self) -> dict:
        if self.done:
            raise StopIteration
        while True:
            try:
                kind, value = self.ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    self.done = True
                    raise RuntimeError("the prefetch thread ended without its batch") from None
        if kind != "batch":
            self.done = True
            if kind == "error":
                raise value
            raise StopIteration
        self.slots.release()
        batch, event = value
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for v in batch.values():
                if torch.is_tensor(v) and v.is_cuda:
                    v.record_stream(main)  # its memory is not reused before the step's kernels are done with it
        return batch

    def close(self) -> None:
        """Stop the thread and wait for it (a batch in preparation is finished, then dropped)."""
        self.done = True
        self.thread.stopping.set()
        self.slots.release()  # a thread waiting for a slot wakes up and sees the stop
        self.thread.join(JOIN_TIMEOUT_S)
        if self.thread.is_alive():
            log.warning("the prefetch thread did not stop within %.0f s; leaving it (it ends with the process)",
                        JOIN_TIMEOUT_S)
        while not self.ready.empty():  # drop what was prepared: its memory goes back now
            self.ready.get_nowait()


def prefetched(source: Iterator[dict], task, device: torch.device) -> Iterator[dict]:
    """`source` wrapped in a Prefetcher running `task.prefetch` when the task asks for batches ahead
    (task.prefetch_depth > 0), else `source` itself."""
    depth = task.prefetch_depth  # declared on every task (tinymim.tasks.base.Task: 0, none)
    return Prefetcher(source, task.prefetch, depth, device) if depth > 0 else source
