"""Guards around a run that RunDir does not hold itself: `locked`, the run directory's lock taken for a
group of torchrun processes (the main one holds it; when it cannot be had, every process raises the same
one-line error), and `check_classes`, a dataset's class names against those a trained head was built on."""
from __future__ import annotations

import contextlib

import torch.distributed as dist

from tinymim.core.errors import TinymimError
from tinymim.core.files import RunDirError
from tinymim.core.rundir import RunDir


@contextlib.contextmanager
def locked(run: RunDir, is_main: bool = True, distributed: bool = False):
    """`run.lock()` for a group of processes (torchrun): the main one holds it for all; when it cannot
    be had, every process raises the same one-line error."""
    if not distributed:
        with run.lock():
            yield run
        return
    stack, error = contextlib.ExitStack(), None
    if is_main:
        try:
            stack.enter_context(run.lock())
        except TinymimError as e:
            error = e
    message = [None if error is None else str(error)]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        error = RunDirError(message[0])
        error.quiet = True  # the main process says it; one line per job, not one per process
        raise error
    with stack:
        yield run


def check_classes(expected: list[str], found: list[str], where: str, fix: str) -> None:
    """Refuse a dataset whose class folders differ from the head's: labels would shift silently."""
    if list(expected) == list(found):
        return
    missing = [c for c in expected if c not in set(found)]
    extra = [c for c in found if c not in set(expected)]

    def names(xs):
        return ", ".join(xs[:5]) + (f" and {len(xs) - 5} more" if len(xs) > 5 else "")

    parts = ([f"missing {names(missing)}"] if missing else []) + ([f"extra {names(extra)}"] if extra else [])
    if not parts:
        parts = ["the same names in another order"]
    raise RunDirError(f"the classes of {where} differ from the model's {len(expected)} ({'; '.join(parts)}): "
                      f"every label would be wrong; {fix}")
