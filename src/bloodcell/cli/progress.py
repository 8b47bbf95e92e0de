"""Progress bars for long steps (rich)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)


def progress_bar(transient: bool = False) -> Progress:
    """Bars on stderr. ``transient``: the bars go when the step ends (training, whose per-epoch lines
    carry the figures), so that a last bar is not printed after the run's summary in a log."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=transient and not console.is_terminal,  # in a log, such bars add nothing to the lines
    )


def item_progress(bar: Progress):
    """A factory of progress tasks counting items, with their rate."""

    def factory(description: str, total: int | None):
        task = bar.add_task(description, total=total, rate="")
        start = time.perf_counter()

        def advance(count: int):
            bar.advance(task, count)
            done = bar.tasks[task].completed
            bar.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):,.0f} img/s")

        return advance

    return factory


def epoch_progress(bar: Progress):
    """A factory of per-epoch progress tasks for training: one bar per epoch, with loss and images/s."""
    state: dict = {}

    def factory(description: str, total: int):
        if "task" in state:
            bar.remove_task(state["task"])
        state["task"] = bar.add_task(description, total=total, rate="")
        state["start"] = time.perf_counter()

        def step(count: int, loss: float):
            bar.advance(state["task"], count)
            done = bar.tasks[-1].completed
            rate = done / max(time.perf_counter() - state["start"], 1e-9)
            bar.update(state["task"], rate=f"loss {loss:.3f} {rate:,.0f} img/s")

        return step

    return factory
