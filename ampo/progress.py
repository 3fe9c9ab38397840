"""Stage progress: bars when a person watches a terminal, and throttled lines in a logger (a flow run's log)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tqdm.auto import tqdm


class TerminalProgress:
    """A `(what, done, total)` callback drawing one tqdm bar per `what`; call close() at the end."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.bars: dict[str, tqdm] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        bar = self.bars.get(what)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self.bars[what] = tqdm(total=total, desc=what, file=self.stream, leave=False, dynamic_ncols=True)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def terminal_progress() -> Callable[[str, int, int], None] | None:
    """A progress callback when stderr is a terminal, else None."""
    return TerminalProgress() if sys.stderr.isatty() else None


class LogProgress:
    """A `(what, done, total)` callback writing progress lines to a logger: the first call, the last, and in
    between a line when a new step of `every` of the total (10% by default) is reached, at most one per
    `min_interval_s`.

    For runs nobody watches on a terminal (Prefect workers, served flows): the flow passes its run logger, so the
    lines land in the flow run's logs while the stage runs.
    """

    def __init__(self, logger, every: float = 0.1, min_interval_s: float = 5.0, clock=None):
        import time

        self.logger = logger
        self.steps = max(1, round(1 / every))  # integer steps: 30/100 is step 3 of 10, not 2.9999
        self.min_interval_s = min_interval_s
        self.clock = clock or time.monotonic
        self.last: dict[str, tuple[int, float]] = {}  # what -> (decile step logged last, when)

    def __call__(self, what: str, done: int, total: int) -> None:
        now = self.clock()
        step = done * self.steps // total if total > 0 else 0
        last = self.last.get(what)
        final = total > 0 and done >= total
        if last is not None and not final and (step <= last[0] or now - last[1] < self.min_interval_s):
            return
        if last is not None and final and last[0] == -1:
            return  # the end was logged already
        self.last[what] = (-1 if final else step, now)
        percent = f" ({100 * done / total:.0f}%)" if total > 0 else ""
        self.logger.info("%s: %d/%d%s", what, done, total, percent)

    def close(self) -> None:
        self.last.clear()


class Fanout:
    """Several `(what, done, total)` callbacks as one; close() closes those that have it."""

    def __init__(self, *callbacks):
        self.callbacks = [c for c in callbacks if c is not None]

    def __call__(self, what: str, done: int, total: int) -> None:
        for callback in self.callbacks:
            callback(what, done, total)

    def close(self) -> None:
        for callback in self.callbacks:
            if hasattr(callback, "close"):
                callback.close()


def stage_progress(logger) -> Fanout:
    """Progress lines in `logger` (a flow run's log), plus bars when stderr is a terminal."""
    return Fanout(LogProgress(logger), terminal_progress())
