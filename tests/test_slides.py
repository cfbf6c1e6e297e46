"""The ``slides`` dataset on real pyramidal files written by its generator.

Slides are generated once per module into a pytest tmp dir (small: 768 x 512
at level 0, three levels, SVS + generic TIFF + PNG, and a second set of SVS +
generic TIFF + OME-TIFF), from the MNIST digits shipped with milbench, so
nothing here needs ../shared/data. One large real slide is written too: the
pciSeq CA1 section shipped with the mouse_brain plugin (7,602 x 5,471 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

openslide = pytest.importorskip("openslide", reason="openslide-python / openslide-bin not installed")

from milbench.api import LazyBag, LazyImage, LazyInstances, RunContext  # noqa: E402
from milbench.errors import DataError  # noqa: E402
from milbench_plugins.slides import Slides  # noqa: E402
from milbench_plugins.slides.generator import generate  # noqa: E402
from milbench_plugins.slides.reader import open_slide  # noqa: E402
from milbench_plugins.slides.tiling import TilingKeys, tile_slide  # noqa: E402

from conftest import records_in, run_cli  # noqa: E402

SIZE = (768, 512)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slides")
    return generate(out, n=10, size=SIZE, formats=("svs", "tiff", "png"), levels=3, mpp=0.5, digit_px=32, seed=1)


def cfg(manifest: Path, cache: Path, **kw) -> dict:
    return {"manifest": str(manifest), "instance_size": 32, "tile_cache": str(cache), **kw}


def test_generated_files_are_real_pyramids(slides):
    svs, tif, png = (open_slide(slides.parent / f"slide-00{i}.{ext}", f"s{i}") for i, ext in
                     ((0, "svs"), (2, "tiff"), (4, "png")))
    assert (svs.backend, svs.format, tif.backend, tif.format) == ("openslide", "aperio", "openslide", "generic-tiff")
    for r in (svs, tif):
        assert r.level_count == 3 and r.level_downsamples == [1.0, 2.0, 4.0]
        assert r.dimensions == SIZE and abs(r.mpp - 0.5) < 1e-6
    assert png.backend == "pil" and png.level_count == 1 and png.mpp is None
    # a level-1 read shows the same picture as level 0 halved (JPEG: approximately)
    a = svs.read(0, 256, 128, 128, 128).astype(float)
    b = svs.read(1, 256, 128, 64, 64).astype(float)
    assert np.abs(a.reshape(64, 2, 64, 2, 3).mean((1, 3)) - b).mean() < 8


def test_tiling_finds_tissue_and_caches(slides, tmp_path):
    r = open_slide(slides.parent / "slide-000.svs", "slide-000")
    keys = TilingKeys(32, None, 0, 0.25, 0.05, 2048)
    first = tile_slide(r, keys, tmp_path)
    second = tile_slide(r, keys, tmp_path)
    assert not first.from_cache and second.from_cache
    assert np.array_equal(first.cells, second.cells)
    n_cells = (SIZE[0] // 32) * (SIZE[1] // 32)
    assert 0.1 * n_cells < len(first.cells) < 0.9 * n_cells  # blobs of tissue on glass, not everything
    # tissue tiles are pinker than the glass a dropped tile shows
    chroma = lambda t: float((t.max(-1) - t.min(-1)).mean())  # noqa: E731
    kept = np.mean([chroma(r.read(0, int(x), int(y), 32, 32).astype(float)) for x, y in first.xy0()[::10]])
    assert kept > 25 and chroma(r.read(0, 0, 0, 32, 32).astype(float)) < 12  # the corner is glass
    at_mpp = tile_slide(r, TilingKeys(32, 1.0, 0, 0.25, 0.05, 2048), tmp_path)  # level 1 (mpp 1.0)
    assert at_mpp.resolution.level == 1 and at_mpp.resolution.step0 == 64 and not at_mpp.from_cache
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_lazy_views_equal_the_materialised_bag(slides, tmp_path):
    import torch

    sp = Slides().load(cfg(slides, tmp_path), 0, None)
    bag = sp.train[0]
    assert isinstance(bag, LazyBag) and isinstance(bag.lazy_instances, LazyInstances)
    full = bag.instances
    assert full.shape == (len(bag), 3, 32, 32)
    x = bag.lazy_instances
    assert torch.equal(x[3:7], full[3:7])
    idx = torch.tensor([5, 1, 5, 0])
    assert torch.equal(x.index_select(0, idx), full[idx])
    img = bag.lazy_image
    assert isinstance(img, LazyImage)
    whole = bag.image()
    assert tuple(whole.shape) == (3, bag.grid_shape[0] * 32, bag.grid_shape[1] * 32)
    assert torch.equal(img.unsqueeze(0)[..., 10:70, 33:99][0], whole[:, 10:70, 33:99])
    # each instance sits where the grid says in the bag image
    r, c = bag.grid[2].tolist()
    assert torch.equal(whole[:, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32], full[2])


def test_streaming_over_the_lazy_image_is_exact(slides, tmp_path):
    import torch

    from milbench.models.streaming import StreamingTrunk
    from milbench_plugins.streamingclam.trunk import build_trunk

    bag = Slides().load(cfg(slides, tmp_path), 0, None).train[0]
    torch.manual_seed(0)
    stream = StreamingTrunk(build_trunk("small", 3, None, False).eval(), tile_size=128)
    ref = stream.trunk(bag.image().unsqueeze(0))[0]
    out = stream.forward_streamed(bag.lazy_image)
    assert torch.allclose(out, ref, atol=1e-4)


def _registry_plan(method: str, manifest: Path, cache: Path, *extra: str):
    from milbench.plugins import get_registry
    from milbench.runner import plan_run

    reg = get_registry(warn=False)
    plan = plan_run(reg, method, "slides", None, [f"manifest={manifest}", f"tile_cache={cache}", "bag_size=20",
                                                   *extra], 0, smoke=True)
    return reg.method(method), plan.config


@pytest.mark.parametrize("method", ["grad-accum", "sampled", "streamingclam"])
def test_chunked_methods_never_materialise_the_bag(method, slides, tmp_path, monkeypatch):
    import torch

    # level 1 and 256-px streaming tiles keep the streamed image small and the test quick
    extra = ("downsample=2", "tile_size=256") if method == "streamingclam" else ()
    m, config = _registry_plan(method, slides, tmp_path, *extra)
    sp = Slides().load(config, 0, None)
    torch.manual_seed(0)
    model = m.build(sp.spec, config, RunContext(device=torch.device("cpu"), seed=0))

    def refuse(self):
        raise AssertionError(f"{method} materialised the whole bag")

    monkeypatch.setattr(LazyBag, "instances", property(refuse))
    monkeypatch.setattr(LazyBag, "image", refuse)
    model.train()
    loss = m.backward(model, sp.train[0], config)
    assert np.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        pred = m.predict(model, sp.test[0], config)
    assert 0.0 <= pred.bag_prob <= 1.0 and pred.instance_scores.shape == (len(sp.test[0]),)


def test_grad_accum_on_a_lazy_bag_equals_abmil_on_the_tensor(slides, tmp_path):
    import torch

    m, config = _registry_plan("grad-accum", slides, tmp_path, "chunk_size=6")
    abmil, _ = _registry_plan("abmil", slides, tmp_path)
    bag = Slides().load(config, 0, None).train[1]
    grads = []
    for meth, b in ((m, bag), (abmil, bag.to("cpu"))):
        torch.manual_seed(0)
        model = m.build(Slides().spec(config), config, RunContext(device=torch.device("cpu"), seed=0)).train()
        meth.backward(model, b, config)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_augmented_lazy_bag_is_one_augmentation_however_it_is_read(slides, tmp_path):
    """An augmented slide bag (the harness's ``LazyBag.augmented``) is augmented tile by tile as it is
    read: chunks, repeats and the streamed image all show the same augmented pixels, and grad-accum's
    gradient on it still equals abmil's on the materialised bag."""
    import torch

    ds = Slides()
    m, config = _registry_plan("grad-accum", slides, tmp_path, "chunk_size=6")
    abmil, _ = _registry_plan("abmil", slides, tmp_path)
    plain = ds.load(config, 0, None).train[1]
    bag = plain.augmented(ds.augment, visit_seed=12345)
    full = bag.instances
    assert not torch.equal(full, plain.instances)  # it did augment
    x = bag.lazy_instances
    assert torch.equal(x[4:11], full[4:11]) and torch.equal(x.index_select(0, torch.tensor([9, 2, 9])), full[[9, 2, 9]])
    assert torch.equal(plain.augmented(ds.augment, visit_seed=12345).instances, full)  # same visit seed: same pixels
    assert not torch.equal(plain.augmented(ds.augment, visit_seed=7).instances, full)
    # the streamed image shows the augmented tiles where the grid puts them, background unchanged
    whole = bag.image()
    p = bag.patch_size
    for i in (0, len(bag) // 2, len(bag) - 1):
        r, c = bag.grid[i].tolist()
        assert torch.equal(whole[:, r * p:(r + 1) * p, c * p:(c + 1) * p], full[i])
    tissue = bag.instance_map(torch.ones(len(bag))) > 0
    assert torch.equal(whole[:, ~tissue], plain.image()[:, ~tissue])
    assert torch.equal(bag.lazy_image[..., 5:77, 17:90], whole[:, 5:77, 17:90])  # a crop across cell borders
    grads = []
    for meth, b in ((m, bag), (abmil, bag.to("cpu"))):
        torch.manual_seed(0)
        model = m.build(ds.spec(config), config, RunContext(device=torch.device("cpu"), seed=0)).train()
        meth.backward(model, b, config)
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_annotations_label_the_key_region(slides, tmp_path):
    sp = Slides().load(cfg(slides, tmp_path), 0, None)
    per = {p["slide_id"]: p for p in sp.info["per_slide"]}
    for sid, p in per.items():
        label = int(sid[-1]) % 2
        assert p["annotation_classes"] == (["Tumor"] if label else ["Stroma"])
        assert (p["key_tiles"] > 0) == bool(label), sid
        assert p["key_tiles"] < p["tiles"]
    bags = [b for split in (sp.train, sp.val, sp.test) for b in split]
    assert all(b.instance_labels_known for b in bags)
    # an unannotated manifest gives bags without instance truth: Dice skips them
    plain = slides.parent / "plain.csv"
    plain.write_text("slide_id,path,label\n" + "\n".join(
        line.rsplit(",", 1)[0] for line in slides.read_text().splitlines()[1:]) + "\n")
    sp2 = Slides().load(cfg(plain, tmp_path), 0, None)
    assert not sp2.train[0].instance_labels_known and sp2.info["annotated_slides"] == 0


def test_splits_are_seeded_stratified_and_by_slide(slides, tmp_path):
    a = Slides().load(cfg(slides, tmp_path), 3, None).info["slides"]
    b = Slides().load(cfg(slides, tmp_path), 3, None).info["slides"]
    c = Slides().load(cfg(slides, tmp_path), 4, None).info["slides"]
    assert a == b and a != c
    ids = [s for v in a.values() for s in v]
    assert len(ids) == len(set(ids)) == 10
    for split, members in a.items():
        labels = {int(s[-1]) % 2 for s in members}
        assert labels == {0, 1}, (split, members)  # each split holds both labels (5 + 5 slides)


def _bad(tmp: Path, slides: Path, rows: list[str], header: str = "slide_id,path,label,annotation") -> Path:
    base = slides.parent
    p = tmp / "bad.csv"
    p.write_text(header + "\n" + "\n".join(r.replace("@", str(base) + "/") for r in rows) + "\n")
    return p


GOOD = ["slide-000,@slide-000.svs,0,@slide-000.geojson", "slide-001,@slide-001.svs,1,@slide-001.geojson",
        "slide-002,@slide-002.tiff,0,", "slide-003,@slide-003.tiff,1,", "slide-004,@slide-004.png,0,",
        "slide-005,@slide-005.png,1,"]


@pytest.mark.parametrize("rows,extra,needle", [
    (GOOD + ["ghost,@nope.svs,1,"], {}, "slide 'ghost': file"),
    (GOOD + ["slide-009,@slide-009.png,2,"], {}, "slide 'slide-009' has label '2'"),
    (GOOD + ["slide-000,@slide-002.tiff,0,"], {}, "duplicate slide id 'slide-000'"),
    (GOOD + ["junk,@junk.svs,0,"], {}, "slide 'junk'"),
    (GOOD + ["blank,@blank.png,0,"], {}, "slide 'blank': no tissue found"),
    (GOOD + ["slide-008,@slide-008.tiff,0,@broken.geojson"], {}, "slide 'slide-008': annotation broken.geojson"),
    (GOOD, {"mpp": 0.25}, "requested mpp=0.25 would need upsampling"),
])
def test_bad_input_is_one_line_naming_the_slide(rows, extra, needle, slides, tmp_path):
    from PIL import Image

    base = slides.parent
    (base / "junk.svs").write_text("this is not a slide\n")
    Image.new("RGB", (256, 256), (240, 240, 240)).save(base / "blank.png")
    (base / "broken.geojson").write_text('{"type": "FeatureCollection", "features": [')
    manifest = _bad(tmp_path, slides, rows)
    with pytest.raises(DataError) as err:
        Slides().load(cfg(manifest, tmp_path, **extra), 0, None)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_instance_method_refuses_unannotated_slides(slides, tmp_path):
    import torch

    plain = _bad(tmp_path, slides, [r.rsplit(",", 1)[0] for r in GOOD] + ["slide-006,@slide-006.svs,0",
                                                                           "slide-007,@slide-007.svs,1"],
                 header="slide_id,path,label")
    m, config = _registry_plan("transcriptome-cnn", plain, tmp_path)
    sp = Slides().load(config, 0, None)
    model = m.build(sp.spec, config, RunContext(device=torch.device("cpu"), seed=0))
    with pytest.raises(DataError, match="has no instance labels"):
        m.backward(model, sp.train[0], config)


def test_cli_run_records_the_manifest_and_bad_input_exits_2(slides, tmp_path):
    import hashlib

    res = tmp_path / "res"
    env = {"MILBENCH_RESULTS": str(res)}
    r = run_cli("run", "-m", "grad-accum", "-d", "slides", "--smoke", "--device", "cpu",
                "--set", f"manifest={slides}", "--set", "downsample=2", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = records_in(res)[0]
    assert rec["status"] == "ok"
    assert rec["data"]["source"] == "slides"
    assert rec["data"]["manifest_sha256"] == hashlib.sha256(slides.read_bytes()).hexdigest()
    assert rec["metrics"]["bag_auc"] is not None and rec["metrics"]["dice"] is not None
    # No tile_cache: the coordinates are cached beside the records, and the next run there reads them.
    assert Path(rec["data"]["tiling"]["cache"]) == res / "cache" / "slide-tiles"
    assert not any(s["tiles_from_cache"] for s in rec["data"]["per_slide"])
    assert len(list((res / "cache" / "slide-tiles").glob("*.npz"))) == len(rec["data"]["per_slide"])
    r = run_cli("run", "-m", "sampled", "-d", "slides", "--smoke", "--device", "cpu",
                "--set", f"manifest={slides}", "--set", "downsample=2", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    again = [x for x in records_in(res) if x["method"] == "sampled"][0]
    assert again["status"] == "ok" and all(s["tiles_from_cache"] for s in again["data"]["per_slide"])
    bad = _bad(tmp_path, slides, GOOD + ["slide-009,@slide-009.png,7,"])
    r = run_cli("run", "-m", "abmil", "-d", "slides", "--smoke", "--device", "cpu", "--set", f"manifest={bad}",
                "--set", f"tile_cache={tmp_path / 'cache'}", env=env)
    assert r.returncode == 2
    lines = [line for line in r.stderr.strip().splitlines() if " on slides, preset " not in line]  # not the banner
    assert len(lines) == 1 and "slide-009" in lines[0] and "Traceback" not in r.stderr


def test_data_command_reports_the_manifest(slides, tmp_path):
    r = run_cli("data", "--json", "--set", f"manifest={slides}", "--set", f"tile_cache={tmp_path}",
                "--set", "instance_size=32")
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(x for x in json.loads(r.stdout) if x["name"] == "slides")
    assert row["complete"] and "10 slides" in row["detail"]
    assert "aperio x4" in row["detail"] and "generic-tiff x4" in row["detail"] and "png x2" in row["detail"]
    assert "tiles per slide at instance_size=32" in row["detail"]


# -- OME-TIFF (tifffile path) and a real large slide -------------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """Two slides each of SVS, generic TIFF and OME-TIFF in one manifest (slide-004/005 are OME-TIFF),
    written through the generator's command line."""
    from milbench_plugins.slides.generator import main

    out = tmp_path_factory.mktemp("mixed")
    assert main([str(out), "--n", "6", "--size", f"{SIZE[0]}x{SIZE[1]}", "--formats", "svs,tiff,ome-tiff",
                 "--levels", "3", "--mpp", "0.5", "--seed", "2"]) == 0
    return out / "manifest.csv"


def test_ome_tiff_is_a_subifd_pyramid_read_through_tifffile(mixed, tmp_path):
    import tifffile

    path = mixed.parent / "slide-004.ome.tiff"
    with tifffile.TiffFile(path) as tif:  # laid out as OME-TIFF pyramids are: one IFD, reduced levels in its SubIFDs
        assert tif.is_ome and tif.is_bigtiff and len(tif.pages) == 1 and len(tif.pages[0].subifds) == 2
        assert 'PhysicalSizeX="0.5" PhysicalSizeXUnit="µm"' in tif.ome_metadata
        assert tif.pages[0].tags["ResolutionUnit"].value == 1  # no TIFF unit: mpp can only come from the OME-XML
    r = open_slide(path, "slide-004")
    assert (r.backend, r.format) == ("tifffile", "ome-tiff")
    assert r.level_count == 3 and r.level_downsamples == [1.0, 2.0, 4.0]
    assert r.dimensions == SIZE and abs(r.mpp - 0.5) < 1e-9
    a = r.read(0, 256, 128, 128, 128).astype(float)
    b = r.read(1, 256, 128, 64, 64).astype(float)
    assert np.abs(a.reshape(64, 2, 64, 2, 3).mean((1, 3)) - b).mean() < 8
    tiling = tile_slide(r, TilingKeys(32, None, 0, 0.25, 0.05, 2048), tmp_path)
    n_cells = (SIZE[0] // 32) * (SIZE[1] // 32)
    assert 0.1 * n_cells < len(tiling.cells) < 0.9 * n_cells
    chroma = lambda t: float((t.max(-1) - t.min(-1)).mean())  # noqa: E731
    kept = np.mean([chroma(r.read(0, int(x), int(y), 32, 32).astype(float)) for x, y in tiling.xy0()[::10]])
    assert kept > 25 and chroma(r.read(0, 0, 0, 32, 32).astype(float)) < 12
    at_mpp = tile_slide(r, TilingKeys(32, 1.0, 0, 0.25, 0.05, 2048), tmp_path)  # the mpp the OME-XML gave
    assert at_mpp.resolution.level == 1 and at_mpp.resolution.step0 == 64


def test_cli_run_on_svs_tiff_and_ome_tiff_slides(mixed, tmp_path):
    res = tmp_path / "res"
    r = run_cli("run", "-m", "grad-accum", "-d", "slides", "--smoke", "--device", "cpu",
                "--set", f"manifest={mixed}", "--set", f"tile_cache={tmp_path / 'cache'}",
                env={"MILBENCH_RESULTS": str(res)})
    assert r.returncode == 0, r.stderr[-2000:]
    rec = records_in(res)[0]
    assert rec["status"] == "ok"
    per = {p["slide_id"]: p for p in rec["data"]["per_slide"]}
    assert sorted((p["format"], p["backend"]) for p in per.values()) == sorted(
        [("aperio", "openslide")] * 2 + [("generic-tiff", "openslide")] * 2 + [("ome-tiff", "tifffile")] * 2)
    assert all(p["levels"] == 3 and p["mpp"] == 0.5 and p["tiles"] > 0 for p in per.values())


def test_mouse_brain_section_as_a_large_pyramidal_tiff(tmp_path):
    """The pciSeq CA1 section (7,602 x 5,471 px, full scale) written as a deflate-tiled 4-level TIFF.

    The label image is the truth: the slide shows its nuclei in haematoxylin on glass, so tiles the
    tiler keeps must hold nuclei, dense nuclei must be kept, and empty glass must give no tile."""
    import torch

    from milbench_plugins.mouse_brain.section import EMBEDDED, LABEL_IMAGE_NAME, read_label_image, render_nuclei
    from milbench_plugins.slides.bags import SlideBags, to_float
    from milbench_plugins.slides.generator import BACKGROUND, INK, write_slide

    image, nuclei = render_nuclei(read_label_image(EMBEDDED / LABEL_IMAGE_NAME))
    h, w = nuclei.shape
    assert (w, h) == (7602, 5471)
    lut = np.stack([BACKGROUND, (BACKGROUND + INK) / 2, INK]).round().astype(np.uint8)  # glass, rim, nucleus
    rgb = lut[(image * 2).astype(np.uint8)]
    del image
    # deflate (lossless) so read-backs equal ``rgb``; mpp 0.5 is nominal (the label image carries none)
    path = write_slide(tmp_path / "ca1", rgb, "tiff", levels=4, mpp=0.5, compression="zlib")
    r = open_slide(path, "ca1")
    assert (r.backend, r.format) == ("openslide", "generic-tiff")
    assert r.dimensions == (w, h) and r.level_count == 4 and abs(r.mpp - 0.5) < 1e-6
    assert r.level_dimensions[1] == (w // 2, h // 2)

    p = 64
    keys = TilingKeys(p, None, 0, 0.25, 0.05, 2048)
    cache = tmp_path / "cache"
    tiling = tile_slide(r, keys, cache)
    again = tile_slide(r, keys, cache)
    assert not tiling.from_cache and again.from_cache and len(list(cache.glob("ca1-*.npz"))) == 1
    assert np.array_equal(tiling.cells, again.cells) and np.array_equal(tiling.tissue, again.tissue)
    n_rows, n_cols = tiling.grid_size
    assert (n_rows, n_cols) == (h // p, w // p)
    share = nuclei[:n_rows * p, :n_cols * p].reshape(n_rows, p, n_cols, p).mean((1, 3))  # nucleus share per cell
    kept = np.zeros_like(share, bool)
    kept[tiling.cells[:, 0], tiling.cells[:, 1]] = True
    assert 0.05 * kept.size < kept.sum() < 0.5 * kept.size  # a section on a mostly empty slide
    assert (share[kept] > 0).mean() > 0.9  # kept tiles hold nuclei
    assert kept[share >= 0.4].mean() > 0.95  # and the densely nucleated ones are kept
    near = np.pad(share, 1)  # empty glass: no nucleus pixel in a cell or its 8 neighbours
    near = np.max([near[i:i + n_rows, j:j + n_cols] for i in range(3) for j in range(3)], axis=0)
    assert (near == 0).sum() > 0.3 * kept.size and not kept[near == 0].any()
    for rows, cols in ((slice(0, 10), slice(0, 10)), (slice(0, 10), slice(-10, None)),
                       (slice(-10, None), slice(-10, None))):  # three corners of the section image are empty
        assert share[rows, cols].max() == 0 and not kept[rows, cols].any()

    # a lazy bag over the slide reads each tile as the crop of the written image, converted as the reader does
    r0, r1, c0, c1 = tiling.bbox
    n = len(tiling.cells)
    bag = SlideBags([{"path": path, "slide_id": "ca1", "label": 1, "res": tiling.resolution, "cells": tiling.cells,
                      "xy0": tiling.xy0(), "bbox": tiling.bbox, "instance_labels": np.zeros(n, np.int64),
                      "annotated": False, "ids": [f"ca1:{i}" for i in range(n)]}])[0]
    assert len(bag) == n and bag.grid_shape == (r1 - r0, c1 - c0)
    idx = np.random.default_rng(0).choice(n, 24, replace=False)
    tiles = bag.lazy_instances.index_select(0, torch.as_tensor(idx))
    xy = tiling.xy0(idx)
    want = to_float(np.stack([rgb[y:y + p, x:x + p] for x, y in xy]))
    assert tiles.shape == (24, 3, p, p) and torch.equal(tiles, want)


@pytest.mark.parametrize("size, unit, mpp", [(0.25, None, 0.25), (250.0, "nm", 0.25), (0.0005, "mm", 0.5),
                                             (0.25, "furlong", None)])
def test_ome_mpp_honours_the_physical_size_unit(size, unit, mpp, tmp_path):
    """OME sizes may be in any unit (µm by default); an unknown unit gives no mpp, not a wrong one."""
    import numpy as np
    import tifffile

    from milbench_plugins.slides.reader import _tiff_mpp

    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit:
        meta.update(PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    path = tmp_path / "unit.ome.tiff"
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint8), ome=True, photometric="rgb", metadata=meta)
    with tifffile.TiffFile(path) as tif:
        got = _tiff_mpp(tif)
    assert got == pytest.approx(mpp) if mpp is not None else got is None


def test_streamed_head_on_a_lazy_slide_equals_the_whole_map(slides, tmp_path):
    """streamingclam's head run tile by tile over a lazy slide image (uint8, read per tile) gives the
    gradients of the whole-map head (float32 tolerance)."""
    import torch

    m, config = _registry_plan("streamingclam", slides, tmp_path, "downsample=2", "tile_size=128")
    sp = Slides().load(config, 0, None)
    bag = sp.train[0]
    grads = []
    for mode in ("always", "never"):
        cfg = {**config, "stream_head": mode}
        torch.manual_seed(0)
        model = m.build(sp.spec, cfg, RunContext(device=torch.device("cpu"), seed=0)).train()
        assert model.stream.tile_count(*bag.lazy_image.shape[-2:]) > 1, "the test must really stream"
        m.backward(model, bag, cfg)
        assert bool(model.tile_sizing.get("stream_head_streamed")) == (mode == "always")
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].shape == grads[1].shape
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
