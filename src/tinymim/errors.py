"""Errors that are the user's to fix: the CLI prints their message (no traceback) and exits 1."""


class TinymimError(RuntimeError):
    """Base of every error whose message names the problem and the fix."""


class NonFiniteLossError(TinymimError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class DataError(TinymimError):
    """Data that cannot be read, with what to do about it (tinymim.data and tinymim.shards raise it)."""
