"""User-facing errors.

A `RanklensError` carries a one-line message that names the bad value and what was expected; the CLI prints it
without a traceback and exits non-zero. Anything else that escapes is a bug and keeps its traceback.
"""


class RanklensError(Exception):
    """Bad input from the user (unknown model, corpus, site, a directory holding another run, ...)."""
