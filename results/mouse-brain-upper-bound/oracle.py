"""The oracle ceiling of mouse-brain's bag task: bag AUC from the bags' *true* tile labels.

Why: before asking how well a model learns gene A from the nuclei image, ask whether
knowing every tile's class would decide the bag label at all. A region bag is
positive when at least ``key_fraction`` of its pixels are gene A and negative when
its gene-A pixels add up to less than half a tile, so a perfect tile classifier
scored by "any gene-A tile" or "share of gene-A tiles" should rank every positive
above every negative. This script checks that on the real bags (no training).

    MILBENCH_DATA_ROOT=../shared/data python results/mouse-brain-upper-bound/oracle.py [--seeds 0 1 2] \
        [--set key=value ...]

Writes ``oracle.json`` beside itself: per seed and split, the number of bags and the AUC of
three scores (share of gene-A tiles, any gene-A tile, share of gene-A pixels).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from milbench.config import resolve
from milbench.metrics import bag_auc
from milbench.plugins import load_registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="sets", action="append", default=[], help="dataset key=value")
    args = ap.parse_args()
    ds = load_registry().datasets["mouse-brain"]
    cfg = resolve(ds.params, [], args.sets)
    key = 1  # gene_a, the bags' key class
    out = {"config": {k: cfg[k] for k in (s.split("=", 1)[0].strip() for s in args.sets)}, "seeds": {}}
    for seed in args.seeds:
        splits = ds.load(cfg, seed, os.environ.get("MILBENCH_DATA_ROOT"))
        per = {}
        for name in ("val", "test"):
            bags = getattr(splits, name)
            y, share, anyk, pixels = [], [], [], []
            for i in range(len(bags)):
                b = bags[i]
                tiles = b.instance_labels.numpy()
                y.append(int(b.label))
                share.append(float((tiles == key).mean()))
                anyk.append(float((tiles == key).any()))
                pixels.append(float((b.mask.numpy() == key).mean()))
            per[name] = {"n_bags": len(y), "n_positive": int(sum(y)),
                         "auc_tile_share": bag_auc(share, y), "auc_any_tile": bag_auc(anyk, y),
                         "auc_pixel_share": bag_auc(pixels, y)}
            print(f"seed {seed} {name}: {per[name]}")
        out["seeds"][str(seed)] = per
    Path(__file__).with_name("oracle.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
