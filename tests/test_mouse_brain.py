"""The mouse-brain dataset on the real CA1 files: coordinates, classes, held-out band, readers, errors."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from milbench.config import resolve
from milbench.errors import ConfigError, DataError
from milbench_plugins.mouse_brain.class_maps import (BACKGROUND, CLASS_NAMES, GENE_A, GENE_B, TISSUE, LabelRule,
                                                     load_section_maps, prepare_section)
from milbench_plugins.mouse_brain.section import (CA1_SHA256, EMBEDDED, RENDER_BOUNDARY, RENDER_INTERIOR, Section,
                                                  SpotColumns, file_sha256, locate_section, read_label_image,
                                                  read_section)




mb = importlib.import_module("milbench_plugins.mouse_brain")
RULE = LabelRule("Plp1", "Neurod6")


@pytest.fixture(scope="module")
def ca1_dir() -> Path:
    """The real CA1 files: under $MILBENCH_DATA_ROOT, else the copy shipped in the package."""
    root = os.environ.get("MILBENCH_DATA_ROOT")
    if root and (Path(root) / "mouse-brain-ca1" / "spots.csv").is_file():
        return Path(root) / "mouse-brain-ca1"
    if (EMBEDDED / "spots.csv").is_file():
        return EMBEDDED
    pytest.skip("real CA1 files not found: set MILBENCH_DATA_ROOT to a root holding mouse-brain-ca1/")


@pytest.fixture(scope="module")
def ca1_section(ca1_dir):
    return read_section(ca1_dir)


@pytest.fixture(scope="module")
def ca1_maps(ca1_dir):
    return load_section_maps(ca1_dir, SpotColumns(), 0.25, RULE)


@pytest.fixture()
def isolated_roots(tmp_path, monkeypatch):
    """No data root from the environment and an empty user cache."""
    monkeypatch.delenv("MILBENCH_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def config(**over):
    from milbench.protocol import PROTOCOL_PARAMS

    ds = mb.MouseBrain()
    return resolve({**PROTOCOL_PARAMS, **ds.params}, [("dataset", ds.defaults)], over)


# ------------------------------------------------------------------ the files


def test_embedded_copy_is_the_ca1_section_with_notice(ca1_dir):
    for name, digest in CA1_SHA256.items():
        assert file_sha256(EMBEDDED / name) == digest
        assert file_sha256(ca1_dir / name) == digest
    notice = (EMBEDDED / "NOTICE").read_text()
    assert "BSD" in notice and "MIT License" not in notice and "acycliq/pciSeq" in notice and "Qian" in notice


# Rows of spots.csv (0-based data rows) and the label-image cell each lies on, read
# from the pciSeq files: x is the image column, y the row.
KNOWN_SPOTS = [(181, "Plp1", 49, 4558, 17), (30354, "Plp1", 1725, 1406, 969),
               (16817, "Neurod6", 1109, 3075, 567), (16925, "Cplx2", 1116, 2882, 577)]


def test_known_spots_land_on_their_cells(ca1_dir, ca1_section):
    labels = read_label_image(ca1_dir / "label_image.coo.npz").tocsr()
    for row, gene, x, y, cell in KNOWN_SPOTS:
        assert ca1_section.genes[row] == gene
        assert (ca1_section.x[row], ca1_section.y[row]) == (x, y)
        assert labels[y, x] == cell
        assert ca1_section.nuclei[y, x]
        assert ca1_section.image[y, x] > 0


def test_most_spots_lie_on_or_near_a_nucleus(ca1_section):
    """61 % of the reads sit on a segmented nucleus and 90 % within 27 px (measured);
    swapping x and y would drop the first figure to 23 %."""
    sec = ca1_section
    h, w = sec.shape
    xi, yi = sec.x.astype(int), sec.y.astype(int)
    on = sec.nuclei[yi, xi].mean()
    ok = (xi < h) & (yi < w)
    swapped = sec.nuclei[np.clip(xi[ok], 0, h - 1), np.clip(yi[ok], 0, w - 1)].mean()
    assert on > 0.55
    assert swapped < 0.35
    rng = np.random.default_rng(0)
    sample = rng.choice(len(xi), 1000, replace=False)
    near = [sec.nuclei[max(0, y - 30):y + 31, max(0, x - 30):x + 31].any() for x, y in zip(xi[sample], yi[sample])]
    assert np.mean(near) > 0.85


def test_rendered_image_shows_nuclei_and_boundaries(ca1_section):
    img, nuc = ca1_section.image, ca1_section.nuclei
    assert img.dtype == np.float32 and img.shape == (5471, 7602)
    assert set(np.unique(img[::7, ::7]).tolist()) <= {0.0, RENDER_BOUNDARY, RENDER_INTERIOR}
    assert (img[~nuc] == 0).all()
    inside = img[nuc]
    assert 0.05 < (inside == RENDER_BOUNDARY).mean() < 0.4  # a ring per nucleus, not the whole nucleus
    assert ca1_section.image_rendered and ca1_section.n_clipped == 6  # six spots at x = -1


def test_working_scale_keeps_spots_on_nuclei(ca1_maps, ca1_section):
    """A coarser pixel can only be more often on a nucleus than the full-size one (61 %)."""
    m = ca1_maps
    assert m.shape == (1368, 1901)
    yi, xi = np.floor(m.spot_y).astype(int), np.floor(m.spot_x).astype(int)
    full = ca1_section.nuclei[ca1_section.y.astype(int), ca1_section.x.astype(int)].mean()
    assert full <= (m.image[yi, xi] > 0).mean() < full + 0.1


# ------------------------------------------------------------------ classes


def test_class_map_follows_the_documented_rule(ca1_maps):
    """Recompute the densities by brute force at random pixels and apply the rule."""
    m = ca1_maps
    sy, sx = m.scale
    sigma = RULE.density_sigma * (sx + sy) / 2
    # spots are binned to their working pixel centre before smoothing
    px = np.floor(m.spot_x) + 0.5
    py = np.floor(m.spot_y) + 0.5
    rng = np.random.default_rng(1)
    tissue_pixels = np.argwhere(m.classes != BACKGROUND)
    for y, x in tissue_pixels[rng.choice(len(tissue_pixels), 150, replace=False)]:
        d = {}
        for cls in (GENE_A, GENE_B):
            sel = m.spot_class == cls
            r2 = (px[sel] - (x + 0.5)) ** 2 + (py[sel] - (y + 0.5)) ** 2
            d[cls] = np.exp(-r2 / (2 * sigma ** 2)).sum()
            assert d[cls] == pytest.approx(float((m.density_a if cls == GENE_A else m.density_b)[y, x]),
                                           rel=2e-2, abs=2e-2)
        expect = TISSUE
        if d[GENE_A] >= RULE.min_density and d[GENE_A] > d[GENE_B]:
            expect = GENE_A
        elif d[GENE_B] >= RULE.min_density and d[GENE_B] >= d[GENE_A]:
            expect = GENE_B
        margin = abs(d[GENE_A] - d[GENE_B]) > 0.05 and min(abs(d[GENE_A] - 2), abs(d[GENE_B] - 2)) > 0.05
        if margin:  # away from a decision boundary, float noise cannot flip the class
            assert m.classes[y, x] == expect


def test_background_is_far_from_nuclei_and_spots(ca1_maps):
    m = ca1_maps
    r = RULE.tissue_radius * 0.25
    for y, x in zip(np.floor(m.spot_y).astype(int)[::97], np.floor(m.spot_x).astype(int)[::97]):
        assert m.classes[y, x] != BACKGROUND
    bg = np.argwhere(m.classes == BACKGROUND)
    pts = np.stack([m.spot_y, m.spot_x], 1)
    for y, x in bg[np.random.default_rng(2).choice(len(bg), 50, replace=False)]:
        assert np.sqrt(((pts - [y + 0.5, x + 0.5]) ** 2).sum(1)).min() > r - 1.5


def test_default_genes_make_distinct_layers(ca1_maps):
    frac = np.bincount(ca1_maps.classes.ravel(), minlength=4) / ca1_maps.classes.size
    assert 0.05 < frac[GENE_A] < 0.3 and 0.05 < frac[GENE_B] < 0.3 and frac[TISSUE] > 0.1
    # Neurod6 lines the pyramidal layer: most of its spots are gene_b pixels, few are gene_a.
    yi, xi = np.floor(ca1_maps.spot_y).astype(int), np.floor(ca1_maps.spot_x).astype(int)
    b = ca1_maps.spot_class == GENE_B
    a = ca1_maps.spot_class == GENE_A
    assert (ca1_maps.classes[yi[b], xi[b]] == GENE_B).mean() > 0.8
    assert (ca1_maps.classes[yi[a], xi[a]] == GENE_A).mean() > 0.6


# ------------------------------------------------------------------ splits


def _x_clear(boxes, band, margin):
    return all(x1 <= band["x0"] - margin or x0 >= band["x1"] + margin for _, x0, _, x1 in boxes)


@pytest.mark.parametrize("train_bags", ["spots", "regions"])
def test_no_training_patch_touches_the_held_out_bands(ca1_dir, train_bags):
    cfg = config(n_train_bags=60, n_val_bags=6, n_test_bags=10, train_bags=train_bags)
    splits = mb.MouseBrain().load(cfg, 3, str(ca1_dir.parent))
    info = splits.info
    assert info["source"] == "data-root" and info["image_rendered"] is True
    test, val, margin = info["test_area"], info["val_band"], info["margin_px"]
    assert margin >= cfg["instance_size"]
    boxes = splits.train.pixel_boxes()
    assert len(boxes) >= 60
    assert _x_clear(boxes, test, margin) and _x_clear(boxes, val, margin)
    assert all(test["x0"] <= x0 and x1 <= test["x1"] for _, x0, _, x1 in splits.test.pixel_boxes())
    assert all(val["x0"] <= x0 and x1 <= val["x1"] for _, x0, _, x1 in splits.val.pixel_boxes())
    assert not set(splits.train.instance_ids()) & set(splits.test.instance_ids())


def test_region_bags_are_regions_with_majority_tile_labels(ca1_dir, ca1_maps):
    splits = mb.MouseBrain().load(config(n_train_bags=4, n_val_bags=4, n_test_bags=8), 0, str(ca1_dir.parent))
    labels = [b.label for b in splits.test]
    assert sorted(labels) == [0, 0, 0, 0, 1, 1, 1, 1]
    for bag in splits.test:
        assert bag.instances.shape == (16, 1, 32, 32) and bag.grid_shape == (4, 4)
        y, x = (int(v) for v in bag.bag_id.split("@y")[1].split("x"))
        np.testing.assert_array_equal(bag.image()[0].numpy(), ca1_maps.image[y:y + 128, x:x + 128])
        np.testing.assert_array_equal(bag.mask.numpy(), ca1_maps.classes[y:y + 128, x:x + 128])
        tiles = bag.mask.numpy().reshape(4, 32, 4, 32).transpose(0, 2, 1, 3).reshape(16, -1)
        assert [int(np.bincount(t, minlength=4).argmax()) for t in tiles] == bag.instance_labels.tolist()
        a_frac = (bag.mask == GENE_A).float().mean().item()
        assert a_frac >= 0.25 if bag.label else a_frac < min(0.25, 0.5 / 16)
        assert bag.key_class == GENE_A


def test_spot_bags_carry_spot_labels(ca1_dir, ca1_section):
    splits = mb.MouseBrain().load(config(n_train_bags=10, n_val_bags=2, n_test_bags=2), 0, str(ca1_dir.parent))
    spec = splits.spec
    assert spec.n_classes == 4 and spec.instance_classes == CLASS_NAMES and spec.key_class == 1
    assert sorted(b.label for b in splits.train) == [0] * 5 + [1] * 5
    for bag in splits.train:
        n_a = int((bag.instance_labels == GENE_A).sum())
        assert n_a == (4 if bag.label else 0)  # round(0.25 * 16)
        for iid, lab in zip(bag.instance_ids, bag.instance_labels.tolist()):
            kind = iid.split(":")[1]
            if kind.startswith("spot"):
                gene = ca1_section.genes[int(kind[4:])]
                assert lab == {"Plp1": GENE_A, "Neurod6": GENE_B}.get(gene, TISSUE)
            else:
                assert kind.startswith("bg") and lab == BACKGROUND
        # the spot sits at pixel p // 2 of its patch: the centre of a 32 px patch is on tissue
        assert bag.mask.shape == (128, 128)


def test_load_is_deterministic_per_seed(ca1_dir):
    cfg = config(n_train_bags=8, n_val_bags=4, n_test_bags=6)
    a = mb.MouseBrain().load(cfg, 5, str(ca1_dir.parent)).info["ids_hash"]
    b = mb.MouseBrain().load(cfg, 5, str(ca1_dir.parent)).info["ids_hash"]
    c = mb.MouseBrain().load(cfg, 6, str(ca1_dir.parent)).info["ids_hash"]
    assert a == b and a["train"] != c["train"] and a["test"] != c["test"]
    # test bags do not depend on how many training bags are drawn
    d = mb.MouseBrain().load(config(n_train_bags=12, n_val_bags=4, n_test_bags=6), 5, str(ca1_dir.parent))
    assert d.info["ids_hash"]["test"] == a["test"]


def test_embedded_copy_is_used_without_a_data_root(isolated_roots):
    ds = mb.MouseBrain()
    st = ds.status(None)
    assert st.found and st.complete and Path(st.root) == EMBEDDED
    splits = ds.load(config(n_train_bags=2, n_val_bags=2, n_test_bags=2, bag_size=4), 0, None)
    assert splits.info["source"] == "embedded"
    assert all(str(EMBEDDED) in f for f in splits.info["files"])


def test_default_evaluation_regions_fit_the_shipped_section(isolated_roots):
    """The default 200 validation and 200 test regions (balanced) fit the CA1 section's bands, and each
    seed draws its own: 40 test regions had made the test AUC's sampling error (about 0.07) as large as
    the methods' seed spread."""
    ds = mb.MouseBrain()
    cfg = config(n_train_bags=2)
    assert (cfg["n_val_bags"], cfg["n_test_bags"]) == (200, 200)
    a, b = ds.load(cfg, 0, None), ds.load(cfg, 1, None)
    for split in ("val", "test"):
        labels = [bag.label for bag in getattr(a, split)]
        assert len(labels) == 200 and sum(labels) == 100
    assert a.test.pixel_boxes() != b.test.pixel_boxes()


def test_config_errors_are_one_line(ca1_dir):
    ds = mb.MouseBrain()
    root = str(ca1_dir.parent)
    cases = [
        (dict(bag_size=7), "rectangle"),
        (dict(gene_a="Plp2"), "close matches: Plp1"),
        (dict(gene_b="Plp1"), "both 'Plp1'"),
        (dict(test_band=0.7, val_band=0.75), "overlap"),
        (dict(n_test_bags=5000), "test band"),
    ]
    for over, text in cases:
        with pytest.raises(ConfigError) as e:
            ds.load(config(**{"n_train_bags": 2, "n_val_bags": 2, "n_test_bags": 2, **over}), 0, root)
        assert text in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------ DAPI image layout


def _write_image_section(folder: Path, image01: np.ndarray, genes, x, y, kind="tif",
                         cols=("target", "col_um", "row_um"), scale=2.0) -> None:
    import pandas as pd

    folder.mkdir(parents=True)
    if kind == "tif":
        import tifffile

        tifffile.imwrite(folder / "dapi.tif", np.round(image01 * 65535).astype(np.uint16))
    else:
        from PIL import Image

        Image.fromarray(np.round(image01 * 255).astype(np.uint8)).save(folder / "dapi.png")
    pd.DataFrame({cols[0]: genes, cols[1]: np.asarray(x) / scale, cols[2]: np.asarray(y) / scale}).to_csv(
        folder / "reads.csv", index=False)


CROP = (0, 1600, 2000, 3600)  # rows y0:y1, cols x0:x1 in section pixels (multiples of 4)


@pytest.fixture(scope="module")
def dapi_crop(ca1_section, tmp_path_factory):
    y0, y1, x0, x1 = CROP
    sec = ca1_section
    sel = (sec.x >= x0) & (sec.x < x1) & (sec.y >= y0) & (sec.y < y1)
    folder = tmp_path_factory.mktemp("dapi") / "crop"
    _write_image_section(folder, sec.image[y0:y1, x0:x1], sec.genes[sel], sec.x[sel] - x0, sec.y[sel] - y0)
    return folder, sel


def test_dapi_tiff_section_loads_like_the_rendered_one(ca1_section, dapi_crop):
    folder, sel = dapi_crop
    y0, y1, x0, x1 = CROP
    cols = SpotColumns("target", "col_um", "row_um", 2.0)
    sec = read_section(folder, cols)
    assert not sec.image_rendered and sec.shape == (y1 - y0, x1 - x0)
    np.testing.assert_allclose(sec.image, ca1_section.image[y0:y1, x0:x1], atol=1 / 65535)
    np.testing.assert_array_equal(sec.genes, ca1_section.genes[sel])
    np.testing.assert_allclose(sec.x, ca1_section.x[sel] - x0)
    np.testing.assert_allclose(sec.y, ca1_section.y[sel] - y0)
    # Otsu on the rendered grey levels finds the nuclei again (possibly without their rim)
    truth = ca1_section.nuclei[y0:y1, x0:x1]
    assert (sec.nuclei & ~truth).sum() == 0 and sec.nuclei.sum() >= 0.8 * truth.sum()


def test_dapi_section_gives_the_same_class_map_inside_the_crop(ca1_section, dapi_crop):
    folder, sel = dapi_crop
    y0, y1, x0, x1 = CROP
    cols = SpotColumns("target", "col_um", "row_um", 2.0)
    crop_maps = prepare_section(read_section(folder, cols), 0.25, RULE)
    # the whole-section reference restricted to the crop's spots (densities near the crop edge differ otherwise)
    ref = Section(ca1_section.image[y0:y1, x0:x1], ca1_section.nuclei[y0:y1, x0:x1], ca1_section.genes[sel],
                  ca1_section.x[sel] - x0, ca1_section.y[sel] - y0, "ref", [], True)
    ref_maps = prepare_section(ref, 0.25, RULE)
    np.testing.assert_allclose(crop_maps.image, ref_maps.image, atol=1e-4)
    agree = (crop_maps.classes == ref_maps.classes).mean()
    assert agree > 0.998
    assert set(np.unique(crop_maps.classes).tolist()) == {0, 1, 2, 3}


def test_dataset_reads_a_png_section_by_name_under_a_data_root(tmp_path, ca1_section, isolated_roots):
    y0, y1, x0, x1 = CROP
    sec = ca1_section
    sel = (sec.x >= x0) & (sec.x < x1) & (sec.y >= y0) & (sec.y < y1)
    _write_image_section(tmp_path / "root" / "my-brain", sec.image[y0:y1, x0:x1], sec.genes[sel],
                         sec.x[sel] - x0, sec.y[sel] - y0, kind="png", cols=("Gene", "x", "y"), scale=1.0)
    cfg = config(section="my-brain", n_train_bags=4, n_val_bags=2, n_test_bags=2, bag_size=4,
                 test_band=0.0, test_band_width=0.3, val_band=0.7, val_band_width=0.3)
    splits = mb.MouseBrain().load(cfg, 0, str(tmp_path / "root"))
    assert splits.info["source"] == "data-root" and splits.info["image_rendered"] is False
    assert splits.info["files"][1].endswith("dapi.png")
    assert splits.test[0].mask.shape == (64, 64)


def test_second_section_is_the_test_set(tmp_path, ca1_section, isolated_roots):
    sec = ca1_section
    for name, (x0, x1) in {"left": (1200, 3600), "right": (3600, 6000)}.items():
        sel = (sec.x >= x0) & (sec.x < x1) & (sec.y < 2000)
        _write_image_section(tmp_path / name, sec.image[:2000, x0:x1], sec.genes[sel], sec.x[sel] - x0, sec.y[sel],
                             cols=("Gene", "x", "y"), scale=1.0)
    cfg = config(section=str(tmp_path / "left"), test_section=str(tmp_path / "right"), n_train_bags=4,
                 n_val_bags=2, n_test_bags=4, bag_size=4, val_band=0.7, val_band_width=0.3)
    splits = mb.MouseBrain().load(cfg, 0, None)
    assert splits.info["test_area"]["kind"] == "section" and splits.info["test_area"]["section"] == "right"
    assert all(i.startswith("right:") for i in splits.test.instance_ids())
    assert all(i.startswith("left:") for i in splits.train.instance_ids())
    assert splits.test.area.section == "right"
    with pytest.raises(ConfigError, match="test_section is the training section"):
        mb.MouseBrain().load({**cfg, "test_section": str(tmp_path / "left")}, 0, None)


# ------------------------------------------------------------------ bad inputs


def _tiny_section(folder: Path, csv_text: str, image: np.ndarray | None = None) -> Path:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    img = image if image is not None else np.tile(np.linspace(0, 1, 100, dtype=np.float32), (80, 1))
    tifffile.imwrite(folder / "nuclei.tif", (img * 255).astype(np.uint8))
    (folder / "spots.csv").write_text(csv_text)
    return folder


def _one_line_error(exc_type, fn, *match):
    with pytest.raises(exc_type) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for m in match:
        assert m in msg, msg
    return msg


def test_spots_outside_the_image(tmp_path):
    f = _tiny_section(tmp_path / "s", "Gene,x,y\nPlp1,10,10\nNeurod6,450,20\n")
    _one_line_error(DataError, lambda: read_section(f), "1 of 2 spots", "80x100 image", "Neurod6 at x=450")
    # one pixel outside is rounding: clipped onto the edge and counted
    g = _tiny_section(tmp_path / "t", "Gene,x,y\nPlp1,-1,10\nNeurod6,99,79.5\n")
    sec = read_section(g)
    assert sec.n_clipped == 2 and sec.x.min() == 0 and sec.y.max() == 79


def test_unknown_gene_lists_close_matches(tmp_path):
    f = _tiny_section(tmp_path / "s", "Gene,x,y\nPlp1,10,10\nNeurod6,45,20\nNeurod1,4,2\n")
    sec = read_section(f)
    msg = _one_line_error(ConfigError, lambda: prepare_section(sec, 0.5, LabelRule("Neurod2", "Plp1")),
                          "gene_a 'Neurod2'", "close matches")
    assert "Neurod6" in msg and "Neurod1" in msg
    _one_line_error(ConfigError, lambda: prepare_section(sec, 0.5, LabelRule("Plp1", "Xyz9")), "gene_b 'Xyz9'")


def test_empty_or_malformed_spots_table(tmp_path):
    f = _tiny_section(tmp_path / "s", "Gene,x,y\n")
    _one_line_error(DataError, lambda: read_section(f), "has no rows")
    g = _tiny_section(tmp_path / "t", "gene,px,py\nPlp1,1,1\n")
    _one_line_error(DataError, lambda: read_section(g), "no column 'Gene'", "columns: gene, px, py")
    u = _tiny_section(tmp_path / "u", "Gene,x,y\nPlp1,one,1\n")
    _one_line_error(DataError, lambda: read_section(u), "numeric x/y")
    h = _tiny_section(tmp_path / "v", "")
    _one_line_error(DataError, lambda: read_section(h), "cannot read spots table")


def test_unreadable_or_blank_image(tmp_path):
    f = _tiny_section(tmp_path / "s", "Gene,x,y\nPlp1,1,1\n")
    (f / "nuclei.tif").write_bytes(b"this is not a tiff")
    _one_line_error(DataError, lambda: read_section(f), "cannot read image", "nuclei.tif")
    g = _tiny_section(tmp_path / "t", "Gene,x,y\nPlp1,1,1\n", image=np.zeros((20, 20), np.float32))
    _one_line_error(DataError, lambda: read_section(g), "blank")
    h = tmp_path / "u"
    shutil.copytree(f, h)
    (h / "nuclei.tif").unlink()
    _one_line_error(DataError, lambda: read_section(h), "exactly one nuclei image")
    _one_line_error(DataError, lambda: read_label_image(tmp_path / "missing.npz"), "cannot read label image")
    _one_line_error(DataError, lambda: locate_section("no-such-section", str(tmp_path)),
                    "section 'no-such-section' not found")


def test_plugin_module_does_not_import_torch():
    """Registering the plugin (importing the package the entry point names) imports neither
    torch nor the package's data modules; those load when a run builds its bags."""
    import subprocess
    import sys

    code = ("import sys; import milbench_plugins.mouse_brain as m; "
            "assert callable(m.milbench_register_datasets); "
            "print('torch' in sys.modules, sorted(k for k in sys.modules if k.startswith(m.__name__ + '.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False []"
