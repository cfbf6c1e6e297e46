"""``milbench report``: comparison tables from the records."""

from __future__ import annotations

import json
from typing import Any

import click

from milbench.commands.options import names, record_filters


def fit_tables(console: Any, summary: Any, title: str) -> list:
    """One rich table with datasets as column groups when it fits the console at its natural
    width; otherwise one table per dataset, so a narrow terminal gets whole cells rather
    than a wide table wrapped into fragments."""
    from rich.measure import Measurement

    from milbench.report import to_rich

    whole = to_rich(summary, title=title)
    if summary.empty or summary["dataset"].nunique() < 2:
        return [whole]
    if Measurement.get(console, console.options.update(max_width=100_000), whole).maximum <= console.width:
        return [whole]
    return [to_rich(summary[summary["dataset"] == d], title=f"{title} — {d}")
            for d in dict.fromkeys(summary.sort_values("dataset")["dataset"])]


@click.command()
@click.option("--results", "results", default=None, help="results directory (searched recursively)")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default=None,
              help="table (rich) on a terminal; markdown when stdout is not a terminal or with --output [auto]")
@click.option("--metric", "metrics", multiple=True,
              help="metric to show (repeatable): bag_auc, bag_accuracy, dice, mean_dice, train_s_per_bag, peak_mib, ...")
@record_filters()
@click.option("--protocol", "protocols", default=None,
              help="only records trained under these protocol hashes (comma-separated); a table refuses to mix them")
@click.option("--all-runs", is_flag=True,
              help="count every record; by default a point (config hash × seed) rerun after an interruption "
                   "counts once, by its latest ok record")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="write to a file instead of stdout")
def report(results: str | None, fmt: str | None, metrics: tuple[str, ...], methods: str | None, datasets: str | None,
           presets: str | None, include_smoke: bool, protocols: str | None, all_runs: bool, output: str | None) -> None:
    """Compare runs: methods as rows, datasets as column groups, mean ± std over seeds.

    \b
    peak_mib is NVML's peak GPU memory of the run's process where a GPU was
    used, else the run's peak CPU resident memory. Failed, out-of-memory and
    timed-out runs are counted in the `runs` column, never dropped.
    """
    import sys

    from milbench.records import existing_results_dir, results_dir
    from milbench.report import (DEFAULT_METRICS, check_one_protocol, DID_NOT_LEARN_HELP, failure_notes, failure_notes_markdown,
                                 latest_per_point, learning_notes, load_frame, notes_markdown, smoke_hint, summarize,
                                 to_markdown)

    if fmt is None:  # a rich table wraps into fragments in a pipe or a file; markdown stays readable
        fmt = "table" if output is None and sys.stdout.isatty() else "markdown"
    df = load_frame(str(existing_results_dir(results)), include_smoke)
    hidden = df.attrs.get("hidden_smoke", 0)
    if not all_runs:
        df = latest_per_point(df)
    for col, sel in (("method", methods), ("dataset", datasets), ("preset", presets), ("protocol", protocols)):
        if sel and not df.empty:
            df = df[df[col].isin(names(sel))]
    check_one_protocol(df)
    df.attrs["hidden_smoke"] = hidden  # filters need not carry attrs along
    summary = summarize(df, metrics or DEFAULT_METRICS)
    if fmt == "table":
        from rich.markup import escape

        from milbench.console import make_console

        console = make_console(open(output, "w") if output else None)
        title = f"milbench report — {results_dir(results)}"
        for table in fit_tables(console, summary, title):
            console.print(table)
        if df.empty:
            console.print("no records found")
        for note in failure_notes(df):
            console.print(f"[red]no ok run:[/red] {escape(note)}")
        notes = learning_notes(df)
        if notes:
            console.print(escape(DID_NOT_LEARN_HELP))
        for note in notes:
            console.print(f"[yellow]did not learn:[/yellow] {escape(note)}")
        hint = smoke_hint(df)
        if hint:
            console.print(escape(hint))
        return
    if fmt == "markdown":
        text = to_markdown(summary) + failure_notes_markdown(df) + notes_markdown(df)
    elif fmt == "csv":
        text = summary.drop(columns=["cell"]).to_csv(index=False)
    else:
        text = json.dumps(json.loads(summary.drop(columns=["cell"]).to_json(orient="records")), indent=2) + "\n"
    if fmt in ("csv", "json") and smoke_hint(df):
        click.echo(f"milbench: note: {smoke_hint(df)}", err=True)  # stdout stays machine-readable
    if output:
        from pathlib import Path

        Path(output).write_text(text)
    else:
        click.echo(text, nl=False)
