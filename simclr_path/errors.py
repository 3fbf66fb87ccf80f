"""User-facing errors.

Every problem a user can fix (a bad slide, a missing resolution, a foreign file, a nonsense option)
is raised as :class:`SimclrPathError`. Its message is one line that names the file and the fix; the
CLI prints it on stderr without a traceback and exits non-zero.
"""


class SimclrPathError(Exception):
    """A problem with the user's input or environment, described in one actionable line."""

    exit_code = 1


class SlideError(SimclrPathError):
    """One slide cannot be tiled; other slides in the same run carry on."""


class StoppedBySignal(SimclrPathError):
    """A run stopped cleanly on SIGTERM (scheduler pre-emption, ``scancel``) after checkpointing."""

    exit_code = 143
