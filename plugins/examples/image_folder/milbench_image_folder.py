"""A third-party milbench dataset: bags from a folder of images, one sub-folder per class.

Any ImageFolder-style tree (``FOLDER/<class>/*.png|jpg|jpeg``) becomes a MIL task:
a bag is positive iff it holds an image of ``key_class``. Images are split
first (train/val/test pools), so no test bag shares an image with a training bag.
"""

import functools
from pathlib import Path

from milbench.api import DataError, DataSpec, Dataset, DataStatus, Param, Splits, bag_params, hookimpl

SUFFIXES = {".png", ".jpg", ".jpeg"}


def _images(folder: Path) -> dict[str, list[Path]]:
    """``{class: sorted image paths}`` of every sub-folder holding images."""
    found = {d.name: sorted(p for p in d.iterdir() if p.suffix.lower() in SUFFIXES)
             for d in sorted(folder.iterdir()) if d.is_dir()} if folder.is_dir() else {}
    return {k: v for k, v in found.items() if v}


class ImageFolderBags(Dataset):
    name = "image-folder"
    description = "bags of images from FOLDER/<class>/*; positive iff the bag holds a key_class image"
    params = {
        **bag_params(bag_size=10, instance_size=64, key_fraction=0.3),
        "folder": Param(None, str, "the image tree (default: the --data-root)", nullable=True),
        "key_class": Param("", str, "the sub-folder whose images make a bag positive"),
    }

    def _folder(self, config, data_root) -> Path:
        folder = config.get("folder") or data_root
        if not folder:
            raise DataError("image-folder needs --set folder=PATH (or --data-root PATH)")
        return Path(folder).expanduser()

    def status(self, data_root, overrides=()):
        classes = _images(Path(data_root)) if data_root else {}
        detail = ", ".join(f"{k}: {len(v)}" for k, v in classes.items()) or "no class folders with images"
        return DataStatus(self.name, bool(classes), bool(classes), data_root, "full" if classes else "missing",
                          detail, [str(data_root)] if data_root else [])

    def load(self, config, seed, data_root):
        import numpy as np
        import torch
        from PIL import Image

        from milbench.api import PooledBags, ids_hash, plan_bags, split_pool

        folder = self._folder(config, data_root)
        classes = _images(folder)
        if config["key_class"] not in classes:
            raise DataError(f"key_class '{config['key_class']}' is not a class folder of {folder}; "
                            f"valid: {', '.join(classes) or '(none found)'}")
        paths = [p for k in classes for p in classes[k]]
        ids = [f"{p.parent.name}/{p.name}" for p in paths]
        is_key = np.array([p.parent.name == config["key_class"] for p in paths])
        size = config["instance_size"]

        @functools.lru_cache(maxsize=None)  # each image decoded once, kept as uint8
        def decode(i: int) -> torch.Tensor:  # shorter side to `size`, centre crop
            img = Image.open(paths[i]).convert("RGB")
            s = size / min(img.size)
            img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))))
            left, top = (img.width - size) // 2, (img.height - size) // 2
            return torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1)

        def get_instances(idx):  # (n, 3, size, size) floats in [0, 1]
            return torch.stack([decode(int(i)) for i in idx]).float() / 255

        rng = np.random.default_rng(seed)
        pools = split_pool(len(paths), (0.6, 0.2, 0.2), rng)
        splits = [PooledBags(plan_bags(pool, is_key[pool], config[n], config["bag_size"], config["key_fraction"],
                                       rng, split, config["bag_size_std"]), get_instances, is_key, ids)
                  for split, pool, n in zip(("train", "val", "test"), pools,
                                            ("n_train_bags", "n_val_bags", "n_test_bags"))]
        info = {"source": "folder", "folder": str(folder), "files": len(paths), "split_seed": seed,
                "instance_id_hash": {s: ids_hash(b.instance_ids()) for s, b in zip(("train", "val", "test"), splits)}}
        spec = DataSpec(channels=3, instance_size=size, instance_classes=("other", config["key_class"]))
        return Splits(spec, *splits, info=info)


@hookimpl
def milbench_register_datasets(register):
    register(ImageFolderBags())
