"""Progress of long work (converting, exporting, the frozen-feature pass, training) on stderr, by tqdm.

On a terminal: a live bar with the rate and time left, once the work has taken a second. Otherwise (a log
file, CI): one plain line every `LOG_EVERY` seconds and a last one at the end, since tqdm's carriage-return
redraws would pile up into one unreadable line. Work shorter than that prints nothing, so a quick command's
error stays the one line it is. stdout is never touched: `--json` output stays clean.
"""

from __future__ import annotations

import sys
import time

LOG_EVERY = 10.0  # seconds between plain progress lines when stderr is not a terminal
QUIET = False  # set by tests and embedding code that wants no progress at all


class _Lines:
    """A file for tqdm that turns each redraw into one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.strip("\r\n")
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class Bar:
    """tqdm's bar, created only once the work has run for `delay` seconds: short work (most conversions)
    neither prints anything nor pays tqdm's import (0.1-0.3 s)."""

    def __init__(self, total: int | None, desc: str, unit: str, kwargs: dict):
        self.terminal = sys.stderr.isatty()
        self.delay = 1.0 if self.terminal else LOG_EVERY
        self.args, self.done, self.started, self.shown = (total, desc, unit, kwargs), 0, time.monotonic(), None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.shown is not None:
            self.shown.update(n)
        elif not QUIET and time.monotonic() - self.started >= self.delay and (self.args[0] is None or self.done < self.args[0]):
            self.shown = self._tqdm()  # only while work remains: a bar born at 100% says nothing

    def set_postfix_str(self, text: str) -> None:
        if self.shown is not None:
            self.shown.set_postfix_str(text)

    def _tqdm(self):
        from tqdm.auto import tqdm

        total, desc, unit, kwargs = self.args
        every = 0.1 if self.terminal else LOG_EVERY
        scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
        shown = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr if self.terminal else _Lines(sys.stderr),
                     initial=self.done, delay=1e-9, mininterval=every, maxinterval=max(every, 10.0), dynamic_ncols=self.terminal,
                     **scaled, **kwargs)
        shown.start_t -= time.monotonic() - self.started  # elapsed time from when the work began (shown from the next redraw)
        return shown

    def close(self) -> None:
        if self.shown is not None:
            self.shown.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bar(total: int | None, desc: str, unit: str = "it", **kwargs) -> Bar:
    """A progress bar for `total` units of work (`unit="B"`: bytes, shown as kB/MB/GB)."""
    return Bar(total, desc, unit, kwargs)
