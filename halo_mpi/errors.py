"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class HaloError(Exception):
    """A problem with the user's input or environment, with a message that says what to do."""

    exit_code = 2
