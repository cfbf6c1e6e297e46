"""Make the Imagenette sample that ships inside milbench (``plugins/data/imagenette-sample``).

Why: ``milbench run -m grad-accum -d imagenette`` must work on a fresh machine
with no download. The sample is a few hundred real Imagenette photos in the
official ``train/<wnid>/`` / ``val/<wnid>/`` layout, downscaled so the package
stays a few MB; runs on it say ``source: sample`` in their record.

The selection is seeded and the file list sorted, so re-running this script on
the same source gives the same images (JPEG bytes can differ across Pillow
versions; ``SHA256SUMS`` is rewritten to match)::

    python benchmarks/make_imagenette_sample.py --source ../shared/data/imagenette2-224

Per class it keeps ``--train`` train and ``--val`` val images, and more of the
key class (golf ball) so positive bags of the ``paper`` preset (50 per bag,
30 % key) can be drawn from the train pool's validation part.

Size: 200 per class (440 golf balls) in train, 30 (80) in val, about 14.5 MB.
Each earlier sample over-fitted the README's main job (200 bags of 10 per
epoch, 15 epochs, whatever the sample's size):
- 50 per class (472 training images after the validation share): each image
  seen about 60 times; its 88 validation images too few to select an epoch on;
  test AUC 0.851 / 0.736 / 0.826 on seeds 0-2 (``results/previous-sample/first-560/``).
- 100 per class (952 training images): 0.846 / 0.842 / 0.861; seed 1's
  validation AUC peaked at epoch 7 and fell while its training loss kept falling
  (``results/previous-sample/second-1120/``).
- 200 per class (1,904 training images): 0.884 / 0.926 / 0.913 at the same CPU
  cost per run (the same 200 bags an epoch; only decoding at setup grows).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

GOLF_BALL = "n03445777"
OUT = Path(__file__).resolve().parent.parent / "plugins" / "data" / "imagenette-sample"

README = """\
# Imagenette sample shipped with milbench

{n_train} train + {n_val} val images of Imagenette (every one of the 10 classes,
both splits), resized to {size}x{size} px and re-encoded as JPEG (quality {quality}).
It exists so `milbench run -d imagenette` works with no download; runs that use it
say `source: sample` in their record and report. It is **not** the benchmark:
fetch the full data with `milbench data download imagenette`.

| split | per class | golf ball (n03445777) |
|---|---|---|
| train | {per_train} | {golf_train} |
| val | {per_val} | {golf_val} |

- Source: Imagenette (fastai, https://github.com/fastai/imagenette), the `imagenette2`
  70/30 split, from a 224 px copy (GitHub thunderInfy/imagenette, commit b850f03)
  whose file names and split match fastai's `noisy_imagenette.csv`. File names and
  the train/val split are unchanged, so instance ids match the full data.
- Made by `benchmarks/make_imagenette_sample.py --seed {seed}` (seeded selection).
- Licence: the images are a subset of ImageNet and are subject to the ImageNet
  terms of access: non-commercial research and educational use only
  (https://image-net.org/download). Imagenette's own metadata is Apache-2.0.
- `SHA256SUMS` lists every image; `milbench data verify imagenette` checks it.
"""


def pick(files: list[Path], n: int, rng: np.random.Generator) -> list[Path]:
    """``n`` files chosen without replacement from the sorted list (all if fewer)."""
    files = sorted(files)
    if n >= len(files):
        return files
    return [files[i] for i in sorted(rng.choice(len(files), n, replace=False))]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette2-224")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--train", type=int, default=200, help="train images per class")
    ap.add_argument("--val", type=int, default=30, help="val images per class")
    ap.add_argument("--golf-train", type=int, default=440)
    ap.add_argument("--golf-val", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    if args.out.exists():
        shutil.rmtree(args.out)
    sums: list[str] = []
    counts = {"train": 0, "val": 0}
    for split, n, n_golf in (("train", args.train, args.golf_train), ("val", args.val, args.golf_val)):
        classes = sorted(p.name for p in (args.source / split).iterdir() if p.is_dir())
        if len(classes) != 10:
            raise SystemExit(f"{args.source / split}: expected 10 class folders, found {len(classes)}")
        for wnid in classes:
            chosen = pick(list((args.source / split / wnid).glob("*.JPEG")), n_golf if wnid == GOLF_BALL else n, rng)
            dest = args.out / split / wnid
            dest.mkdir(parents=True, exist_ok=True)
            for src in chosen:
                with Image.open(src) as im:
                    im = im.convert("RGB")
                    # Shorter side to `size`, then centre crop: the loader does the same.
                    w, h = im.size
                    s = args.size / min(w, h)
                    im = im.resize((max(args.size, round(w * s)), max(args.size, round(h * s))), Image.LANCZOS)
                    left, top = (im.width - args.size) // 2, (im.height - args.size) // 2
                    im = im.crop((left, top, left + args.size, top + args.size))
                    im.save(dest / src.name, "JPEG", quality=args.quality)
                rel = f"{split}/{wnid}/{src.name}"
                sums.append(f"{hashlib.sha256((dest / src.name).read_bytes()).hexdigest()}  {rel}")
                counts[split] += 1
    (args.out / "SHA256SUMS").write_text("\n".join(sorted(sums, key=lambda s: s.split("  ", 1)[1])) + "\n")
    (args.out / "README.md").write_text(README.format(
        n_train=counts["train"], n_val=counts["val"], size=args.size, quality=args.quality, seed=args.seed,
        per_train=args.train, per_val=args.val, golf_train=args.golf_train, golf_val=args.golf_val))
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {counts['train']} train + {counts['val']} val images to {args.out} ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
