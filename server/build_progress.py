"""Model-build progress on the operator's terminal: rich bars on a TTY, plain lines elsewhere.

``build_progress()`` is a context manager giving the ``progress`` callback for
``build_profiles`` (and ``start_rollout``, which builds what is missing). On
a terminal it draws one bar per profile (its candidates) and one for the
candidate in progress (its steps: transform, convert, measure), and keeps a
line per finished candidate above them. Anywhere else (a pipe, a CI log,
click's test runner) each event is one plain line, ``str(event)``.

The build swaps file descriptor 2 for a temporary file around native code
(``server.native_output``), so what we draw goes to a duplicate of the
terminal's descriptor taken before the build starts.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from server.compress.progress import VARIANT_STEPS, BuildEvent, ProgressCallback, Step


@contextlib.contextmanager
def build_progress(stream: TextIO | None = None) -> Iterator[ProgressCallback]:
    """The callback that shows build events on ``stream`` (default: the terminal behind stderr)."""
    with _terminal(stream) as out:
        if out.isatty():
            view = _BarView(out)
            view.progress.start()
            try:
                yield view.show
            finally:
                view.progress.stop()
        else:
            yield lambda event: _write_line(out, str(event))


def _write_line(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()


@contextlib.contextmanager
def _terminal(stream: TextIO | None) -> Iterator[TextIO]:
    """``stream``, or a duplicate of stderr's file descriptor that outlives fd 2's swaps."""
    if stream is not None:
        yield stream
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # click's CliRunner, a StringIO: no descriptor to swap
        yield sys.stderr
        return
    sys.stderr.flush()
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    with os.fdopen(os.dup(fd), "w", encoding=encoding, errors="replace") as out:
        yield out


class _BarView:
    """rich bars for one build; ``show`` takes the events."""

    def __init__(self, out: TextIO) -> None:
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), console=Console(file=out, stderr=True), redirect_stdout=False,
            redirect_stderr=False, transient=False,
        )
        self.profiles: dict[str, TaskID] = {}  # profile -> its task id
        self.variant: TaskID | None = None  # the candidate in progress
        self.steps: tuple[Step, ...] = ()

    def show(self, event: BuildEvent) -> None:
        progress = self.progress
        if event.step is Step.PROFILE:
            self.profiles[event.profile] = progress.add_task(f"[bold]{event.profile}[/]", total=event.total)
            return
        if event.step is Step.VARIANT:
            self._end_variant()
            self.steps = VARIANT_STEPS
            self.variant = progress.add_task(f"  {event.recipe} ({event.index}/{event.total})",
                                             total=len(self.steps))
            return
        if event.step is Step.DONE:
            self._end_variant()
            mark = "[red]✗[/]" if event.failed else "[green]✓[/]"
            progress.console.print(f"{mark} {event.profile}: {event.recipe}  {event.detail}", highlight=False)
            if event.profile in self.profiles:
                progress.advance(self.profiles[event.profile])
            return
        if event.step is Step.DEVICE:  # benchmark-only trials on devices: one line as each is sent and answered
            self._end_variant()
            mark = "[red]✗[/]" if event.failed else "[cyan]⇄[/]"
            progress.console.print(f"{mark} {event}", highlight=False)
            return
        if self.variant is not None:  # TRANSFORM, CONVERT, MEASURE
            done = self.steps.index(event.step) if event.step in self.steps else 0
            description = f"  {event.recipe} ({event.index}/{event.total}): {event.step.value}"
            progress.update(self.variant, completed=done, description=f"{description} {event.detail}".rstrip())

    def _end_variant(self) -> None:
        if self.variant is not None:
            self.progress.remove_task(self.variant)
            self.variant = None
