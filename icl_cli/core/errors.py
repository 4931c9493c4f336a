"""The error types the command layer turns into one line on stderr and an exit code."""


class IclError(Exception):
    """A domain error: bad input or a failed step. The message says what failed and how to fix it."""

    exit_code = 1


class IntegrityError(IclError):
    """An artifact whose files do not match its manifest (exit 3)."""

    exit_code = 3
