"""The one exception type for usage errors: every CLI prints it as one `error:` line and exits with code 2.

Each layer raises its own subclass (bad data, an unusable model, a broken checkpoint, bad flags), so a caller
can tell them apart, and the CLIs catch them all as UsageError."""

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input from the user: flags, configuration, files, models. Reported as one line, exit code 2."""
