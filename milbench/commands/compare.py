"""``milbench compare A B``: two methods, or two results directories, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from milbench.commands.options import names, record_filters


@click.command()
@click.argument("a")
@click.argument("b")
@click.option("--results", "results", default=None, help="results directory when A and B are methods")
@record_filters(method=False)
@click.option("--metric", "metrics", multiple=True,
              help="metric to compare (repeatable) [bag_auc, bag_accuracy, dice, train_s_per_bag, peak_mib]")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "csv", "json"]), default="table",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None, help="write to a file instead of stdout")
def compare(a: str, b: str, results: str | None, datasets: str | None, presets: str | None,
            metrics: tuple[str, ...], include_smoke: bool, fmt: str, output: str | None) -> None:
    """Compare method A with method B (on the records in --results), or results
    directory A with results directory B (same methods, another machine,
    version or setting).

    \b
    Quality metrics are shown as B − A with their spread over seeds (paired by
    seed where both sides ran the same seeds); training time per bag and peak
    memory as the ratio B / A. Configurations are matched on dataset, preset
    and the swept config values both sides share.

    \b
    Examples:
      milbench compare abmil grad-accum --dataset qmnist
      milbench compare results/cpu results/gpu --format markdown -o cpu_vs_gpu.md
    """
    from milbench import compare as cmp
    from milbench.errors import MilbenchError
    from milbench.records import existing_results_dir
    from milbench.report import load_frame

    pa, pb = Path(a), Path(b)
    for arg, p in ((a, pa), (b, pb)):
        if ("/" in arg or arg.startswith(".")) and not p.is_dir():  # meant a folder (method names have no '/')
            raise MilbenchError(f"results directory {arg} does not exist; give two methods or two existing folders")
    if pa.is_dir() != pb.is_dir():
        which, other = (a, b) if pa.is_dir() else (b, a)
        raise MilbenchError(f"'{which}' is a directory but '{other}' is not: give two methods or two results directories")
    frames = []
    if pa.is_dir():
        frames = [load_frame(str(pa), include_smoke), load_frame(str(pb), include_smoke)]
        sides = (str(a), str(b))
    else:
        frames = [load_frame(str(existing_results_dir(results)), include_smoke)]
        sides = (a, b)

    def select(df: Any) -> Any:
        hidden = df.attrs.get("hidden_smoke", 0)
        for col, sel in (("dataset", datasets), ("preset", presets)):
            if sel and not df.empty:
                df = df[df[col].isin(names(sel))]
        df.attrs["hidden_smoke"] = hidden  # for the "add --include-smoke" hint
        return df

    frames = [select(f) for f in frames]
    chosen = tuple(metrics) or cmp.DEFAULT_METRICS
    if pa.is_dir():
        table = cmp.compare_dirs(frames[0], frames[1], chosen, strict=bool(metrics))
    else:
        table = cmp.compare_methods(frames[0], a, b, chosen, strict=bool(metrics))
    if fmt == "table":
        from milbench.console import make_console

        console = make_console(open(output, "w") if output else None)
        console.print(cmp.to_rich(table, *sides))
        return
    if fmt == "markdown":
        text = cmp.to_markdown(table, *sides)
    elif fmt == "csv":
        text = table.to_csv(index=False)
    else:
        text = json.dumps(json.loads(table.to_json(orient="records")), indent=2) + "\n"
    if output:
        Path(output).write_text(text)
    else:
        click.echo(text, nl=False)
