"""Progress bars for a running stage (rich), or silence when there is no console."""

from __future__ import annotations

import time

from .context import Progress


class RichProgress(Progress):
    """A rich progress bar with a label, a status note, a rate in units per second and an ETA."""

    def __init__(self, console, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RP

        self._rp = RP(TextColumn("[bold]{task.fields[label]}[/] {task.fields[note]}"), BarColumn(),
                      MofNCompleteColumn(),
                      TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                      console=console, transient=False)
        self._task = self._rp.add_task(label, total=None, label=label, note="", rate="")
        self._t0, self._done, self._unit = time.perf_counter(), 0, "rows"

    def __enter__(self):
        self._rp.start()
        return self

    def __exit__(self, *exc):
        self._rp.stop()

    def start(self, total: int, unit: str = "rows") -> None:
        self._done, self._unit, self._t0 = 0, unit, time.perf_counter()
        self._rp.update(self._task, total=total, completed=0)

    def advance(self, n: int = 1) -> None:
        self._done += n
        rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
        self._rp.update(self._task, advance=n, rate=f"{rate:.1f} {self._unit}/s")

    def note(self, text: str) -> None:
        self._rp.update(self._task, note=text)


class SilentProgress(Progress):
    """No output; usable as a context manager like :class:`RichProgress`."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def make_progress(console, label: str) -> Progress:
    """A :class:`RichProgress` on ``console``, or a :class:`SilentProgress` when it is None."""
    return SilentProgress() if console is None else RichProgress(console, label)
