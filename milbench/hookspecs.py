"""The hooks a milbench plugin may implement. Each docstring is the contract.

Hooks *register* things; they never run them. Every hook receives a
``register`` callable; calling it twice with one name (from two plugins) is an
error that names both plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from milbench.contract import Dataset, Method, Metric

hookspec = pluggy.HookspecMarker("milbench")


@hookspec
def milbench_register_methods(register: "Callable[[Method], None]") -> None:
    """Register methods: call ``register(MethodSubclass())`` once per method.

    The object must be a :class:`milbench.api.Method` with a unique ``name``;
    its ``params`` must be :class:`milbench.api.Param` and its ``defaults``/
    ``presets``/``smoke`` must not set a protocol key. A method that breaks this
    is refused when the registry loads (``milbench plugins`` shows it broken,
    with the reason). Keep this hook cheap: no torch model building, no data loading.
    """


@hookspec
def milbench_register_datasets(register: "Callable[[Dataset], None]") -> None:
    """Register datasets: call ``register(DatasetSubclass())`` once per dataset.

    The object must be a :class:`milbench.api.Dataset` with a unique ``name``;
    its ``defaults``/``presets``/``smoke`` may set only keys it declares in
    ``params`` (:func:`milbench.api.bag_params` declares the shared bag keys) and
    protocol keys; otherwise it is refused when the registry loads. Loading data
    happens later, in ``Dataset.load`` inside the run's child.
    """


@hookspec
def milbench_register_metrics(register: "Callable[[Metric], None]") -> None:
    """Register extra test-split metrics: ``register(milbench.api.Metric(...))``.

    A metric's ``fn(predictions, bags)`` returns a float or ``None`` (not
    measurable); its value lands in the record's ``metrics`` under its name.
    """


@hookspec
def milbench_register_commands(cli: "click.Group") -> None:
    """Add click commands to the ``milbench`` CLI group: ``cli.add_command(cmd)``.

    Import heavy modules inside the command body, not at module level, so
    ``milbench --help`` stays fast.
    """
