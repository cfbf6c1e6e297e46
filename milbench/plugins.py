"""Plugin discovery and registration, built-ins and third parties alike.

Every plugin is an entry point in the ``milbench`` group; the built-in methods
and datasets are registered exactly like a third party's. Each entry point is
loaded on its own and each plugin's hooks are called on their own, so a plugin
that fails to import, raises in a hook, or claims a name another plugin owns is
skipped and reported while the rest keep working.

``MILBENCH_PLUGINS=a,b`` loads only the named entry points (tests use it);
``MILBENCH_PLUGINS=-c`` loads all but ``c``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from milbench import hookspecs
from milbench.errors import PluginError, first_line, unknown_name

GROUP = "milbench"
ENV_FILTER = "MILBENCH_PLUGINS"
_KINDS = ("method", "dataset", "metric")


@dataclass
class PluginInfo:
    """One entry point: where it came from and whether it loaded."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    status: str = "ok"  # ok | broken (import or hook failed) | conflict (a name clash)
    error: str | None = None
    registered: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return "built-in" if self.distribution == "milbench" else (self.distribution or "entry point")


class Registry:
    """Everything the plugins registered, by kind and name, with their owners."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {k: {} for k in _KINDS}
        self.owners: dict[tuple[str, str], str] = {}
        self.conflicts: dict[tuple[str, str], list[str]] = {}
        self.invalid: dict[tuple[str, str], str] = {}  # registered but refused by check_registered
        self.plugins: list[PluginInfo] = []
        self.command_hooks: list[tuple[PluginInfo, Callable[..., None]]] = []

    @property
    def methods(self) -> dict[str, Any]:
        return self.items["method"]

    @property
    def datasets(self) -> dict[str, Any]:
        return self.items["dataset"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.items["metric"]

    def get(self, kind: str, name: str) -> Any:
        """The registered object, or a one-line error (unknown name, conflict, invalid plugin)."""
        if (kind, name) in self.invalid:
            raise PluginError(f"{kind} '{name}' is unusable: {self.invalid[(kind, name)]}")
        if (kind, name) in self.conflicts:
            owners = " and ".join(repr(o) for o in self.conflicts[(kind, name)])
            raise PluginError(
                f"{kind} '{name}' is registered by both plugins {owners}; "
                f"uninstall one or limit plugins with {ENV_FILTER}"
            )
        try:
            return self.items[kind][name]
        except KeyError:
            raise unknown_name(kind, name, self.items[kind]) from None

    def method(self, name: str) -> Any:
        return self.get("method", name)

    def dataset(self, name: str) -> Any:
        return self.get("dataset", name)

    def broken(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.status != "ok"]

    def _add(self, kind: str, obj: Any, plugin: PluginInfo) -> None:
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"registered {kind} {obj!r} has no name")
        key = (kind, name)
        try:
            check_registered(kind, obj)
        except Exception as exc:  # a malformed plugin object must not take the CLI down either
            why = str(exc) if isinstance(exc, PluginError) else f"{kind} '{name}' is malformed: {first_line(exc)}"
            self.invalid[key] = why
            plugin.status, plugin.error = "broken", why
            return
        if key in self.conflicts:
            self.conflicts[key].append(plugin.name)
            return
        if key in self.owners:
            first = self.owners[key]
            self.conflicts[key] = [first, plugin.name]
            del self.items[kind][name]
            msg = f"duplicate {kind} '{name}' registered by plugins '{first}' and '{plugin.name}'"
            for p in self.plugins + [plugin]:
                if p.name in (first, plugin.name):
                    p.status, p.error = "conflict", msg
            return
        self.owners[key] = plugin.name
        self.items[kind][name] = obj
        plugin.registered.append(f"{kind}:{name}")


def check_registered(kind: str, obj: Any) -> None:
    """Refuse (one-line :class:`PluginError`) what a plugin registers but cannot work:
    an object of the wrong class, ``params`` that are not :class:`Param`, a method that
    sets a protocol key, a dataset whose layers set keys it does not declare. Checked
    when the registry loads, so ``milbench list`` and ``milbench plugins`` show the
    plugin as broken with the reason, rather than every run failing later."""
    from milbench.contract import Dataset, Method, Metric
    from milbench.config import Param
    from milbench.protocol import check_dataset_layers, check_method_layers

    base = {"method": Method, "dataset": Dataset, "metric": Metric}[kind]
    if not isinstance(obj, base):
        raise PluginError(f"registered {kind} {obj!r} is not a milbench.api.{base.__name__}")
    if kind == "metric":
        if not callable(obj.fn):
            raise PluginError(f"metric '{obj.name}' fn is not callable")
        return
    bad = sorted(k for k, p in obj.params.items() if not isinstance(p, Param))
    if bad:
        raise PluginError(f"{kind} '{obj.name}' params {', '.join(bad)} are not milbench.api.Param")
    if kind == "method":
        check_method_layers(obj)
    else:
        check_dataset_layers(obj)


def _selected(names: list[str]) -> set[str]:
    spec = os.environ.get(ENV_FILTER, "").strip()
    if not spec or spec.lower() == "all":
        return set(names)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if all(p.startswith("-") for p in parts):
        return set(names) - {p[1:] for p in parts}
    return {p for p in parts if not p.startswith("-")}


def _entry_points() -> list[metadata.EntryPoint]:
    eps = metadata.entry_points(group=GROUP)
    seen: dict[str, metadata.EntryPoint] = {}
    for ep in eps:  # the same dist can be visible twice (editable + path); keep the first
        seen.setdefault(ep.name, ep)
    return sorted(seen.values(), key=lambda e: e.name)


def load_registry(extra_plugins: list[tuple[str, Any]] = ()) -> Registry:
    """Load every selected entry point (and ``extra_plugins`` objects) into a Registry."""
    reg = Registry()
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspecs)
    eps = _entry_points()
    chosen = _selected([e.name for e in eps] + [n for n, _ in extra_plugins])
    loaded: list[tuple[PluginInfo, Any]] = []
    for ep in eps:
        if ep.name not in chosen:
            continue
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, ep.value, dist.name if dist else None, dist.version if dist else None)
        reg.plugins.append(info)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the CLI down
            info.status, info.error = "broken", f"import failed: {first_line(exc)}"
            continue
        loaded.append((info, module))
    for name, obj in extra_plugins:
        if name not in chosen:
            continue
        info = PluginInfo(name, getattr(obj, "__name__", repr(obj)), None, None)
        reg.plugins.append(info)
        pm.register(obj, name=name)
        loaded.append((info, obj))

    by_name = {info.name: info for info, _ in loaded}
    dead: set[str] = set()  # plugins whose hook raised: their other hooks are not called
    for kind in _KINDS:
        hook = getattr(pm.hook, f"milbench_register_{kind}s")
        for impl in reversed(hook.get_hookimpls()):  # pluggy lists last-registered first
            info = by_name[impl.plugin_name]
            if info.name in dead:
                continue
            staged: list[Any] = []
            try:
                impl.function(register=staged.append)
            except Exception as exc:
                info.status, info.error = "broken", f"{impl.function.__name__} raised {first_line(exc)}"
                dead.add(info.name)
                continue
            for obj in staged:
                try:
                    reg._add(kind, obj, info)
                except PluginError as exc:  # e.g. an object without a name: skip it, keep the rest
                    info.status, info.error = "broken", str(exc)
    for impl in reversed(pm.hook.milbench_register_commands.get_hookimpls()):
        reg.command_hooks.append((by_name[impl.plugin_name], impl.function))
    return reg


_REGISTRY: Registry | None = None


def get_registry(warn: bool = True) -> Registry:
    """The process-wide registry, loaded once; broken plugins warned about once."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
        if warn:
            for p in _REGISTRY.broken():
                print(f"milbench: warning: plugin '{p.name}' skipped: {p.error}", file=sys.stderr)
    return _REGISTRY


def reset_registry() -> None:
    """Forget the loaded registry (tests change ``MILBENCH_PLUGINS``)."""
    global _REGISTRY
    _REGISTRY = None
