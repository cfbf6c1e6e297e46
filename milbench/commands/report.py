"""``milbench report``: comparison tables from the records."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--results", "results", default=None, help="results directory (searched recursively)")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--metric", "metrics", multiple=True,
              help="metric to show (repeatable): bag_auc, bag_accuracy, dice, mean_dice, train_s_per_bag, peak_mib, ...")
@click.option("--method", "methods", default=None, help="only these methods (comma-separated)")
@click.option("--dataset", "datasets", default=None, help="only these datasets (comma-separated)")
@click.option("--preset", "presets", default=None, help="only these presets (comma-separated)")
@click.option("--include-smoke", is_flag=True, help="include --smoke runs (excluded by default)")
@click.option("--all-runs", is_flag=True,
              help="count every record; by default a point (config hash × seed) rerun after an interruption "
                   "counts once, by its latest ok record")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="write to a file instead of stdout")
def report(results, fmt, metrics, methods, datasets, presets, include_smoke, all_runs, output):
    """Compare runs: methods as rows, datasets as column groups, mean ± std over seeds.

    \b
    peak_mib is NVML's peak GPU memory of the run's process where a GPU was
    used, else the run's peak CPU resident memory. Failed, out-of-memory and
    timed-out runs are counted in the `runs` column, never dropped.
    """
    from milbench.records import results_dir
    from milbench.report import (DEFAULT_METRICS, failure_notes, failure_notes_markdown, latest_per_point,
                                 load_frame, summarize, to_markdown, to_rich)

    df = load_frame(str(results_dir(results)), include_smoke)
    if not all_runs:
        df = latest_per_point(df)
    for col, sel in (("method", methods), ("dataset", datasets), ("preset", presets)):
        if sel and not df.empty:
            df = df[df[col].isin([s.strip() for s in sel.split(",")])]
    summary = summarize(df, metrics or DEFAULT_METRICS)
    if fmt == "table":
        from rich.markup import escape

        from milbench.console import make_console

        console = make_console(open(output, "w") if output else None)
        console.print(to_rich(summary, title=f"milbench report — {results_dir(results)}"))
        if df.empty:
            console.print("no records found (smoke runs are hidden unless --include-smoke)")
        for note in failure_notes(df):
            console.print(f"[red]no ok run:[/red] {escape(note)}")
        return
    if fmt == "markdown":
        text = to_markdown(summary) + failure_notes_markdown(df)
    elif fmt == "csv":
        text = summary.drop(columns=["cell"]).to_csv(index=False)
    else:
        text = json.dumps(json.loads(summary.drop(columns=["cell"]).to_json(orient="records")), indent=2) + "\n"
    if output:
        from pathlib import Path

        Path(output).write_text(text)
    else:
        click.echo(text, nl=False)
