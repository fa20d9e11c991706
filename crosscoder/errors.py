"""The errors a user can fix: one base class, ``CrosscoderError``, that the command lines print as one message
(exit status 2). Anything else that escapes is a bug and keeps its traceback.

Each class also derives from the built-in exception a caller would expect (``ValueError`` for bad values,
``FileExistsError`` for a refused output folder, …), so ``except ValueError`` keeps working in user code.
"""

from __future__ import annotations

import warnings


class CrosscoderError(Exception):
    """Base of every error caused by the user's input, files or environment rather than by a bug."""


class ConfigError(CrosscoderError, ValueError):
    """A configuration value (flag, config field, function argument) is invalid."""


class DataError(CrosscoderError, ValueError):
    """Training or evaluation data is unusable: a dataset, a model pair, an activation file, a batch source."""


class InputNotFoundError(CrosscoderError, FileNotFoundError):
    """A file, folder or Hub repository named by the user does not exist or cannot be reached."""


class OutputExistsError(CrosscoderError, FileExistsError):
    """Writing would overwrite finished work (a run folder, a report); nothing was written."""


class CacheError(DataError):
    """An activation cache cannot be built or read as asked."""


class CacheIntegrityError(CacheError):
    """A cache shard is missing, truncated or does not match its recorded checksum."""


class CheckpointError(CrosscoderError, RuntimeError):
    """A training checkpoint is missing, corrupt, or does not fit the run being resumed."""


class DictionaryFormatError(CrosscoderError, ValueError):
    """A saved dictionary cannot be read: unknown format, newer format version, or inconsistent tensors."""


class OutOfMemoryError(CrosscoderError, MemoryError):
    """A step or a dictionary does not fit in the device's memory at the requested sizes."""


class PushError(CrosscoderError, RuntimeError):
    """Pushing to the Hugging Face Hub failed; the local files are complete."""


class NonFiniteError(CrosscoderError, RuntimeError):
    """A batch or a loss became NaN/Inf; training stopped without writing a checkpoint."""


class EndpointError(CrosscoderError, RuntimeError):
    """An LLM endpoint (OpenAI-compatible chat completions) refused a request or sent an unreadable reply; ``status``
    is the HTTP status it answered with (None when it did not answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class EndpointUnreachableError(EndpointError):
    """An LLM endpoint did not answer at all (connection refused, timeouts) after every retry."""


def show_warnings_as_lines() -> None:
    """For the command lines: print each warning as one line, ``warning: <message>``, as errors are printed (not
    Python's file, line number and source line)."""
    warnings.formatwarning = lambda message, category, filename, lineno, line=None: f"warning: {message}\n"
