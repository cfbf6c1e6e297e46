"""User-facing errors.

A :class:`MilbenchError` is bad input or a missing resource: the CLI prints its
message as one line and exits non-zero, never with a traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class MilbenchError(Exception):
    """An error whose message is meant for the user, printed as one line."""


class ConfigError(MilbenchError):
    """An unknown config key, a value of the wrong type or out of range."""


class DataError(MilbenchError):
    """Data that is missing, incomplete or corrupt; says where milbench looked."""


class PluginError(MilbenchError):
    """A plugin registration problem (for example two plugins claim one name)."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> MilbenchError:
    """The one-line error for an unknown method/dataset/preset/key name."""
    valid = sorted(valid)
    return MilbenchError(
        f"unknown {kind} '{name}'{did_you_mean(name, valid)}; valid: {', '.join(valid) or '(none)'}"
    )


def first_line(exc: BaseException) -> str:
    """``ExceptionType: first line of its message`` (just the type when the message is empty):
    how an exception that is not a :class:`MilbenchError` is shown in one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
