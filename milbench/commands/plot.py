"""``milbench plot``: memory and time against a swept parameter, or the metric/memory trade-off."""

from __future__ import annotations

import click

from milbench.commands.options import names, record_filters


@click.command()
@click.option("--results", "results", default=None, help="results directory (searched recursively)")
@click.option("--kind", type=click.Choice(["scaling", "tradeoff", "curves"]), default="scaling", show_default=True,
              help="scaling: y metrics against --x; tradeoff: --metric against peak memory; curves: learning "
                   "curves from the records' history (per dataset and method, mean over seeds)")
@click.option("--x", "x", default="bag_size", show_default=True, help="swept config key on the x axis (scaling)")
@click.option("--y", "ys", multiple=True,
              help="y metric per panel (repeatable) [peak_mib, train_s_per_bag]; any report metric works")
@click.option("--metric", default="bag_auc", show_default=True, help="metric on the y axis (tradeoff)")
@record_filters()
@click.option("--logx", is_flag=True, help="logarithmic x axis")
@click.option("--logy", is_flag=True, help="logarithmic y axes (scaling)")
@click.option("--title", default=None, help="figure title")
@click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
              help="output file; .png, .svg or .pdf [scaling_<x>.png or tradeoff_<metric>.png]")
def plot(results: str | None, kind: str, x: str, ys: tuple[str, ...], metric: str, methods: str | None,
         datasets: str | None, presets: str | None, include_smoke: bool, logx: bool, logy: bool, title: str | None,
         output: str | None) -> None:
    """Draw how peak memory and time per bag scale with a swept parameter
    (one line per method, out-of-memory points as red ✕), or the metric
    against peak memory (--kind tradeoff).

    \b
    Examples:
      milbench plot --x bag_size --logx -o results/bag_size.png
      milbench plot --x instance_size --dataset qmnist -o results/instance_size.svg
      milbench plot --kind tradeoff --metric bag_auc -o results/tradeoff.png
      milbench plot --kind curves -o results/learning_curves.png
    """
    from milbench.errors import MilbenchError
    from milbench.plotting import FORMATS, save, scaling_figure, tradeoff_figure
    from milbench.records import existing_results_dir
    from milbench.report import load_frame, smoke_hint

    def checked(out: str) -> str:
        if not str(out).lower().endswith(FORMATS):
            raise MilbenchError(f"bad --output {out!r}: extension must be .png, .svg or .pdf")
        return out

    folder = existing_results_dir(results)
    filters = (("method", names(methods)), ("dataset", names(datasets)), ("preset", names(presets)))
    if kind == "curves":
        from milbench.curves import curves_figure
        from milbench.records import iter_records

        recs = [r for r in iter_records(str(folder)) if all(not sel or r.get(col) in sel for col, sel in filters)]
        out = checked(output or "learning_curves.png")
        click.echo(f"wrote {save(curves_figure(recs, title=title), out)}")
        return
    df = load_frame(str(folder), include_smoke)
    if df.empty:
        hint = smoke_hint(df)
        raise MilbenchError(f"no records to plot in {folder}" + (f"; {hint}" if hint else ""))
    for col, wanted in filters:
        if wanted and not df.empty:
            present = sorted(df[col].dropna().unique())
            missing = [w for w in wanted if w not in present]
            if missing:
                raise MilbenchError(f"no records with {col} {', '.join(missing)}; present: {', '.join(present)}")
            df = df[df[col].isin(wanted)]
    if kind == "scaling":
        fig = scaling_figure(df, x, ys or ("peak_mib", "train_s_per_bag"), logx=logx, logy=logy, title=title)
        out = output or f"scaling_{x}.png"
    else:
        fig = tradeoff_figure(df, metric, logx=logx, title=title)
        out = output or f"tradeoff_{metric}.png"
    click.echo(f"wrote {save(fig, checked(out))}")
