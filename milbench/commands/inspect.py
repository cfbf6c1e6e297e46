"""``milbench list`` and ``milbench plugins``: what is installed and where data is."""

from __future__ import annotations

import click


@click.command("list")
@click.option("--data-root", default=None, help="also show where datasets would be read from this root")
def list_cmd(data_root):
    """Every key a run reads, with its default and who declares it: the training protocol's
    keys (the harness), each method's keys, each dataset's keys and the protocol defaults it
    sets; where each dataset's data is. Plugins are validated as they load: a broken one is
    listed in red with the reason."""
    from milbench.console import make_console
    from rich.markup import escape
    from rich.table import Table

    from milbench.plugins import get_registry

    from milbench.protocol import PROTOCOL_PARAMS

    reg = get_registry()
    console = make_console()
    t = Table(title="training protocol (the same for every method; a dataset may set these for all methods on it)")
    for col in ("key", "default", "valid", "tuned by `milbench tune`", "what it does"):
        t.add_column(col)
    for key, p in PROTOCOL_PARAMS.items():
        t.add_row(key, escape(str(p.default)), escape(p.describe()),
                  escape(f"{p.search[0]} {list(p.search[1:])}") if p.search else "—", escape(p.help))
    console.print(t)
    t = Table(title="methods")
    for col in ("name", "supervision", "plugin", "description", "method keys (default)", "sets dataset keys",
                "presets"):
        t.add_column(col)
    for name in sorted(reg.methods):
        m = reg.methods[name]
        keys = ", ".join(f"{k}={p.default}" for k, p in m.params.items())
        sets = ", ".join(f"{k}={v}" for k, v in m.defaults.items() if k not in m.params) or "—"
        t.add_row(name, m.supervision, reg.owners[("method", name)], escape(m.description), escape(keys),
                  escape(sets), ", ".join(m.presets) or "—")
    console.print(t)
    t = Table(title="datasets")
    for col in ("name", "plugin", "description", "dataset keys (default)", "protocol defaults it sets", "presets",
                "data"):
        t.add_column(col)
    for name in sorted(reg.datasets):
        d = reg.datasets[name]
        keys = ", ".join(f"{k}={d.defaults.get(k, p.default)}" for k, p in d.params.items())
        protocol = ", ".join(f"{k}={v}" for k, v in d.defaults.items() if k in PROTOCOL_PARAMS) or "—"
        try:
            st = d.status(data_root)
            where = f"{st.source}: {st.detail}" + (f" [{st.root}]" if st.root else "")
        except Exception as exc:  # a dataset's status must not hide the others
            where = f"status failed: {exc}"
        t.add_row(name, reg.owners[("dataset", name)], escape(d.description), escape(keys), escape(protocol),
                  ", ".join(d.presets) or "—", escape(where))
    console.print(t)
    for (kind, name), why in sorted(reg.invalid.items()):
        console.print(f"[red]{kind} '{escape(name)}' is unusable: {escape(why)}[/red]")
    for (kind, name), owners in sorted(reg.conflicts.items()):
        console.print(f"[red]{kind} '{name}' is registered by plugins {' and '.join(owners)}: unusable until one is removed[/red]")


@click.command("plugins")
def plugins_cmd():
    """Installed plugins: name, version, source, status and what they registered."""
    from milbench.console import make_console
    from rich.markup import escape
    from rich.table import Table

    from milbench.plugins import get_registry

    reg = get_registry(warn=False)
    t = Table(title="plugins (entry-point group 'milbench')")
    for col in ("name", "version", "source", "module", "status", "registered / error"):
        t.add_column(col)
    for p in reg.plugins:
        status = {"ok": "[green]ok[/green]", "broken": "[red]broken[/red]", "conflict": "[yellow]conflict[/yellow]"}[p.status]
        t.add_row(p.name, p.version or "—", p.source, p.module, status, escape(p.error or ", ".join(p.registered)))
    make_console().print(t)
