"""The ``imagenette`` dataset on the real files in ../shared/data and on the shipped sample.

Real-data tests read ``$MILBENCH_DATA_ROOT`` (default ../shared/data, see conftest) and skip
with a reason when its ``imagenette2-224`` copy is absent.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from milbench.errors import ConfigError, DataError

torch = pytest.importorskip("torch")
torch.set_num_threads(1)



imn = importlib.import_module("milbench_plugins.imagenette")
from conftest import SHARED_DATA as DATA  # noqa: E402  (absolute: make_layout symlinks to real files)

FULL = DATA / "imagenette2-224"
needs_full = pytest.mark.skipif(not (FULL / "train").is_dir() or not (FULL / "val").is_dir(),
                                reason=f"real Imagenette not found at {FULL} (set MILBENCH_DATA_ROOT)")
SMALL = {"instance_size": 32, "bag_size": 6, "n_train_bags": 12, "n_val_bags": 6, "n_test_bags": 10}
GOLF = "n03445777"


@pytest.fixture
def no_roots(monkeypatch, tmp_path):
    """No env root and an empty user cache: only --data-root or the shipped sample remain."""
    monkeypatch.delenv("MILBENCH_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def full_splits():
    if not (FULL / "train").is_dir():
        pytest.skip(f"real Imagenette not found at {FULL}")
    return imn.ImagenetteBags().load(SMALL, 0, str(DATA))


def all_bags(splits):
    return {"train": list(splits.train), "val": list(splits.val), "test": list(splits.test)}


def make_layout(tmp_path: Path, corrupt: str = "train/" + GOLF, name: str = "imagenette2-160") -> Path:
    """A complete official-looking layout under tmp: symlinks to the real files, except the
    images under ``corrupt`` which are truncated copies (half their bytes)."""
    root = tmp_path / "root"
    for src in FULL.rglob("*.JPEG"):
        rel = src.relative_to(FULL)
        dest = root / name / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if str(rel).startswith(corrupt):
            data = src.read_bytes()
            dest.write_bytes(data[: len(data) // 2])
        else:
            dest.symlink_to(src)
    return root


# -- splits ---------------------------------------------------------------------------------
@needs_full
def test_splits_disjoint_at_source_image_level(full_splits):
    bags = all_bags(full_splits)
    ids = {s: {i for b in bs for i in b.instance_ids} for s, bs in bags.items()}
    assert ids["train"] and ids["val"] and ids["test"]
    assert not ids["train"] & ids["val"]
    assert not (ids["train"] | ids["val"]) & ids["test"]
    assert all(i.startswith("train/") for i in ids["train"] | ids["val"])
    assert all(i.startswith("val/") for i in ids["test"])
    info = full_splits.info
    assert info["pool_sizes"]["train"] + info["pool_sizes"]["val"] == 9469
    assert info["pool_sizes"]["test"] == 3925


@needs_full
def test_train_folder_pools_are_disjoint_stratified_and_cover_it():
    files = imn._list_files(imn._scan(FULL, "imagenette2-224", DATA))
    labels = np.array([list(imn.CLASSES).index(f.split("/")[1]) for f in files])
    train_folder = np.flatnonzero(np.char.startswith(np.array(files), "train/"))
    tr, va = imn.split_train_folder(labels, train_folder, 0.15, seed=0)
    assert not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va])) == sorted(train_folder)
    golf = list(imn.CLASSES).index(GOLF)
    assert (labels[va] == golf).sum() == round(0.15 * 951)  # per-class split keeps the key share


@needs_full
def test_bag_labels_agree_with_instance_labels(full_splits):
    for split, bags in all_bags(full_splits).items():
        assert sum(b.label for b in bags) == (len(bags) + 1) // 2, split  # balanced
        for b in bags:
            truth = torch.tensor([f"/{GOLF}/" in i for i in b.instance_ids])
            assert torch.equal(b.instance_labels.bool(), truth)
            assert b.label == int(bool(truth.any()))
            if b.label:
                assert int(truth.sum()) == round(0.3 * len(b))


@needs_full
@pytest.mark.parametrize("extra", [{}, {"bag_size": 7, "bag_size_std": 2.0}])
def test_image_view_tiles_the_instances_exactly(extra):
    splits = imn.ImagenetteBags().load({**SMALL, **extra, "n_train_bags": 6}, 1, str(DATA))
    sizes = set()
    for b in splits.train:
        img, p = b.image(), b.patch_size
        rows, cols = b.grid_shape
        assert img.shape == (3, rows * p, cols * p)
        covered = torch.zeros(rows, cols, dtype=torch.bool)
        for x, (r, c) in zip(b.instances, b.grid.tolist()):
            assert torch.equal(img[:, r * p:(r + 1) * p, c * p:(c + 1) * p], x)
            covered[r, c] = True
        for r, c in (~covered).nonzero().tolist():  # empty cells are background
            assert not img[:, r * p:(r + 1) * p, c * p:(c + 1) * p].any()
        sizes.add(len(b))
    if extra:
        assert len(sizes) > 1  # Gaussian bag sizes actually vary


@needs_full
def test_same_seed_same_bags_other_seed_other_bags(full_splits):
    again = imn.ImagenetteBags().load(SMALL, 0, str(DATA))
    for split in ("train", "val", "test"):
        a, b = getattr(full_splits, split), getattr(again, split)
        assert [x.instance_ids for x in a] == [x.instance_ids for x in b]
        assert [x.label for x in a] == [x.label for x in b]
    assert torch.equal(full_splits.train[0].instances, again.train[0].instances)
    assert full_splits.info["instance_id_hash"] == again.info["instance_id_hash"]
    assert full_splits.info["pool_id_hash"] == again.info["pool_id_hash"]
    other = imn.ImagenetteBags().load(SMALL, 1, str(DATA))
    for split in ("train", "val", "test"):
        assert other.info["instance_id_hash"][split] != full_splits.info["instance_id_hash"][split]
    assert other.info["pool_id_hash"]["val"] != full_splits.info["pool_id_hash"]["val"]
    assert other.info["pool_id_hash"]["test"] == full_splits.info["pool_id_hash"]["test"]  # the whole val folder


@needs_full
def test_instances_are_normalised_images_of_the_requested_size(full_splits):
    x = torch.cat([b.instances for b in full_splits.train])
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.5 and 0.6 < float(x.std()) < 1.5  # ImageNet mean/std applied
    assert full_splits.spec.channels == 3 and full_splits.spec.instance_size == 32
    assert full_splits.spec.instance_classes == ("other", "golf ball")


# -- sample vs full, roots ----------------------------------------------------------------------
@needs_full
def test_sample_and_full_data_say_which_they_were(no_roots):
    ds = imn.ImagenetteBags()
    full = ds.load(SMALL, 0, str(DATA))
    assert full.info["source"] == "full" and full.info["variant"] == "imagenette2-224"
    assert full.info["n_files"] == {"train": 9469, "val": 3925} and full.info["layout_complete"]
    sample = ds.load(SMALL, 0, None)
    assert sample.info["source"] == "sample" and sample.info["variant"] == "sample"
    assert sample.info["files"] == str(imn.SAMPLE)
    assert ds.status(None).source == "sample" and ds.status(str(DATA)).source == "full"
    assert ds.status(str(DATA)).complete and not ds.status(None).complete


@needs_full
def test_env_root_is_searched_and_a_root_may_be_the_layout_itself(monkeypatch, tmp_path):
    monkeypatch.setenv("MILBENCH_DATA_ROOT", str(DATA))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert imn.ImagenetteBags().status(None).root == str(FULL)
    lay = imn.select_layout(str(FULL), "auto", 64)
    assert lay.path == FULL and lay.variant == "imagenette2-224"


def test_variant_order_prefers_the_smallest_copy_that_is_large_enough():
    assert imn.variant_order(64) == ["imagenette2-160", "imagenette2-224", "imagenette2-320", "imagenette2"]
    assert imn.variant_order(200) == ["imagenette2-224", "imagenette2-320", "imagenette2", "imagenette2-160"]


def test_sample_runs_the_default_paper_and_smoke_configs(no_roots):
    ds = imn.ImagenetteBags()
    for cfg in ({}, {**ds.presets["paper"]}, {**ds.smoke}):
        splits = ds.load(cfg, 0, None)
        cfg_all = ds._config(cfg)
        assert splits.info["source"] == "sample"
        want = [cfg_all[f"n_{s}_bags"] for s in ("train", "val", "test")]
        if want[0] == "auto":  # resolved from the training images found
            want[0] = imn.auto_train_bags(splits.info["pool_sizes"]["train"], cfg_all["bag_size"])
        assert [len(splits.train), len(splits.val), len(splits.test)] == want == list(splits.info["n_bags"].values())
        assert splits.train[0].instances.shape[1:] == (3, cfg_all["instance_size"], cfg_all["instance_size"])


def test_explicit_variant_not_found_is_a_one_line_data_error(no_roots, tmp_path):
    with pytest.raises(DataError) as err:
        imn.ImagenetteBags().load({**SMALL, "variant": "imagenette2-320"}, 0, None)
    msg = str(err.value)
    assert "\n" not in msg and "imagenette2-320" in msg and "milbench data download imagenette" in msg


def test_missing_explicit_data_root_is_a_one_line_data_error(no_roots, tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        imn.ImagenetteBags().load(SMALL, 0, str(nowhere))
    msg = str(err.value)
    assert "\n" not in msg and str(nowhere) in msg and "milbench data download imagenette" in msg
    st = imn.ImagenetteBags().status(str(nowhere))
    assert (st.source, st.found, st.fetch_hint) == ("missing", False, "milbench data download imagenette")


@needs_full
def test_incomplete_layout_is_a_one_line_data_error_and_partial_status(no_roots, tmp_path):
    part = tmp_path / "imagenette2-160"
    for split in ("train", "val"):
        for src in sorted((FULL / split / GOLF).glob("*.JPEG"))[:3]:
            (part / split / GOLF).mkdir(parents=True, exist_ok=True)
            (part / split / GOLF / src.name).symlink_to(src)
    with pytest.raises(DataError) as err:
        imn.ImagenetteBags().load(SMALL, 0, str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "incomplete" in msg and str(part) in msg
    st = imn.ImagenetteBags().status(str(tmp_path))
    assert st.source == "partial" and st.found and not st.complete


@needs_full
def test_corrupt_jpeg_is_a_data_error_naming_the_file(no_roots, tmp_path):
    root = make_layout(tmp_path)
    assert imn.ImagenetteBags().status(str(root)).complete  # counts are right; the bytes are not
    with pytest.raises(DataError) as err:
        imn.ImagenetteBags().load(SMALL, 0, str(root))
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{root}/imagenette2-160/train/{GOLF}/" in msg and ".JPEG" in msg
    assert "truncated" in msg and "milbench data download imagenette" in msg
    problems = imn.ImagenetteBags().verify(str(root), quick=True)
    assert any("do not decode" in p and GOLF in p for p in problems)


# -- config -----------------------------------------------------------------------------------
def test_bad_key_class_is_a_one_line_config_error_with_a_suggestion(no_roots):
    ds = imn.ImagenetteBags()
    with pytest.raises(ConfigError) as err:
        ds.load({**SMALL, "key_class": "golfball"}, 0, None)
    assert "\n" not in str(err.value) and "did you mean 'golf_ball'" in str(err.value)
    with pytest.raises(ConfigError) as err:  # the harness validates the Param before a run starts
        ds.params["key_class"].validate("key_class", "n03445776")
    assert "did you mean 'n03445777'" in str(err.value)


def test_key_class_accepts_wnids_and_names(no_roots):
    ds = imn.ImagenetteBags()
    assert imn.resolve_key_class("golf_ball") == imn.resolve_key_class("Golf Ball") == GOLF
    splits = ds.load({**SMALL, "key_class": "tench"}, 0, None)
    assert splits.info["key_class"] == "n01440764" and splits.spec.instance_classes == ("other", "tench")
    for b in splits.test:
        assert b.label == int(any("/n01440764/" in i for i in b.instance_ids))


def test_declares_the_shared_dataset_keys():
    keys = set(imn.ImagenetteBags.params)
    assert {"bag_size", "instance_size", "key_fraction", "n_train_bags", "n_val_bags", "n_test_bags",
            "key_class", "variant", "bag_size_std", "val_fraction"} <= keys
    paper = imn.ImagenetteBags.presets["paper"]
    assert (paper["instance_size"], paper["bag_size"], paper["key_fraction"]) == (112, 50, 0.3)


def test_auto_training_bags_follow_the_data_found(no_roots):
    """``n_train_bags=auto`` (the default): one epoch shows each training image about once, at
    least MIN_AUTO_TRAIN_BAGS; the record says what it chose; an explicit count still wins."""
    from milbench.config import resolve

    params = imn.ImagenetteBags.params
    assert params["n_train_bags"].default == "auto"
    assert imn.auto_train_bags(8049, 10) == 804 and imn.auto_train_bags(952, 10) == imn.MIN_AUTO_TRAIN_BAGS
    ds = imn.ImagenetteBags()
    small = {**SMALL, "n_train_bags": "auto", "bag_size": 10}
    splits = ds.load(small, 0, None)  # the shipped sample: 1,904 training images make 190 bags -> the floor
    assert splits.info["source"] == "sample" and splits.info["pool_sizes"]["train"] < 10 * imn.MIN_AUTO_TRAIN_BAGS
    assert len(splits.train) == splits.info["n_bags"]["train"] == imn.MIN_AUTO_TRAIN_BAGS
    six = ds.load({**small, "bag_size": 6}, 0, None)  # bags of 6: above the floor, one epoch ~ every image once
    assert len(six.train) == six.info["n_bags"]["train"] == six.info["pool_sizes"]["train"] // 6 > imn.MIN_AUTO_TRAIN_BAGS
    assert len(ds.load({**small, "n_train_bags": 30}, 0, None).train) == 30
    assert resolve(params, [], ["n_train_bags=auto"])["n_train_bags"] == "auto"
    with pytest.raises(ConfigError, match="bad value for 'n_train_bags': 'lots' is not 'auto' or int >= 1"):
        resolve(params, [], ["n_train_bags=lots"])


# -- files --------------------------------------------------------------------------------------
def test_decode_converts_grayscale_and_cmyk_to_three_channels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8))
    for mode in ("L", "CMYK"):
        path = tmp_path / f"{mode}.JPEG"
        rgb.convert(mode).save(path)
        x = imn.decode(path, 16)
        assert x.shape == (3, 16, 16) and x.dtype == torch.uint8


def test_shipped_sample_is_complete_and_verifies(no_roots):
    lay = imn.sample_layout()
    assert lay is not None and lay.complete
    assert all(len(lay.counts[s]) == 10 for s in ("train", "val"))
    size = sum(p.stat().st_size for p in imn.SAMPLE.rglob("*") if p.is_file())
    # ~2,000 training images, 14.5 MB: fewer over-fit the main job (benchmarks/make_imagenette_sample.py
    # says why); the cap keeps the package small
    assert size < 16e6, f"sample grew to {size / 1e6:.1f} MB"
    readme = " ".join((imn.SAMPLE / "README.md").read_text().split())
    assert "ImageNet terms of access" in readme and "non-commercial" in readme
    assert imn.ImagenetteBags().verify(None) == []


@needs_full
def test_verify_quick_on_the_real_copy():
    assert imn.ImagenetteBags().verify(str(DATA), quick=True) == []


@needs_full
@pytest.mark.slow
def test_verify_full_decodes_everything_and_matches_the_known_tree_checksum():
    assert imn.ImagenetteBags().verify(str(DATA)) == []


def test_download_offline_is_a_one_line_data_error(tmp_path):
    ds = imn.ImagenetteBags()
    ds.base_url = "http://127.0.0.1:9"  # nothing listens on the discard port: a real refused connection
    with pytest.raises(DataError) as err:
        ds.download(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "could not download http://127.0.0.1:9/imagenette2-160.tgz" in msg
    assert "by hand" in msg and str(tmp_path) in msg
    assert not list(tmp_path.glob("*.tgz")) and not list(tmp_path.glob(".part-*"))


def test_download_rejects_corrupt_and_foreign_archives(tmp_path):
    ds = imn.ImagenetteBags()
    (tmp_path / "imagenette2-160.tgz").write_bytes(b"\x1f\x8b\x08 definitely not a tarball")
    with pytest.raises(DataError, match="truncated or corrupt"):
        ds.download(str(tmp_path))
    with tarfile.open(tmp_path / "imagenette2-320.tgz", "w:gz") as tar:
        info = tarfile.TarInfo("elsewhere/evil.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match="not the imagenette2-320 archive"):
        ds.download(str(tmp_path), variant="imagenette2-320")
    assert not (tmp_path / "elsewhere").exists()
    with pytest.raises(DataError, match="downloadable"):
        ds.download(str(tmp_path), variant="imagenette2-224")


def test_importing_the_plugin_does_not_import_torch():
    code = ("import sys; sys.path.insert(0, %r); import importlib.util as u; "
            "s = u.spec_from_file_location('milbench_plugins.imagenette', %r); m = u.module_from_spec(s); "
            "sys.modules[s.name] = m; s.loader.exec_module(m); print('torch' in sys.modules)"
            % (str(Path(imn.__file__).parent.parent), str(imn.__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
