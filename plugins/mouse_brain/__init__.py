"""The ``mouse-brain`` dataset: a nuclei image of a brain section labelled by gene expression.

Data. By default the pciSeq CA1 section (Qian et al., Nature Methods 2020;
BSD licence as pciSeq declares it, notice in ``data/mouse-brain-ca1/NOTICE``): 72,336 in situ
sequencing spots of 92 genes over a 5471 x 7602 nuclei segmentation, from
which the nuclei image is rendered (the record says ``image_rendered``). It
is looked for as ``mouse-brain-ca1`` under ``--data-root``, then
``$MILBENCH_DATA_ROOT``, then the user cache, and finally the copy shipped in
this package (``source: "embedded"`` -- the complete section, not a sample).
``section`` names another section folder (absolute, or relative to a data
root): a DAPI TIFF/PNG with a spots CSV, read as described in
:mod:`.section`; :mod:`.class_maps` states the class-map rule.

Default genes. ``gene_a = Plp1`` and ``gene_b = Neurod6`` are the two genes of
the section with the clearest, most different morphology, by the data:

* Plp1 (5,125 spots, 78 % on a segmented nucleus, 679 cells) is the
  oligodendrocyte myelin gene; its spots line the outer edge of the arc
  (alveus / white matter, where nuclei are sparse) and form small clusters
  around single oligodendrocytes inside the strata.
* Neurod6 (9,235 spots -- the most frequent gene -- 71 % on a nucleus, 1,328
  cells) marks pyramidal neurons; its spots fill the pyramidal layer, the
  densest band of nuclei.

With the default rule the two classes cover 13.7 % and 11.0 % of the
section's pixels (background 55.7 %, tissue 19.6 %); 93 % of Plp1 spots lie
on gene_a pixels and 98 % of Neurod6 spots on gene_b pixels, so each class
is one gene's territory. The next most frequent gene, Cplx2 (6,712 spots,
only 29 % on a nucleus), falls 16 % / 52 % / 32 % on gene_a / gene_b /
tissue pixels: spread over every layer, it would make a class without a
morphology of its own.

Classes: 0 background, 1 gene_a (the bags' key class), 2 gene_b, 3 tissue.

Splits. With one section the test split is a vertical band
(``test_band`` .. ``test_band + test_band_width`` of the width) and the
validation split another band (``val_band``); no training patch comes closer
than ``band_margin`` patches (>= 1) to either. With ``test_section`` set, the
whole of that section is the test area and only the validation band is held
out of the training section (the paper's setting).

* Validation and test bags are regions: ``grid_shape(bag_size)`` tiles of
  ``instance_size`` px, ``mask`` the region's class map, ``instance_labels``
  each tile's majority class. A region is positive when at least
  ``key_fraction`` of its pixels are gene_a, negative when its gene-A pixels
  add up to less than half a tile (so no tile is mostly gene_a) and to less
  than ``key_fraction``; regions in between are not drawn. Every region has at
  least ``min_tissue_fraction`` non-background pixels. Half the bags are
  positive. Candidate regions lie on a grid of ``instance_size // 2`` px and
  may overlap.
* Training bags (``train_bags = "spots"``, default) hold spot-centred and
  background patches, labelled as in the seed paper; a positive bag holds
  ``round(key_fraction * bag_size)`` gene-A patches (as qmnist bags hold key
  digits), the other slots are drawn evenly from gene_b, tissue and
  background. Every method trains on the same bags; a MIL method reads only
  the bag label, the transcriptome CNN the patch labels. With
  ``train_bags = "regions"`` training bags are regions like the test bags.

The package. This module declares the dataset's keys and registers it; it
imports nothing heavy, so ``milbench list`` stays fast. The work is in

* :mod:`.section` -- finding a section folder and reading its image and spots;
* :mod:`.class_maps` -- the classes and the gene -> class-map rule;
* :mod:`.regions` -- held-out bands, training intervals, region sampling;
* :mod:`.bags` -- the training patch pool, bag plans and the lazy bag sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from milbench.api import ConfigError, DataStatus, Dataset, Param, Splits, bag_params, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Every key the dataset reads (the harness supplies none).
PARAMS: dict[str, Param] = {
    # bags are rectangles of tiles, so no bag_size_std
    # 200 validation and 200 test regions, not 20 and 40: regions are drawn per seed, and on 40 test regions
    # (20 x 20 pairs) a bag AUC's sampling error alone is about 0.07, the size of the MIL methods' whole seed
    # spread (results/README.md, mouse-brain). The CA1 section's validation band holds 155 positive and 110
    # negative candidate regions of 4 x 4 tiles (half-tile grid, overlapping), its test band 240 and 230.
    **bag_params(bag_size=16, instance_size=32, key_fraction=0.25, n_train_bags=150, n_val_bags=200, n_test_bags=200,
                 bag_size_std=None, help={
                     "bag_size": "tiles per bag; must fill a rows x cols rectangle (grid_shape): 4, 9, 16, 20, 25 ...",
                     "instance_size": "tile / patch side in working pixels",
                     "key_fraction": "positive bag: share of gene-A patches (training spot bags) or minimal share of "
                                     "gene-A pixels (region bags)",
                     "n_val_bags": "validation bags (regions in the validation band)",
                     "n_test_bags": "test bags (regions in the test band or test section)"}),
    "section": Param(None, str, "section folder (absolute or under a data root); none: mouse-brain-ca1",
                     nullable=True),
    "test_section": Param(None, str, "second section folder used as the whole test set; none: test band",
                          nullable=True),
    "gene_a": Param("Plp1", str, "gene of class gene_a (the key class)"),
    "gene_b": Param("Neurod6", str, "gene of class gene_b"),
    "image_scale": Param(0.25, float, "working pixels per section pixel (area-averaged)", low=0, high=1,
                         low_open=True),
    "spots_gene_col": Param("Gene", str, "spots table column of the gene name"),
    "spots_x_col": Param("x", str, "spots table column of the x (image column) coordinate"),
    "spots_y_col": Param("y", str, "spots table column of the y (image row) coordinate"),
    "pixel_scale": Param(1.0, float, "section pixels per spots-table unit", low=0, low_open=True),
    "density_sigma": Param(50.0, float, "Gaussian sigma of the gene densities, section pixels", low=0,
                           low_open=True),
    "min_density": Param(2.0, float, "minimal Gaussian-weighted spot count for a gene class", low=0,
                         low_open=True),
    "tissue_radius": Param(100.0, float, "tissue = within this many section pixels of a nucleus or spot",
                           low=0),
    "test_band": Param(0.3, float, "left edge of the held-out test band, fraction of the width", low=0, high=1),
    "test_band_width": Param(0.2, float, "test band width, fraction of the width", low=0, high=1, low_open=True),
    "val_band": Param(0.8, float, "left edge of the validation band, fraction of the width", low=0, high=1),
    "val_band_width": Param(0.15, float, "validation band width, fraction of the width", low=0, high=1,
                            low_open=True),
    "band_margin": Param(1.0, float, "gap between training patches and a band, in patches", low=1),
    "min_tissue_fraction": Param(0.2, float, "minimal non-background share of a region bag", low=0, high=1),
    "train_bags": Param("spots", str, "training bags of spot-centred patches or of region tiles",
                        choices=("spots", "regions")),
    "patch_labels": Param("spot", str, "spot patch label: the spot's gene (paper) or the class map at it",
                          choices=("spot", "map")),
}


def _square_bag_size(n: int) -> tuple[int, int]:
    """(rows, cols) of a bag of ``n`` tiles; a one-line error when ``n`` does not fill the rectangle."""
    from milbench.api import grid_shape

    rows, cols = grid_shape(n)
    if rows * cols != n:
        valid = [k for k in range(1, 50) if grid_shape(k)[0] * grid_shape(k)[1] == k]
        raise ConfigError(f"bag_size={n} does not fill a rows x cols rectangle of tiles; "
                          f"valid: {', '.join(map(str, valid))}, ...")
    return rows, cols


class MouseBrain(Dataset):
    """The ``mouse-brain`` dataset: region and spot-patch bags of one section (module docstring)."""

    name = "mouse-brain"
    description = "nuclei image of a mouse brain section, classes from in situ sequencing spots (Dice)"
    params = PARAMS
    # the learning rate of imagenette (the same cnn encoder on image tiles): AdamW 3e-4 for every method
    defaults: Mapping[str, Any] = {"lr": 3e-4}
    presets = {
        # the transcriptome-CNN paper trained 20 epochs (a protocol key: every method gets them)
        "paper": {"bag_size": 25, "n_train_bags": 600, "n_val_bags": 40, "n_test_bags": 80, "epochs": 20},
    }
    smoke = {"bag_size": 4, "n_train_bags": 4, "n_val_bags": 2, "n_test_bags": 2}
    augmentation = "per tile: dihedral flips/rotations, contrast +-10%, brightness +-0.1 std"

    def augment(self, instances: "torch.Tensor", generator: "torch.Generator") -> "torch.Tensor":
        """A nuclei image has no orientation: any flip or 90° turn of a tile is another valid tile."""
        from milbench.api import color_jitter, random_flips

        return color_jitter(random_flips(instances, generator), generator, brightness=0.1, contrast=0.1)

    def status(self, data_root: str | None, overrides: Sequence[str] = ()) -> DataStatus:
        from milbench.api import DataError

        from .section import locate_section, section_layout

        path, source, tried = locate_section(None, data_root)
        try:
            files = section_layout(path)
        except DataError as e:
            return DataStatus(self.name, True, False, str(path), "partial", str(e), tried)
        what = "the shipped copy of the complete CA1 section" if source == "embedded" else "CA1 section"
        return DataStatus(self.name, True, True, str(path), "full" if source != "embedded" else "sample",
                          f"{what}: {', '.join(p.name for p in files.values())}", tried,
                          "ships with milbench; no download needed")

    def verify(self, data_root: str | None, quick: bool = False) -> list[str]:
        from milbench.api import MilbenchError

        from .section import CA1_SHA256, SpotColumns, file_sha256, locate_section, read_section, section_layout

        path, _, _ = locate_section(None, data_root)
        problems = []
        try:
            files = section_layout(path)
        except MilbenchError as e:
            return [str(e)]
        for f in files.values():
            want = CA1_SHA256.get(f.name)
            if want and file_sha256(f) != want:
                problems.append(f"{f}: sha256 differs from the pciSeq CA1 file")
        if not problems:
            try:
                read_section(path, SpotColumns())
            except MilbenchError as e:
                problems.append(str(e))
        return problems

    def load(self, config: Mapping[str, Any], seed: int, data_root: str | None) -> Splits:
        import numpy as np

        from milbench.api import DataSpec

        from .bags import PatchBags, RegionBags, patch_pool, plan_patch_bags, split_hash
        from .class_maps import CLASS_NAMES, KEY_CLASS, LabelRule, load_section_maps
        from .regions import Area, band_from_fractions, free_intervals, sample_regions
        from .section import SpotColumns, locate_section

        rows, cols = _square_bag_size(config["bag_size"])
        p = config["instance_size"]
        cols_spec = SpotColumns(config["spots_gene_col"], config["spots_x_col"], config["spots_y_col"],
                                float(config["pixel_scale"]))
        rule = LabelRule(config["gene_a"], config["gene_b"], float(config["density_sigma"]),
                         float(config["min_density"]), float(config["tissue_radius"]))
        scale = float(config["image_scale"])
        path, source, _ = locate_section(config["section"], data_root)
        maps = load_section_maps(path, cols_spec, scale, rule)
        test_maps = None
        if config["test_section"] is not None:
            tpath, _, _ = locate_section(config["test_section"], data_root)
            if tpath.resolve() == Path(path).resolve():
                raise ConfigError("test_section is the training section; name a different section folder")
            test_maps = load_section_maps(tpath, cols_spec, scale, rule)

        h, w = maps.shape
        margin = int(np.ceil(config["band_margin"] * p))
        val_band = band_from_fractions(config["val_band"], config["val_band_width"], w)
        bands = [val_band]
        test_band = None
        if test_maps is None:
            test_band = band_from_fractions(config["test_band"], config["test_band_width"], w)
            if test_band.x0 < val_band.x1 + margin and val_band.x0 < test_band.x1 + margin:
                raise ConfigError(f"test band [{config['test_band']:g}, +{config['test_band_width']:g}] and "
                                  f"validation band [{config['val_band']:g}, +{config['val_band_width']:g}] "
                                  f"overlap or lie closer than band_margin; move one of them")
            bands.append(test_band)
        train_free = free_intervals(w, bands, margin)
        region_hw = (rows * p, cols * p)
        step = max(1, p // 2)
        kf, mt = float(config["key_fraction"]), float(config["min_tissue_fraction"])
        rng_train, rng_val, rng_test = (np.random.default_rng([seed, k]) for k in (0, 1, 2))

        val_regions = sample_regions(maps, region_hw, [(val_band.x0, val_band.x1)], config["n_val_bags"], kf, mt,
                                     rng_val, "validation band", step, p)
        val = RegionBags(maps, val_regions, rows, cols, p, "val")
        if test_maps is None:
            test_area = Area(maps.image[:, test_band.x0:test_band.x1], maps.classes[:, test_band.x0:test_band.x1],
                             test_band.x0, test_band.x1, maps.name)
            test_regions = sample_regions(maps, region_hw, [(test_band.x0, test_band.x1)], config["n_test_bags"],
                                          kf, mt, rng_test, "test band", step, p)
            test = RegionBags(maps, test_regions, rows, cols, p, "test", test_area)
        else:
            tw = test_maps.shape[1]
            test_area = Area(test_maps.image, test_maps.classes, 0, tw, test_maps.name)
            test_regions = sample_regions(test_maps, region_hw, [(0, tw)], config["n_test_bags"], kf, mt, rng_test,
                                          "test section", step, p)
            test = RegionBags(test_maps, test_regions, rows, cols, p, "test", test_area)

        pool_info: dict[str, Any] = {}
        if config["train_bags"] == "spots":
            pool = patch_pool(maps, p, train_free, config["patch_labels"], rng_train)
            plans = plan_patch_bags(pool.classes, config["n_train_bags"], rows * cols, kf, rng_train, "train")
            train = PatchBags(maps, pool, plans, p)
            pool_info = {name: int((pool.classes == k).sum()) for k, name in enumerate(CLASS_NAMES)}
        else:
            regions = sample_regions(maps, region_hw, train_free, config["n_train_bags"], kf, mt, rng_train,
                                     "training area", step, p)
            train = RegionBags(maps, regions, rows, cols, p, "train")

        spec = DataSpec(channels=1, instance_size=p, n_classes=len(CLASS_NAMES),
                        instance_classes=CLASS_NAMES, key_class=KEY_CLASS)
        counts = maps.gene_counts
        info: dict[str, Any] = {
            "source": source,
            "section": maps.name,
            "files": list(maps.files) + (list(test_maps.files) if test_maps is not None else []),
            "image_rendered": maps.image_rendered,
            "image": "rendered from segmentation" if maps.image_rendered else "nuclei (DAPI) image",
            "split_seed": seed,
            "working_shape": [h, w],
            "section_shape": list(maps.section_shape),
            "classes": list(CLASS_NAMES),
            "genes": {"gene_a": rule.gene_a, "gene_b": rule.gene_b,
                      "gene_a_spots": counts[rule.gene_a], "gene_b_spots": counts[rule.gene_b],
                      "other_spots": int(sum(counts.values()) - counts[rule.gene_a] - counts[rule.gene_b])},
            "spots_clipped_to_edge": maps.n_clipped,
            "test_area": ({"kind": "band", "x0": test_band.x0, "x1": test_band.x1, "units": "working px"}
                          if test_band is not None else {"kind": "section", "section": test_maps.name,
                                                          "files": list(test_maps.files)}),
            "val_band": {"x0": val_band.x0, "x1": val_band.x1, "units": "working px"},
            "margin_px": margin,
            "train_x_intervals": [list(iv) for iv in train_free],
            "train_bags": config["train_bags"],
            "train_patches_per_class": pool_info or None,
            "region_candidates": {"val": [val_regions.n_positive_candidates, val_regions.n_negative_candidates],
                                  "test": [test_regions.n_positive_candidates,
                                           test_regions.n_negative_candidates]},
            "ids_hash": {"train": split_hash(train), "val": split_hash(val), "test": split_hash(test)},
        }
        return Splits(spec, train, val, test, info)


@hookimpl
def milbench_register_datasets(register: Callable[[Dataset], None]) -> None:
    register(MouseBrain())
