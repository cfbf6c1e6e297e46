"""``milbench.api`` is the whole plugin contract: the built-in plugins and the README's
examples import milbench through it and nothing else, every name they take from it
exists, and importing it (as registration does) never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_FILES = sorted((ROOT / "plugins").rglob("*.py"))  # the built-ins and plugins/examples/


def _milbench_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of a ``milbench`` module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "milbench"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "milbench":
            found.append((node.lineno, node.module, [a.name for a in node.names]))
    return found


def test_plugins_import_milbench_only_through_the_api():
    assert len(PLUGIN_FILES) > 10  # the scan found the plugins
    wrong = [f"{p.relative_to(ROOT)}:{line}: {module}"
             for p in PLUGIN_FILES for line, module, _ in _milbench_imports(p) if module != "milbench.api"]
    assert not wrong, "plugins must import milbench only via milbench.api:\n" + "\n".join(wrong)


def test_every_name_plugins_take_from_the_api_exists():
    import milbench.api as api

    missing = sorted({f"{name} ({p.relative_to(ROOT)})" for p in PLUGIN_FILES
                      for _, module, names in _milbench_imports(p) if module == "milbench.api"
                      for name in names if name not in api.__all__})
    assert not missing, f"not exported by milbench.api: {missing}"
    for name in api.__all__:  # the lazy names resolve to real objects
        assert getattr(api, name) is not None, name


def test_importing_the_api_and_registering_plugins_does_not_import_torch():
    code = ("import sys, milbench.api\nfrom milbench.plugins import load_registry\n"
            "reg = load_registry()\nprint(len(reg.methods), len(reg.datasets), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    n_methods, n_datasets, torch_loaded = out.stdout.split()
    assert int(n_methods) >= 5 and int(n_datasets) >= 4, out.stderr
    assert torch_loaded == "False", "registering the plugins imported torch"


def test_unknown_api_name_is_an_attribute_error():
    import milbench.api as api

    with pytest.raises(AttributeError, match="no attribute 'encode_chunk'"):
        api.encode_chunk  # noqa: B018
