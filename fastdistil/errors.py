"""The one exception type for usage errors: every CLI prints it as one `error:` line and exits with code 2.

Each layer raises its own subclass (bad data, an unusable model, a broken checkpoint, bad flags), so a caller
can tell them apart, and the CLIs catch them all as UsageError."""

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input from the user: flags, configuration, files, models. Reported as one line, exit code 2."""


def first_line(e: Exception, limit: int = 200) -> str:
    """The first line of an exception's message (or its type's name), cut to `limit` characters: what a one-line
    error quotes of an error from a library."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
