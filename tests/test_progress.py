"""The in-epoch progress display of ``milbench run``: the child's progress file
and the parent's bar (bags done/total, running loss, bags/s, ETA)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from milbench.child import _ProgressFile
from milbench.progress import RunProgress


def test_child_progress_file_is_throttled_but_ends_each_epoch(tmp_path):
    path = tmp_path / "progress.json"
    prog = _ProgressFile(str(path), every_s=3600)
    prog.update(1, 1, 50, 0.9)           # first write of the epoch
    first = json.loads(path.read_text())
    prog.update(1, 2, 50, 0.8)           # throttled: not written
    assert json.loads(path.read_text()) == first
    prog.update(1, 50, 50, 0.5)          # the epoch's last bag is always written
    state = json.loads(path.read_text())
    assert (state["epoch"], state["done"], state["total"], state["loss"]) == (1, 50, 50, 0.5)
    _ProgressFile(None).update(1, 1, 1, 0.1)  # no path: a no-op, never an error


def test_bar_shows_bags_loss_and_rate(tmp_path):
    path = tmp_path / "progress.json"
    path.write_text(json.dumps({"epoch": 2, "done": 40, "total": 200, "loss": 0.5123, "elapsed_s": 4.0}))
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with RunProgress(path, epochs=10, enabled=True, console=console) as show:
        show.poll()
        show._progress.refresh()
        show.log("[milbench] epoch 1: train_loss 0.7\n")
    text = out.getvalue()
    assert "epoch 2/10" in text and "40/200" in text and "loss 0.5123" in text and "10.0 bags/s" in text
    assert "[milbench] epoch 1" in text  # log lines are printed above the bar


def test_no_bar_without_a_terminal(tmp_path, capsys):
    show = RunProgress(tmp_path / "missing.json", epochs=3)  # pytest's stderr is not a TTY
    with show:
        show.poll()
        show.log("epoch line\n")
    assert not show.enabled and capsys.readouterr().err == "epoch line\n"
