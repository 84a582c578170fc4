"""The one exception type that data_prep raises for bad input.

The CLI prints it as a single ``error: ...`` line on stderr and exits with status 2, so every message must name
the file/key/value at fault and say what to do about it.
"""


class DataPrepError(Exception):
    """A user-facing error: printed as one line on stderr, exit status 2, no traceback."""
