"""Errors the user can act on. Everything else is a bug and keeps its traceback."""

import difflib


class UserError(ValueError):
    """A problem with the job, the inputs, the model or the allocation.

    Raised identically on every rank; the CLI prints ``error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 2


class StageTimeout(RuntimeError):
    """A wait (channel, collective, barrier) passed its deadline. Says who waited for what."""

    exit_code = 3


class StoreFull(RuntimeError):
    """The output file system is full (or over quota): nothing more can be written, so the job stops.

    Every item already written stays complete and visible; rerun after freeing space to render the rest.
    """

    exit_code = 4


def did_you_mean(name: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``choices``, else `` (known: a, b, ...)``: for unknown-key errors."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(choices))})"
