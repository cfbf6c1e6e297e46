"""Plugin loading: third-party packages through real entry points, broken
plugins isolated and reported, duplicates named, MILBENCH_PLUGINS filtering."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import records_in, run_cli

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = Path(__file__).parent.parent / "plugins" / "examples"
#: The shipped Imagenette sample is an ImageFolder tree (train/<wnid>/*.JPEG): real images for the
#: example dataset plugin; n03445777 is golf ball.
IMAGE_TREE = Path(__file__).parent.parent / "plugins" / "data" / "imagenette-sample" / "train"
BUILTINS = "abmil,qmnist"


def make_dist(site: Path, dist: str, entry_points: dict[str, str], modules: list[Path]) -> Path:
    """Lay out an installed distribution (``*.dist-info`` with entry_points.txt),
    exactly what pip writes, so importlib.metadata finds its entry points."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[milbench]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for m in modules:
        shutil.copy(m, site / m.name)
    return site


@pytest.fixture(scope="module")
def thirdparty_site(tmp_path_factory) -> Path:
    """pip-install the README's two example plugins (plugins/examples/meanpool, a method,
    and plugins/examples/image_folder, a dataset) into a private target dir, as a user would."""
    target = tmp_path_factory.mktemp("site")
    for example, dist in (("meanpool", "milbench_meanpool-0.2.0"), ("image_folder", "milbench_image_folder-0.1.0")):
        src = tmp_path_factory.mktemp("src") / example
        shutil.copytree(EXAMPLES / example, src)
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                               "--no-build-isolation", "--target", str(target), str(src)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert list(target.glob(f"{dist}.dist-info/entry_points.txt"))
    return target


@pytest.fixture
def broken_site(tmp_path) -> Path:
    mods = sorted((FIXTURES / "broken_plugins").glob("*.py"))
    return make_dist(tmp_path / "broken", "milbench-broken",
                     {"bad-import": "bad_import", "bad-hook": "bad_hook", "dup-abmil": "dup_abmil",
                      "crash": "crash_method"}, mods)


def test_thirdparty_plugin_lists_runs_and_reports(thirdparty_site, tmp_path):
    env = {"PYTHONPATH": str(thirdparty_site), "MILBENCH_PLUGINS": f"{BUILTINS},meanpool"}
    listed = run_cli("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "meanpool" in listed.stdout
    plugins = run_cli("plugins", env=env)
    assert "milbench-meanpool" in plugins.stdout and "0.2.0" in plugins.stdout
    results = tmp_path / "res"
    run = run_cli("run", "-m", "meanpool", "-d", "qmnist", "--smoke", "--results", str(results), env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    (rec,) = records_in(results)
    assert rec["status"] == "ok" and rec["method"] == "meanpool" and rec["smoke"] is True
    assert 0.0 <= rec["metrics"]["bag_auc"] <= 1.0
    rep = run_cli("report", "--results", str(results), "--include-smoke", "--format", "csv", env=env)
    assert rep.returncode == 0, rep.stderr
    assert "meanpool" in rep.stdout


def test_broken_plugins_are_isolated_and_reported(broken_site, tmp_path):
    env = {"PYTHONPATH": str(broken_site), "MILBENCH_PLUGINS": f"{BUILTINS},bad-import,bad-hook,dup-abmil,crash"}
    out = run_cli("plugins", env=env)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "bad-import" in text and "bad-hook" in text
    assert text.count("broken") >= 2 and "conflict" in text
    listed = run_cli("list", env=env)
    assert listed.returncode == 0
    warnings = [l for l in listed.stderr.splitlines() if "warning" in l]
    assert any("bad-import" in w and "half-written" in w for w in warnings)
    assert any("bad-hook" in w and "hook exploded" in w for w in warnings)
    assert "Traceback" not in listed.stderr
    # the healthy plugins still run
    res = run_cli("run", "-m", "crash-mid-training", "-d", "qmnist", "--smoke", "--results", str(tmp_path), env=env)
    assert res.returncode == 1
    (rec,) = records_in(tmp_path)
    assert rec["status"] == "failed" and "diverged on bag 2" in rec["error"]


def test_duplicate_name_is_an_error_naming_both(broken_site, tmp_path):
    env = {"PYTHONPATH": str(broken_site), "MILBENCH_PLUGINS": f"{BUILTINS},dup-abmil"}
    res = run_cli("run", "-m", "abmil", "-d", "qmnist", "--smoke", "--results", str(tmp_path), env=env)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert "'abmil'" in err and "'dup-abmil'" in err and "Traceback" not in res.stderr


def test_env_filter_limits_plugins(monkeypatch):
    from milbench.plugins import load_registry

    monkeypatch.setenv("MILBENCH_PLUGINS", "qmnist")
    reg = load_registry()
    assert [p.name for p in reg.plugins] == ["qmnist"]
    assert "abmil" not in reg.methods and "qmnist" in reg.datasets
    monkeypatch.setenv("MILBENCH_PLUGINS", "-qmnist")
    reg = load_registry()
    assert "qmnist" not in reg.datasets and "abmil" in reg.methods


def test_builtins_registered_through_entry_points():
    from importlib import metadata

    eps = {e.name: e.value for e in metadata.entry_points(group="milbench")}
    assert eps["abmil"] == "milbench_plugins.abmil" and eps["qmnist"] == "milbench_plugins.qmnist"


def test_help_does_not_import_torch():
    code = ("import sys; from milbench.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().endswith("NOTORCH"), out.stdout + out.stderr
    assert "run" in out.stdout and "report" in out.stdout


def test_example_dataset_plugin_runs_with_builtin_and_thirdparty_methods(thirdparty_site, tmp_path):
    """The example dataset reads a real image tree; a built-in method and the example
    method both train on it, and a bad key_class is one line with the valid names."""
    env = {"PYTHONPATH": str(thirdparty_site), "MILBENCH_PLUGINS": "abmil,meanpool,image-folder"}
    listed = run_cli("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "image-folder" in listed.stdout and "warning" not in listed.stderr
    data = ["--set", f"folder={IMAGE_TREE}", "--set", "key_class=n03445777"]
    for method in ("abmil", "meanpool"):
        run = run_cli("run", "-m", method, "-d", "image-folder", "--smoke", *data, "--results", str(tmp_path), env=env)
        assert run.returncode == 0, run.stdout + run.stderr
    recs = {r["method"]: r for r in records_in(tmp_path)}
    assert set(recs) == {"abmil", "meanpool"}
    for rec in recs.values():
        assert rec["status"] == "ok" and rec["data"]["source"] == "folder"
        assert 0.0 <= rec["metrics"]["bag_auc"] <= 1.0
    # the splits of both runs are the same images (same seed): the hashes say so
    assert recs["abmil"]["data"]["instance_id_hash"] == recs["meanpool"]["data"]["instance_id_hash"]
    bad = run_cli("run", "-m", "abmil", "-d", "image-folder", "--smoke", "--set", f"folder={IMAGE_TREE}",
                  "--set", "key_class=golf", "--results", str(tmp_path / "bad"), env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "key_class 'golf'" in bad.stderr and "n03445777" in bad.stderr


@pytest.mark.parametrize("example, module", [("meanpool", "milbench_meanpool.py"),
                                             ("image_folder", "milbench_image_folder.py")])
def test_readme_plugin_examples_are_the_tested_ones(example, module):
    """The README's third-party examples are the packages under plugins/examples/, verbatim."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in (module, "pyproject.toml"):
        assert (EXAMPLES / example / name).read_text().strip() in readme, f"README lacks plugins/examples/{example}/{name}"


def test_malformed_plugin_objects_are_refused_at_registration_not_at_run_time(monkeypatch):
    """A dataset that sets keys it does not declare, a method that sets a protocol key, a
    method whose params are not a mapping: each is broken with its reason, the plugin's
    other objects and the other plugins keep working, and running it is one line."""
    from milbench.api import Dataset, Method, hookimpl
    from milbench.errors import PluginError
    from milbench.plugins import load_registry

    class Toy(Dataset):
        name = "toy-bags"
        defaults = {"bag_size": 4}

    class Greedy(Method):
        name = "greedy"
        defaults = {"epochs": 40}

    class Odd(Method):
        name = "odd"
        params = ["hidden"]  # not a mapping

    class Fine(Method):
        name = "fine"

    class Plugin:
        @hookimpl
        def milbench_register_methods(register):
            register(Greedy())
            register(Odd())
            register(Fine())

        @hookimpl
        def milbench_register_datasets(register):
            register(Toy())
            register(object())

    monkeypatch.setenv("MILBENCH_PLUGINS", "qmnist,toy")
    reg = load_registry([("toy", Plugin)])
    assert "fine" in reg.methods and "qmnist" in reg.datasets
    (toy,) = [p for p in reg.plugins if p.name == "toy"]
    assert toy.status == "broken"
    with pytest.raises(PluginError, match=r"dataset 'toy-bags' is unusable: .*sets key 'bag_size'.*bag_params"):
        reg.dataset("toy-bags")
    with pytest.raises(PluginError, match=r"method 'greedy' is unusable: .*protocol key\(s\) epochs"):
        reg.method("greedy")
    with pytest.raises(PluginError, match=r"method 'odd' is unusable: method 'odd' is malformed: AttributeError"):
        reg.method("odd")
