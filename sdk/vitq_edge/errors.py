"""The one exception type for mistakes a user can fix.

The CLI prints its message as a single line and exits with code 2; Python callers
catch it like any exception. Messages name the problem and what to do about it.
"""


class VitqError(Exception):
    """A user error: bad input, missing file, unsupported option."""
