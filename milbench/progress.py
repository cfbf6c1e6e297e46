"""The progress display of ``milbench run``: a bar inside each epoch, on stderr.

The child writes a small progress file (epoch, bags done, total, running
loss); the parent polls it while it forwards the child's log, and draws a
rich progress bar under the log lines. Off when stderr is not a terminal (a
log file or CI gets the epoch lines only, never bar redraws) and in quiet runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


class RunProgress:
    """Log lines above, one live bar below: bags done/total, loss, bags/s, ETA."""

    def __init__(self, path: Path, epochs: int | None, enabled: bool | None = None, console: Any = None) -> None:
        self.path = path
        self.epochs = epochs
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.console = console
        self._progress: Any = None
        self._task: Any = None
        self._epoch = None

    def __enter__(self) -> "RunProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("bags"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console or Console(stderr=True), transient=True)
            self._progress.start()
        return self

    def log(self, text: str) -> None:
        """Forward child output: above the bar when it is shown, else straight to stderr."""
        if not text:
            return
        if self._progress is not None:
            self._progress.console.out(text.rstrip("\n"), highlight=False)
        else:
            sys.stderr.write(text)
            sys.stderr.flush()

    def poll(self) -> None:
        """Read the child's progress file and move the bar (no-op when disabled or absent)."""
        if self._progress is None:
            return
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        epoch, done, total = state.get("epoch"), int(state.get("done", 0)), int(state.get("total", 0))
        elapsed = float(state.get("elapsed_s") or 0.0)
        rate = f"{done / elapsed:.1f} bags/s" if elapsed > 0 and done else ""
        loss = state.get("loss")
        fields = {"loss": "-" if loss is None else f"{loss:.4f}", "rate": rate}
        desc = f"epoch {epoch}" + (f"/{self.epochs}" if self.epochs else "")
        if epoch != self._epoch or self._task is None:
            if self._task is not None:
                self._progress.remove_task(self._task)
            self._task = self._progress.add_task(desc, total=total, **fields)
            self._epoch = epoch
        self._progress.update(self._task, completed=done, total=total, description=desc, **fields)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
