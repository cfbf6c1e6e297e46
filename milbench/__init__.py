"""milbench: a benchmark harness for memory-saving weakly supervised training.

The harness (this package) knows no method and no dataset by name; methods and
datasets are plugins registered through the ``milbench`` entry-point group.
Heavy imports (torch) stay inside functions so ``milbench --help`` is instant.
"""

__version__ = "0.1.0"
