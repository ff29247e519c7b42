"""Errors that are the user's to fix: the CLI prints their message (no traceback) and exits 1."""


class TinymimError(RuntimeError):
    """Base of every error whose message names the problem and the fix."""


class NonFiniteLossError(TinymimError):
    """The loss became NaN or infinite; the last good checkpoint (if one was written) is kept."""


class DataError(TinymimError):
    """Data that cannot be read, with what to do about it (tinymim.data.pretrain and tinymim.data.shards raise it)."""


class StorageError(DataError):
    """A folder tinymim writes data into (the shard cache) is full or read-only: the machine's to fix, not
    the data's, so it stops the run at once instead of skipping the image (another would fail the same)."""


class LoaderWorkerDied(TinymimError):
    """A data-loading worker process ended without its batch (most often the out-of-memory killer)."""


# how a worker's death reaches the main process depends on when it died: the loader's own check
# (RuntimeError "DataLoader worker (pid N) is killed by signal ..."), or a pipe or queue closed under it
WORKER_DEATH = (EOFError, ConnectionResetError, BrokenPipeError)


def worker_died(detail: str) -> LoaderWorkerDied:
    """The one line for a dead loader worker, `detail` being what the loader said."""
    oom = any(w in detail for w in ("Killed", "killed by signal", "exited unexpectedly"))
    return LoaderWorkerDied(
        f"a data-loading worker died ({detail}){', most likely for lack of memory' if oom else ''}; lower "
        "data.num_workers (--workers) or free memory, then run the same command again: a training run resumes "
        "from its last checkpoint")


def loader_worker_death(e: BaseException) -> LoaderWorkerDied | None:
    """`e` as a dead loader worker, or None when it is something else: a RuntimeError naming a
    DataLoader worker, or a closed pipe/queue raised from within the loader's machinery."""
    if isinstance(e, TinymimError):
        return None  # raised inside a worker and passed on (its own one line), not a death
    if isinstance(e, RuntimeError) and "DataLoader worker (pid" in str(e):
        first = " ".join(str(e).split()).split(". ")[0].rstrip(".")
        return worker_died(first)
    if isinstance(e, WORKER_DEATH):
        tb, files = e.__traceback__, []
        while tb is not None:
            files.append(tb.tb_frame.f_code.co_filename)
            tb = tb.tb_next
        if any("torch/utils/data" in f or "multiprocessing" in f for f in files):
            return worker_died(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    return None
