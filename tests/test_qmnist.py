"""The qmnist dataset on the real MNIST test digits and on files in the exact
official QMNIST layout (torchvision's ``QMNIST/raw``)."""

from __future__ import annotations

import gzip
import shutil
import struct

import numpy as np
import pytest

from milbench.errors import DataError
from milbench.runner import plan_run


def _load(data_root, seed=0, **over):
    from milbench.plugins import get_registry

    reg = get_registry()
    plan = plan_run(reg, "abmil", "qmnist", overrides=over, seed=seed)
    return reg.dataset("qmnist").load(plan.config, seed, None if data_root is None else str(data_root))


def test_reads_shared_mnist_and_splits_disjoint(data_root):
    s = _load(data_root)
    assert s.info["source"] == "mnist" and s.info["n_digits"] == 10000
    ids = {name: set(getattr(s, name).instance_ids()) for name in ("train", "val", "test")}
    assert not ids["train"] & ids["test"] and not ids["train"] & ids["val"] and not ids["val"] & ids["test"]
    assert len(s.train) == 200 and len(s.val) == 200 and len(s.test) == 300  # the dataset's defaults


def test_bag_labels_agree_with_instances_and_image_view(data_root):
    s = _load(data_root)
    labels = []
    for bag in list(s.train)[:40]:
        assert bag.label == int(bool(bag.instance_labels.any()))
        if bag.label:
            assert int(bag.instance_labels.sum()) == max(1, round(0.1 * len(bag)))
        img = bag.image()
        p = bag.patch_size
        for k in range(len(bag)):
            r, c = bag.grid[k].tolist()
            assert np.array_equal(img[:, r * p:(r + 1) * p, c * p:(c + 1) * p].numpy(), bag.instances[k].numpy())
        labels.append(bag.label)
    assert 10 < sum(labels) < 30  # balanced


def test_same_seed_same_bags_other_seed_other_bags(data_root):
    a, b, c = _load(data_root, 3), _load(data_root, 3), _load(data_root, 4)
    assert a.info["instance_id_hash"] == b.info["instance_id_hash"]
    assert a.info["instance_id_hash"]["train"] != c.info["instance_id_hash"]["train"]
    assert np.array_equal(a.test[0].instances.numpy(), b.test[0].instances.numpy())


def test_embedded_sample_is_used_and_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("MILBENCH_DATA_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    s = _load(None)
    assert s.info["source"] == "sample"
    assert all("plugins/data/mnist" in f or "milbench_plugins/data/mnist" in f for f in s.info["files"])


def _write_idx(path, arr, code):
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    dtype = ">u1" if code == 0x08 else ">i4"
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(dtype).tobytes())


def test_official_qmnist_layout_is_preferred(tmp_path, data_root):
    """A root with torchvision's QMNIST files (labels as the idx2-int table)."""
    from milbench_plugins.qmnist.idx import read_idx

    x = read_idx(data_root / "MNIST/raw/t10k-images-idx3-ubyte.gz")[:3000]
    y = read_idx(data_root / "MNIST/raw/t10k-labels-idx1-ubyte.gz")[:3000].astype(np.int64)
    raw = tmp_path / "QMNIST" / "raw"
    raw.mkdir(parents=True)
    table = np.zeros((len(y), 8), dtype=np.int64)
    table[:, 0] = y
    table[:, 1] = 4  # writer-id columns etc., unused
    _write_idx(raw / "qmnist-test-images-idx3-ubyte.gz", x, 0x08)
    _write_idx(raw / "qmnist-test-labels-idx2-int.gz", table, 0x0C)
    s = _load(tmp_path, n_train_bags=10, n_val_bags=4, n_test_bags=6)
    assert s.info["source"] == "qmnist" and s.info["n_digits"] == 3000
    assert all(b.label == int(bool(b.instance_labels.any())) for b in s.train)


def test_truncated_file_is_one_line_error(tmp_path, data_root):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shutil.copy(data_root / "MNIST/raw/t10k-labels-idx1-ubyte.gz", raw)
    blob = gzip.decompress((data_root / "MNIST/raw/t10k-images-idx3-ubyte.gz").read_bytes())
    (raw / "t10k-images-idx3-ubyte").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError) as exc:
        _load(tmp_path)
    msg = str(exc.value)
    assert "t10k-images-idx3-ubyte" in msg and "truncated" in msg and "milbench data download qmnist" in msg
    assert "\n" not in msg


def test_missing_explicit_root_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _load(tmp_path / "nope")
    with pytest.raises(DataError, match="no QMNIST or MNIST files under --data-root"):
        _load(tmp_path)
