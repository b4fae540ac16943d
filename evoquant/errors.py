"""The one exception type a user is meant to see.

Everything the CLI catches and prints as a one-line ``error: ...`` is an :class:`EvoquantError`;
anything else is a bug and keeps its traceback.
"""


class EvoquantError(Exception):
    """A problem with the user's input or environment, worded for the user (one line, no traceback)."""


class EvoquantWarning(UserWarning):
    """Something the user must know that does not stop the run (layers left out, a skipped stage)."""
