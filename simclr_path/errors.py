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


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``exc``'s message (at most ``limit`` characters), for quoting a
    library's error inside a one-line message; the exception's type name when the message is empty
    (an ``EOFError`` from a zero-byte file says nothing)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__


def check_loader_options(batch_size: int, workers: int) -> None:
    """``--batch`` and ``--workers`` of the commands that run an encoder over patches (embed, eval,
    select, predict): a batch of at least one patch, no negative number of loader workers."""
    if batch_size < 1:
        raise SimclrPathError(f"--batch must be >= 1, got {batch_size}")
    if workers < 0:
        raise SimclrPathError(f"--workers must be >= 0, got {workers}")
