"""Progress bars that behave in logs.

On a terminal (or in a notebook) they are ordinary live ``tqdm`` bars. When stderr is not a terminal (CI logs,
``nohup``, a cluster job's log file) a carriage-return refresh would write hundreds of updates per minute into the
log, so the bar instead prints one whole line at most every ``LOG_INTERVAL_SECONDS`` (and at the end).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm as terminal_tqdm
from tqdm.auto import tqdm as auto_tqdm

_IN_NOTEBOOK = any(cls.__module__ == "tqdm.notebook" for cls in auto_tqdm.__mro__)

#: Seconds between the lines a progress bar writes when stderr is not a terminal.
LOG_INTERVAL_SECONDS = 30.0


class _LineWriter:
    """A file for tqdm that turns each carriage-return refresh into one line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").replace("\x1b[A", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any) -> terminal_tqdm:
    """A ``tqdm`` bar over ``iterable`` (``kwargs`` as for tqdm: total, desc, unit, …); ``enabled=False`` shows
    nothing. Live on a terminal or in a notebook, a line every ``LOG_INTERVAL_SECONDS`` elsewhere."""
    if not enabled:
        return terminal_tqdm(iterable, disable=True, **kwargs)
    if _IN_NOTEBOOK or _is_terminal(sys.stderr):
        return auto_tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_SECONDS)
    kwargs.setdefault("maxinterval", LOG_INTERVAL_SECONDS * 2)
    return terminal_tqdm(iterable, file=_LineWriter(sys.stderr), ascii=True, dynamic_ncols=False, ncols=100, **kwargs)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Show or hide transformers' own progress bars (loading and saving weights) for the duration of the block;
    hidden as well when stderr is not a terminal, where each would flood the log."""
    import transformers

    logging = transformers.utils.logging
    was_enabled = logging.is_progress_bar_enabled()
    if enabled and (_IN_NOTEBOOK or _is_terminal(sys.stderr)):
        logging.enable_progress_bar()
    else:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
        else:
            logging.disable_progress_bar()
