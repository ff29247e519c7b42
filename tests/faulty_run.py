"""Run the tinymim CLI with one injected fault while it writes checkpoints/last.pt.

    python faulty_run.py FAULT N [FILE] -- tinymim arguments...

FAULT: enospc  the N-th write of FILE (default last.pt) fails with ENOSPC after 64 KiB (a full disk)
       kill    the process SIGKILLs itself after writing 64 KiB of the N-th FILE (a kill mid-write)
Everything else is the real program; only the file object the writer gets is wrapped.
"""
import errno
import os
import signal
import sys

import tinymim.rundir as rundir

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


def main() -> int:
    fault, n = sys.argv[1], int(sys.argv[2])
    target = sys.argv[3] if sys.argv[3] != "--" else "last.pt"
    args = sys.argv[sys.argv.index("--") + 1:]
    real_open, writes = rundir._open_tmp, [0]

    def open_tmp(path):
        tmp, f = real_open(path)
        if path.name == target:
            writes[0] += 1
            if writes[0] == n:
                return tmp, FailingFile(f, fault)
        return tmp, f

    rundir._open_tmp = open_tmp
    from tinymim.cli import main as cli

    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
