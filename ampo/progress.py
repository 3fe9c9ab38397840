"""Progress bars for long stages when a person watches a terminal; silent otherwise (logs, CI, Prefect workers)."""

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
