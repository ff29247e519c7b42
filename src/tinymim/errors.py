"""Errors that are the user's to fix: the CLI prints their message (no traceback) and exits 1."""


class TinymimError(RuntimeError):
    """Base of every error whose message names the problem and the fix."""


class NonFiniteLossError(TinymimError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
