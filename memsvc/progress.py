"""Progress of long operator work (repair, verify, import, upgrade): a bar redrawn in place on a terminal,
plain lines elsewhere (a log, a pipe, the server's log).

    bar = Progress("repair s1", total=8191, unit="tokens")
    for n in fed:
        bar.advance(n)
    bar.finish("12 KV entries rewritten")

On a terminal the bar is redrawn at most `redraw` times a second on one line of `stream`. Anywhere else a line
goes out when the work starts, at most every `every` seconds while it runs, and when it ends (to `line`, a
function taking a string, e.g. a logger's info; default: print to `stream`). Every line says what, how far
and how long so far.

Knows time and text streams; knows nothing about what the work is.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

WIDTH = 28


class Progress:
    def __init__(self, what: str, total: int, unit: str = "", *, stream: TextIO | None = None,
                 line: Callable[[str], None] | None = None, tty: bool | None = None, every: float = 10.0,
                 redraw: float = 10.0):
        if not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be an integer >= 0, got {total!r}")
        if not (math.isfinite(every) and every >= 0 and math.isfinite(redraw) and redraw > 0):
            raise ValueError("every must be a finite number of seconds >= 0, redraw a rate > 0")
        self.what, self.total, self.unit = what, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = (line is None and _isatty(self.stream)) if tty is None else tty
        self._line = line or (lambda text: print(text, file=self.stream, flush=True))
        self.every, self._gap = every, 1.0 / redraw
        self.done = 0
        self.started = time.monotonic()
        self._shown = -math.inf
        self._ended = False
        if not self.tty:
            self._line(f"{self.what}: started, {self._amount()}")
            self._shown = self.started
        else:
            self._draw()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        now = time.monotonic()
        if self.tty and now - self._shown >= self._gap:
            self._draw(note)
        elif not self.tty and now - self._shown >= self.every:
            self._line(f"{self.what}: {self._amount()}, {now - self.started:.1f} s" + (f" ({note})" if note else ""))
            self._shown = now

    def finish(self, note: str = "") -> float:
        """End the bar (or write the last line); returns the seconds it took."""
        seconds = time.monotonic() - self.started
        if self._ended:
            return seconds
        self._ended = True
        text = f"{self.what}: done, {self._amount()} in {seconds:.1f} s" + (f"; {note}" if note else "")
        if self.tty:
            self.stream.write("\r\x1b[K" + text + "\n")
            self.stream.flush()
        else:
            self._line(text)
        return seconds

    def _amount(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.done}{unit}"
        return f"{self.done}/{self.total}{unit} ({100 * self.done / self.total:.0f}%)"

    def _draw(self, note: str = "") -> None:
        frac = self.done / self.total if self.total else 0.0
        filled = int(WIDTH * frac)
        bar = "#" * filled + "-" * (WIDTH - filled)
        elapsed = time.monotonic() - self.started
        eta = f", {elapsed / frac - elapsed:.0f} s left" if 0 < frac < 1 and elapsed > 1 else ""
        self.stream.write(f"\r\x1b[K{self.what} [{bar}] {self._amount()} {elapsed:.0f} s{eta}"
                          + (f" {note}" if note else ""))
        self.stream.flush()
        self._shown = time.monotonic()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
