"""One place that decides how rich renders: full width when piped or written
to a file (tables must not be truncated in logs and tests), terminal width otherwise."""

from __future__ import annotations

import sys
from typing import IO, Any


def make_console(file: IO[str] | None = None, stderr: bool = False) -> Any:
    from rich.console import Console

    stream = file or (sys.stderr if stderr else sys.stdout)
    wide = file is not None or not stream.isatty()
    return Console(file=stream, width=250 if wide else None, stderr=stderr and file is None)
