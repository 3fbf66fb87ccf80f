"""Progress and log lines on stderr (rich); stdout stays free for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console: Console | None = None


def stderr_console() -> Console:
    global _console
    if _console is None:
        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


def log(message: str) -> None:
    """One plain line on stderr (markup off, so slide names with brackets print as they are)."""
    stderr_console().print(message, markup=False)


class Reporter:
    """Slides and patches progress for ``tile``; a no-op when disabled (library use, tests)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._progress: Progress | None = None

    def start(self, slides: int, done: int = 0, fingerprints: int = 0) -> None:
        """Show the bars: slides (``done`` of them already), patches, and, when ``fingerprints``,
        the slides fingerprinted so far (tiling starts before they all are)."""
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr_console(),
            transient=False,
            disable=not stderr_console().is_terminal,
        )
        self._slides = self._progress.add_task("slides", total=slides, completed=done, rate="")
        self._patches = self._progress.add_task("patches", total=0, rate="")
        self._fingerprints = None
        if fingerprints:
            self._fingerprints = self._progress.add_task("fingerprinting", total=fingerprints, rate="")
        self._progress.start()

    def fingerprinted(self, n: int = 1) -> None:
        if self._progress is not None and self._fingerprints is not None:
            self._progress.advance(self._fingerprints, n)
            task = self._progress.tasks[self._fingerprints]
            if task.finished:
                self._progress.update(self._fingerprints, description="fingerprinted")

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(message, markup=False)
        else:
            log(message)

    def add_patches(self, n: int) -> None:
        if self._progress is not None:
            task = self._progress.tasks[self._patches]
            self._progress.update(self._patches, total=(task.total or 0) + n)

    def patches_done(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._patches, n)
            task = self._progress.tasks[self._patches]
            speed = task.speed
            self._progress.update(self._patches, rate=f"{speed:,.0f} patches/s" if speed else "")

    def advance_slide(self) -> None:
        if self._progress is not None:
            self._progress.advance(self._slides)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

