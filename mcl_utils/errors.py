"""The one error type that the CLI shows to users as a single line."""


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix, in one line."""
