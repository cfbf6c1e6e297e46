"""``milbench data`` (status table, verify, download), driven through click's CliRunner
on the group itself with a registry built from real plugins: the built-in
imagenette dataset plus two small third-party-style datasets defined here (one
whose data is absent, one whose status() is broken)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from milbench.api import Dataset, DataStatus, hookimpl
from milbench.commands.data import data_group
from milbench.errors import DataError, MilbenchError
from milbench.plugins import load_registry

from conftest import SHARED_DATA as DATA  # noqa: E402  (the one home of the data root)

FULL = DATA / "imagenette2-224"
needs_full = pytest.mark.skipif(not (FULL / "train").is_dir(),
                                reason=f"real Imagenette not found at {FULL} (set MILBENCH_DATA_ROOT)")
GOLF = "n03445777"



imn = importlib.import_module("milbench_plugins.imagenette")


class AbsentData(Dataset):
    """A dataset whose files are never present and cannot be fetched from here."""

    name = "absent-data"

    def status(self, data_root):
        return DataStatus(self.name, False, False, None, "missing", "no files", [str(Path(data_root or "/x") / "absent")],
                          "milbench data download absent-data")

    def download(self, data_root):
        raise DataError(f"could not download https://example.invalid/absent.tgz: offline; put it under {data_root}")


class BrokenStatus(Dataset):
    name = "broken-status"

    def status(self, data_root):
        raise RuntimeError("status exploded\nsecond line")


class CliTestPlugin:
    """A third-party-style plugin object: one hookimpl registering three datasets."""

    def __init__(self, imagenette):
        self.imagenette = imagenette

    @hookimpl
    def milbench_register_datasets(self, register):
        register(self.imagenette)
        register(AbsentData())
        register(BrokenStatus())


@pytest.fixture
def registry(monkeypatch, tmp_path):
    """Only our test plugin (no installed entry points), no env root, an empty cache."""
    monkeypatch.setenv("MILBENCH_PLUGINS", "cli-test")
    monkeypatch.delenv("MILBENCH_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    ds = imn.ImagenetteBags()
    ds.base_url = "http://127.0.0.1:9"  # a refused connection: "offline" without touching the internet
    return load_registry(extra_plugins=[("cli-test", CliTestPlugin(ds))])


def invoke(registry, *args):
    return CliRunner().invoke(data_group, list(args), obj={"registry": registry}, env={"COLUMNS": "220"})


@needs_full
def test_status_table_shows_where_it_looks_what_it_found_and_how_to_fetch(registry):
    res = invoke(registry, "--data-root", str(DATA))
    assert res.exit_code == 0, res.output
    out = res.output
    assert f"1. {DATA} (--data-root)" in out
    line = next(l for l in out.splitlines() if "│ imagenette" in l)
    assert "complete" in line and "imagenette2-224: 9,469 train + 3,925 val images" in line
    assert f"{DATA}: imagenette2-160, imagenette2-224" in out  # where it looked, grouped by root
    absent = next(l for l in out.splitlines() if "│ absent-data" in l)
    assert "missing" in absent and "milbench data download absent-data" in absent
    broken = next(l for l in out.splitlines() if "│ broken-status" in l)
    assert "error" in broken and "status exploded" in broken


@needs_full
def test_status_json(registry):
    res = invoke(registry, "--data-root", str(DATA), "--json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) == {"imagenette", "absent-data", "broken-status"}
    im = rows["imagenette"]
    assert (im["source"], im["complete"], im["root"]) == ("full", True, str(FULL))
    assert str(DATA / "imagenette2-160") in im["looked_in"]
    assert rows["absent-data"]["source"] == "missing" and rows["broken-status"]["source"] == "error"


def test_status_without_data_says_sample_and_gives_the_fetch_command(registry):
    res = invoke(registry, "--json")
    row = next(r for r in json.loads(res.output) if r["name"] == "imagenette")
    assert row["source"] == "sample" and not row["complete"]
    assert row["fetch_hint"] == "milbench data download imagenette"
    table = invoke(registry).output
    line = next(l for l in table.splitlines() if "│ imagenette" in l)
    assert "sample only" in line and "milbench data download imagenette" in line


@needs_full
def test_verify_quick_ok_on_the_real_copy(registry):
    res = invoke(registry, "verify", "imagenette", "--quick", "--data-root", str(DATA))
    assert res.exit_code == 0, res.output
    assert res.output.startswith("imagenette: ok (complete, quick)")


def test_verify_missing_named_dataset_fails_and_all_lists_it(registry, tmp_path):
    res = invoke(registry, "verify", "absent-data")
    assert res.exit_code == 1 and "absent-data: missing" in res.output
    res = invoke(registry, "--data-root", str(tmp_path / "nowhere"), "verify", "imagenette")
    assert res.exit_code == 1 and "imagenette: missing: nothing under" in res.output
    res = invoke(registry, "verify", "--quick")  # all: imagenette checks the sample, the broken one fails
    assert res.exit_code == 1
    assert "imagenette: ok (sample only, quick)" in res.output and "broken-status: error" in res.output


@needs_full
def test_verify_reports_corrupt_and_incomplete_files(registry, tmp_path):
    lay = tmp_path / "imagenette2-160"
    for split in ("train", "val"):
        for src in sorted((FULL / split / GOLF).glob("*.JPEG"))[:3]:
            (lay / split / GOLF).mkdir(parents=True, exist_ok=True)
            (lay / split / GOLF / src.name).write_bytes(src.read_bytes())
    bad = next((lay / "train" / GOLF).iterdir())
    bad.write_bytes(bad.read_bytes()[:500])
    res = invoke(registry, "verify", "imagenette", "--data-root", str(tmp_path))
    assert res.exit_code == 1, res.output
    assert "imagenette: " in res.output and "problem(s)" in res.output
    assert "lacks 9 class folder(s)" in res.output
    assert "1 of 6 image(s) do not decode" in res.output and bad.name in res.output


def one_line_error(res, kind=MilbenchError) -> str:
    """The MilbenchError a command raised (milbench's entry point prints it as one line)."""
    assert res.exit_code != 0 and isinstance(res.exception, kind), (res.output, res.exception)
    msg = str(res.exception)
    assert "\n" not in msg
    return msg


def test_download_offline_is_one_clear_line(registry, tmp_path):
    res = invoke(registry, "download", "imagenette", "--data-root", str(tmp_path))
    msg = one_line_error(res, DataError)
    assert msg.startswith("could not download http://127.0.0.1:9/imagenette2-160.tgz") and "by hand" in msg
    assert str(tmp_path) in msg
    res = invoke(registry, "download", "imagenette", "--variant", "imagenette2-320", "--data-root", str(tmp_path))
    assert "imagenette2-320.tgz" in one_line_error(res, DataError)
    res = invoke(registry, "download", "absent-data", "--data-root", str(tmp_path))
    assert one_line_error(res, DataError).startswith("could not download https://example.invalid/absent.tgz")


def test_download_unknown_name_and_unsupported_variant(registry, tmp_path):
    res = invoke(registry, "download", "imagenete", "--data-root", str(tmp_path))
    assert "did you mean 'imagenette'" in one_line_error(res)
    res = invoke(registry, "download", "absent-data", "--variant", "big", "--data-root", str(tmp_path))
    assert "has no --variant" in one_line_error(res, DataError)
    res = invoke(registry, "verify", "imagenete")
    assert "did you mean 'imagenette'" in one_line_error(res)


def test_through_the_milbench_entry_point(monkeypatch, tmp_path, capsys):
    """Mounted in ``milbench``: errors become one stderr line and exit status 2."""
    cli = pytest.importorskip("milbench.cli")
    from milbench.plugins import reset_registry

    monkeypatch.setenv("MILBENCH_PLUGINS", "imagenette")
    monkeypatch.delenv("MILBENCH_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    reset_registry()
    try:
        with pytest.raises(SystemExit) as ex:
            cli.main(["data", "download", "imagenete", "--data-root", str(tmp_path)])
        assert ex.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("milbench: error: unknown dataset 'imagenete'")
        cli.main(["data", "--json"])
        rows = json.loads(capsys.readouterr().out)
        if rows:  # empty when the package is not installed (no entry points)
            assert [r["name"] for r in rows] == ["imagenette"] and rows[0]["source"] == "sample"
    finally:
        reset_registry()


def test_importing_the_group_does_not_import_torch():
    code = "import sys, milbench.commands.data; print('torch' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
