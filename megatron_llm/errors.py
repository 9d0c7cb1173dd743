"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad config, bad data or an impossible layout. Entry points print it as one line and exit 2."""

    exit_code = 2
