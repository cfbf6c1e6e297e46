"""Readers for the IDX files of MNIST and QMNIST (optionally gzipped).

Why this module exists: the ``qmnist`` dataset reads its digits from IDX files,
and so does the slides plugin's test-data generator
(:mod:`milbench_plugins.slides.generator`, which imports it from here); the
format is this plugin's, so the reader lives in it. numpy only, no torch.

IDX: two zero bytes, a type code (0x08 unsigned byte, 0x0C big-endian int32),
the number of dimensions, then each dimension as a big-endian int32, then the
data. QMNIST's labels are an ``idx2-int`` table whose first column is the digit.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from milbench.api import DataError

_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
           0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike, how_to_fix: str = "") -> np.ndarray:
    """Read one IDX file into a numpy array; a truncated or corrupt file is a
    one-line :class:`DataError` naming the file."""
    path = Path(path)
    hint = f"; {how_to_fix}" if how_to_fix else ""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}{hint}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number){hint}")
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header incomplete){hint}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != need:
        raise DataError(f"{path} is truncated or corrupt: {len(raw) - header} data bytes, expected {need}{hint}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists."""
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    return None
