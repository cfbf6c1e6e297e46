"""The slide manifest: a CSV with ``slide_id, path, label`` and optional ``split``, ``annotation``.

Paths may be absolute or relative to the manifest's folder (so a folder of
slides plus its manifest can be moved as one). Every problem is found here,
before any slide is opened, and reported as one line naming the slide and the
CSV line: a missing column, a duplicate id, a label that is not 0/1, a split
that is not train/val/test, a missing slide or annotation file.

Splits: when the ``split`` column is filled for every slide it is used as is;
when it is absent (or empty everywhere) :func:`assign_splits` draws a seeded
split stratified by label, by slide -- a slide is one bag, so no slide can be
in two splits.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from milbench.api import DataError

REQUIRED = ("slide_id", "path", "label")
SPLITS = ("train", "val", "test")
MANIFEST_NAMES = ("manifest.csv", "slides.csv")


@dataclass(frozen=True)
class SlideEntry:
    """One manifest row, validated, with paths made absolute."""

    slide_id: str
    path: Path
    label: int
    split: str | None
    annotation: Path | None
    line: int


@dataclass(frozen=True)
class Manifest:
    path: Path
    sha256: str
    entries: tuple[SlideEntry, ...]

    @property
    def has_splits(self) -> bool:
        return all(e.split for e in self.entries)


def find_manifest(name: str | None, data_root: str | None) -> tuple[Path, list[str]]:
    """The manifest a run reads: the ``manifest`` key (a path, or a name under a data
    root), else ``manifest.csv``/``slides.csv`` in the data roots; one-line error if none."""
    from milbench.api import find_in_roots

    if name:
        p = Path(name).expanduser()
        if p.is_file():
            return p.resolve(), [str(p)]
        if not p.is_absolute():
            found, tried = find_in_roots(data_root, [name])
            if found is not None and found.is_file():
                return found.resolve(), tried
            raise DataError(f"manifest '{name}' not found (looked at {p.resolve()} and {', '.join(tried) or 'no data root'})")
        raise DataError(f"manifest {p} does not exist")
    found, tried = find_in_roots(data_root, list(MANIFEST_NAMES))
    if found is None:
        raise DataError("no slide manifest: pass --set manifest=PATH.csv (columns slide_id,path,label[,split]"
                        f"[,annotation]) or put manifest.csv in a data root (looked in {', '.join(tried) or 'no root'})")
    return found.resolve(), tried


def read_manifest(path: Path, check_files: bool = True) -> Manifest:
    """Parse and validate the CSV; raise one-line DataErrors naming the slide and line."""
    from .reader import file_sha256

    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"manifest {path} cannot be read: {exc}") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]
    if not rows:
        raise DataError(f"manifest {path} is empty; expected a header slide_id,path,label[,split][,annotation]")
    header = [h.strip().lower() for h in rows[0]]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise DataError(f"manifest {path}: header lacks column(s) {', '.join(missing)} (has: {', '.join(header)}); "
                        "expected slide_id,path,label[,split][,annotation]")
    col = {name: header.index(name) for name in header}
    base = path.parent
    entries: list[SlideEntry] = []
    seen: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        cell = lambda name: row[col[name]].strip() if name in col and col[name] < len(row) else ""  # noqa: E731
        sid = cell("slide_id")
        where = f"manifest {path.name} line {lineno}"
        if not sid:
            raise DataError(f"{where}: empty slide_id")
        if sid in seen:
            raise DataError(f"{where}: duplicate slide id '{sid}' (first on line {seen[sid]})")
        seen[sid] = lineno
        raw_label = cell("label")
        if raw_label not in ("0", "1"):
            raise DataError(f"{where}: slide '{sid}' has label {raw_label!r}; labels must be 0 or 1")
        split = cell("split").lower() or None
        if split is not None and split not in SPLITS:
            raise DataError(f"{where}: slide '{sid}' has split {split!r}; valid: {', '.join(SPLITS)} or empty")
        rel = cell("path")
        if not rel:
            raise DataError(f"{where}: slide '{sid}' has no path")
        spath = Path(rel).expanduser()
        spath = spath if spath.is_absolute() else (base / spath)
        if check_files and not spath.is_file():
            raise DataError(f"{where}: slide '{sid}': file {spath} does not exist")
        ann = cell("annotation")
        apath = None
        if ann:
            apath = Path(ann).expanduser()
            apath = apath if apath.is_absolute() else (base / apath)
            if check_files and not apath.is_file():
                raise DataError(f"{where}: slide '{sid}': annotation file {apath} does not exist")
        entries.append(SlideEntry(sid, spath, int(raw_label), split, apath, lineno))
    if not entries:
        raise DataError(f"manifest {path} lists no slides")
    splits = {e.split for e in entries}
    if None in splits and len(splits) > 1:
        blank = next(e for e in entries if e.split is None)
        raise DataError(f"manifest {path.name} line {blank.line}: slide '{blank.slide_id}' has no split while "
                        "others do; fill the split column for every slide or leave it empty everywhere")
    return Manifest(path, file_sha256(path), tuple(entries))


def assign_splits(manifest: Manifest, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list[SlideEntry]]:
    """The manifest's own splits, else a seeded split stratified by label (by slide).

    Per label the slides are shuffled with ``seed`` and cut into test, val and
    train shares (rounded; a label with at least three slides puts at least one
    in each split). Each split must end up non-empty, and train must hold both
    labels; otherwise a one-line DataError says what is short.
    """
    out: dict[str, list[SlideEntry]] = {s: [] for s in SPLITS}
    if manifest.has_splits:
        for e in manifest.entries:
            out[e.split].append(e)  # type: ignore[index]
    else:
        rng = np.random.default_rng([int(seed), 0x511DE])
        for label in (0, 1):
            group = [e for e in manifest.entries if e.label == label]
            order = rng.permutation(len(group))
            n = len(group)
            n_test = int(round(test_fraction * n))
            n_val = int(round(val_fraction * n))
            if n >= 3:
                n_test, n_val = max(1, n_test), max(1, n_val)
            n_test = min(n_test, n)
            n_val = min(n_val, n - n_test)
            for k, i in enumerate(order):
                split = "test" if k < n_test else "val" if k < n_test + n_val else "train"
                out[split].append(group[i])
        for s in SPLITS:
            out[s].sort(key=lambda e: e.line)
    for s in SPLITS:
        if not out[s]:
            raise DataError(f"manifest {manifest.path.name}: the {s} split has no slide "
                            f"({len(manifest.entries)} slides); add slides or set the split column")
    if len({e.label for e in out["train"]}) < 2:
        raise DataError(f"manifest {manifest.path.name}: the train split holds only label "
                        f"{out['train'][0].label}; a bag classifier needs both labels to train")
    return out
