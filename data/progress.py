"""Progress that suits where output goes: a live bar on a terminal, plain lines in log files.

``keras.utils.Progbar`` redraws its bar with ``\\r``, backspaces and ANSI colours whenever it runs
on a POSIX system, terminal or not, so a log file fills with escape codes. :func:`progress` gives
a live Progbar only when ``stream`` is a terminal; otherwise it writes one plain line now and then
(every ``interval`` seconds, and once at the end)::

    decoding: 4,096/11,562 images (35%), 12 s

Both write to ``stream`` (stderr by default), so stdout stays free for results (JSON summaries).
TensorFlow-free; keras is imported only for the terminal bar.
"""
import contextlib
import sys
import time

#: Seconds between two plain lines when the output is not a terminal.
DEFAULT_INTERVAL = 10.0


def _is_tty(stream):
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class _PlainProgress:
    """One plain line per ``interval`` seconds and one at the end; no ``\\r``, no escape codes."""

    def __init__(self, total, unit, stream, label, interval):
        self.total, self.unit, self.stream = int(total), unit, stream
        self.label, self.interval = label, float(interval)
        self.start = time.monotonic()
        self.last = self.start
        self.done = 0
        self.finished = False

    def _line(self, values):
        unit = self.unit if self.total == 1 else self.unit + "s"
        text = f"{self.done:,}/{self.total:,} {unit}"
        if self.total > 0:
            text += f" ({100.0 * self.done / self.total:.0f}%)"
        text += f", {time.monotonic() - self.start:.0f} s"
        for name, value in values or ():
            text += f", {name}: {value:,}" if isinstance(value, int) else f", {name}: {value}"
        return f"{self.label}: {text}" if self.label else text

    def update(self, done, values=None, finalize=None):
        """``done``: items finished so far (absolute); ``values``: [(name, value)] to show."""
        self.done = int(done)
        if finalize is None:
            finalize = self.done >= self.total
        now = time.monotonic()
        if self.finished or not (finalize or now - self.last >= self.interval):
            return
        self.last = now
        self.finished = bool(finalize)
        try:
            self.stream.write(self._line(values) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream must not stop the work
            pass


class _LiveProgress:
    """keras.utils.Progbar drawn on ``stream`` (Progbar itself always writes to stdout)."""

    def __init__(self, total, unit, stream, label, stateful_metrics):
        from keras.utils import Progbar

        self.stream = stream
        if label:
            stream.write(f"{label}:\n")
        with contextlib.redirect_stdout(stream):
            self.bar = Progbar(int(total), unit_name=unit, stateful_metrics=stateful_metrics)

    def update(self, done, values=None, finalize=None):
        with contextlib.redirect_stdout(self.stream):
            self.bar.update(int(done), values=values, finalize=finalize)


class _NoProgress:
    def update(self, done, values=None, finalize=None):
        del done, values, finalize


def progress(total, unit="image", stream=None, label=None, interval=DEFAULT_INTERVAL,
             enabled=True, stateful_metrics=None):
    """A progress reporter for ``total`` items: call ``.update(done, values=None, finalize=None)``.

    Args:
        total: number of items (>= 0).
        unit: singular name of an item ("image", "photo"); "s" is added for the plural.
        stream: where to write; None means ``sys.stderr`` at call time.
        label: what is being done ("decoding"), shown before the counts.
        interval: seconds between plain lines when ``stream`` is not a terminal.
        enabled: False gives a reporter that writes nothing.
        stateful_metrics: names in ``values`` shown as given rather than averaged (terminal bar;
            plain lines always show them as given).
    Returns:
        an object with ``update(done, values=None, finalize=None)``; ``done`` is absolute.
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        return _NoProgress()
    if _is_tty(stream):
        return _LiveProgress(total, unit, stream, label, stateful_metrics)
    return _PlainProgress(total, unit, stream, label, interval)
