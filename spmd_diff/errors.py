"""Errors the user can act on. Everything else is a bug and keeps its traceback."""


class UserError(ValueError):
    """A problem with the job, the inputs, the model or the allocation.

    Raised identically on every rank; the CLI prints ``error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 2


class StageTimeout(RuntimeError):
    """A wait (channel, collective, barrier) passed its deadline. Says who waited for what."""

    exit_code = 3
