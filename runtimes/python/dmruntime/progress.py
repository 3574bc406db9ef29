"""Progress of long work, for a terminal or a log, shared by both command lines and the Python APIs.

Work reports ``progress(label, i, n)`` (or ``progress(i, n)`` under one label) as it advances, and
whole stages through :func:`stage`. What the user sees is chosen with one option, ``progress=``:

- ``"auto"`` (the API's default): bars on a terminal, lines in a log;
- ``"bars"``: a bar per label on stderr, redrawn at most 10 times a second, then one line;
- ``"lines"``: one line when a label starts and one with its time when it ends (no carriage
  returns: what a log file or CI should hold);
- ``None`` / ``False`` / ``"off"``: nothing;
- a callable: called as ``callback(label, i, n)`` (a stage: ``i`` 0 then 1 of ``n`` 1; a message
  such as "resuming after ...": ``n`` 0).
"""

from __future__ import annotations

import contextlib
import sys
import time

MODES = ("auto", "bars", "lines", "off")
REDRAW_SECONDS = 0.1


class Progress:
    """A reporter writing bars or lines to ``stream`` (default stderr)."""

    def __init__(self, mode: str = "auto", stream=None, label: str = "progress"):
        if mode not in MODES:
            raise ValueError(f"progress must be one of {', '.join(MODES)}, None or a callable, got {mode!r}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bars" if _isatty(self.stream) else "lines"
        self.mode, self.label = mode, label
        self._open: dict[str, list[float]] = {}  # label -> [started, last drawn]

    def __call__(self, *args) -> None:
        label, i, n = (self.label, *args) if len(args) == 2 else args
        if self.mode == "off":
            return
        if n == 0:  # a message, not work: one line
            self._write(("\r\x1b[2K" if self.mode == "bars" else "") + f"{label}\n")
            return
        now = time.perf_counter()
        state = self._open.get(label)
        if state is None:
            state = self._open[label] = [now, 0.0]
            if self.mode == "lines":
                self._write(f"{label}: started ({n} steps)\n" if n > 1 else f"{label}: started\n")
        done = n > 0 and i >= n
        if done:
            del self._open[label]
            took = now - state[0]
            if self.mode == "bars":
                self._write("\r\x1b[2K")
            self._write(f"{label}: done in {_duration(took)}" + (f" ({n} steps)\n" if n > 1 else "\n"))
        elif self.mode == "bars" and now - state[1] >= REDRAW_SECONDS:
            state[1] = now
            self._write("\r\x1b[2K" + _bar(label, i, n, now - state[0]))

    def stage(self, name: str):
        """A context manager reporting ``name`` as one stage (a start and an end with its time)."""
        return stage(self, name)

    def _write(self, text: str) -> None:
        with contextlib.suppress(Exception):
            self.stream.write(text)
            self.stream.flush()


@contextlib.contextmanager
def stage(progress, name: str):
    """Report the enclosed work as stage ``name`` of ``progress`` (a reporter, a callback or None)."""
    if progress is not None:
        progress(name, 0, 1)
    yield
    if progress is not None:
        progress(name, 1, 1)


def reporter(progress="auto", label: str = "progress"):
    """A ``progress(label, i, n)`` callable from the ``progress=`` option, or None for none."""
    if progress is None or progress is False or progress == "off":
        return None
    if progress is True:
        progress = "auto"
    if isinstance(progress, str):
        return Progress(progress, label=label)
    if callable(progress):
        return progress
    raise ValueError(f"progress must be one of {', '.join(MODES)}, None or a callable, got {progress!r}")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except Exception:  # a closed or odd stream: treat as a log
        return False


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _bar(label: str, i: int, n: int, elapsed: float, width: int = 24) -> str:
    frac = min(max(i / n, 0.0), 1.0) if n else 0.0
    filled = int(frac * width)
    eta = f" <{_duration(elapsed / frac - elapsed)}" if frac > 0 and elapsed >= 1 else ""
    return f"{label} {frac:4.0%} |{'#' * filled}{'.' * (width - filled)}| {i}/{n} [{_duration(elapsed)}{eta}]"
