"""User-facing errors.

Raise :class:`NaglError` for anything the user can fix (bad input, missing file,
bad setting). The message must name the file or setting and say what to do. The
CLI prints it without a traceback and exits with status 2.
"""


class NaglError(Exception):
    """An error caused by input or environment that the user can fix."""


class MissingDataError(NaglError):
    """A dataset archive or model weights file is not where it must be."""
