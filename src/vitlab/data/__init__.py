"""Datasets as one uint8 tensor each: MNIST, CIFAR-10/100, folders of IDX files, image folders.

    from vitlab.data import load_dataset
    train = load_dataset("cifar10", split="train", data_dir="...")   # split: train | val | test
    train.images   # uint8, N x C x H x W
    train.labels   # int64, N
    train.classes  # class names

The validation split is carved from the training set, stratified and seeded with a fixed seed
(default 5,000 images for MNIST/CIFAR, 10% for folders), so it is identical on every run and
every rank and model selection never touches the test set.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import IMAGENET_MEAN, IMAGENET_STD
from ..errors import DataError, DatasetNotFoundError
from . import folders, stored
from .sources import DATASETS, get_source, read_idx_pair, verify

SPLITS = ("train", "val", "test")
IDX_CLASSES_FILE = "classes.txt"  # optional, in a folder of IDX files: one class name per line, label order
IDX_CLASSES_MAX_BYTES = 1 << 20
SPLIT_SEED = 0  # the validation split never depends on the training seed


@dataclass
class ImageSet:
    images: torch.Tensor | stored.FolderStream | stored.DecodedCache  # uint8 (N, C, H, W); see data.stored
    labels: torch.Tensor  # int64 (N,)
    classes: list[str]
    name: str
    split: str
    mean: tuple[float, ...]  # per-channel statistics of the training images in [0, 1]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def label_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def take(self, idx: torch.Tensor) -> ImageSet:
        """The images at `idx` (streamed and cached images stay on disk)."""
        images = self.images[idx] if isinstance(self.images, torch.Tensor) else self.images.subset(idx)
        return ImageSet(images, self.labels[idx], self.classes, self.name, self.split, self.mean, self.std)


def stratified_split(labels: np.ndarray, n_val: int, seed: int = SPLIT_SEED, fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): each class gives its share of `n_val` (largest remainder),
    chosen by a seeded permutation; both sorted. Stable across platforms and numpy versions.

    `fold` f holds out the f-th such share of each class's permutation instead of the first, so
    folds 0, 1, ... are disjoint validation splits of one size (k-fold cross-validation: a choice
    that one split of a few thousand images cannot resolve can be averaged over several)."""
    labels = np.asarray(labels)
    if not 0 < n_val < len(labels):
        raise DataError(f"validation size {n_val} must be between 1 and {len(labels) - 1} (the training set has "
                        f"{len(labels)} images)")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_val / len(labels)
    take = np.floor(exact).astype(int)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: n_val - take.sum()]] += 1
    folds = int(min(n // k for n, k in zip(counts, take) if k))  # disjoint shares every class can give
    if not 0 <= fold < folds:
        raise DataError(f"validation fold {fold} must be between 0 and {folds - 1}: {n_val} validation images "
                        f"of {len(labels)} make {folds} disjoint folds")
    rng = np.random.Generator(np.random.PCG64(seed))
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[fold * k:(fold + 1) * k]
                          for c, k in zip(classes, take)])
    mask = np.zeros(len(labels), dtype=bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r} must be one of {SPLITS}")


def _carve(images: np.ndarray, labels: np.ndarray, split: str, n_val: int, fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    train_idx, val_idx = stratified_split(labels, n_val, fold=fold)
    idx = train_idx if split == "train" else val_idx
    return images[idx], labels[idx]


def _idx_folder_files(folder: Path) -> dict[str, tuple[Path, Path]] | None:
    """{'train': (images, labels), 'test': ...} for a folder of IDX files (train-* and t10k-*/test-*)."""
    found = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        for prefix in prefixes:
            imgs = sorted(folder.glob(f"{prefix}*-images-idx3-ubyte*")) + sorted(folder.glob(f"{prefix}*-images.idx3-ubyte*"))
            labs = sorted(folder.glob(f"{prefix}*-labels-idx1-ubyte*")) + sorted(folder.glob(f"{prefix}*-labels.idx1-ubyte*"))
            if imgs and labs:
                found[split] = (imgs[0], labs[0])
                break
    return found or None


def _idx_classes(folder: Path, n: int) -> list[str]:
    """Names of the n classes of a folder of IDX files: its classes.txt (one name per line, in label
    order), else "0" .. "n-1". A file that does not name exactly n distinct classes is an error."""
    path = folder / IDX_CLASSES_FILE
    if not path.is_file():
        return [str(i) for i in range(n)]
    if path.stat().st_size > IDX_CLASSES_MAX_BYTES:
        raise DataError(f"{path} is {path.stat().st_size:,} bytes, over the {IDX_CLASSES_MAX_BYTES:,}-byte limit "
                        f"for a list of class names")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    while names and not names[-1]:
        names.pop()
    dupes = sorted(x for x, k in Counter(names).items() if k > 1)  # (not names.count: quadratic in a long file)
    unprintable = [x for x in names if not x.isprintable()]  # names are printed, plotted and served
    if len(names) != n or not all(names) or dupes or unprintable:
        why = (f"{len(names)} lines for the {n} classes that the labels (0..{n - 1}) have" if len(names) != n
               else "an empty line" if not all(names) else f"names given twice: {dupes[:5]}" if dupes
               else f"control characters in {ascii(unprintable[0])}")
        raise DataError(f"{path}: {why}; it needs one distinct class name per line, in label order")
    return names


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = torch.from_numpy(np.array(images[:10000])).float().div_(255)  # a fixed subset is plenty
    return tuple(round(v, 4) for v in x.mean((0, 2, 3)).tolist()), tuple(round(v, 4) for v in x.std((0, 2, 3)).tolist())


def load_dataset(name: str | os.PathLike, split: str = "train", data_dir: str | os.PathLike | None = None,
                 val_size: int | float | None = None, image_size: int = 224, channels: int = 3,
                 strict: bool = False, storage: str = "auto", cache_dir: str | os.PathLike | None = None,
                 workers: int | None = None, val_fold: int = 0) -> ImageSet:
    """A dataset split.

    `name` is a known dataset (`vitlab data list`) or a path: a folder of IDX files, or an image
    folder `root/<class>/*` (optionally `root/{train,val,test}/<class>/*`). `val_size` is a count
    or a fraction of the training set, and `val_fold` which of the disjoint splits of that size is
    held out (0: the default one; see stratified_split). Image folders are decoded at `image_size` with `channels`;
    unreadable files are skipped with a warning, or are an error when `strict`. How an image
    folder is held (`storage`: auto, memory, stream, cache; `cache_dir`; `workers` decoding
    processes) is described in vitlab.data.stored; everything else is held in memory.
    """
    _check_split(split)
    key = str(name)
    if key in DATASETS:
        source = get_source(key)
        folder, layout = verify(source, data_dir)
        images, labels = layout.read(folder, "test" if split == "test" else "train")
        if split != "test":
            images, labels = _carve(images, labels, split, _val_count(val_size, source.val_size, len(labels)), val_fold)
        return _imageset(images, labels, list(source.classes), source.name, split, source.mean, source.std)
    path = Path(name).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"unknown dataset {key!r}: not one of {sorted(DATASETS)} and no such folder")
    idx = _idx_folder_files(path)
    if idx is not None:
        return _load_idx_folder(path, idx, split, val_size, val_fold)
    return _load_image_folder(path, split, val_size, image_size, channels, strict, storage, cache_dir, workers, val_fold)


def _val_count(val_size: int | float | None, default: int | float, n: int) -> int:
    v = default if val_size is None else val_size
    return int(round(v * n)) if isinstance(v, float) and v < 1 else int(v)


def _imageset(images, labels, classes, name, split, mean, std) -> ImageSet:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"{name}: labels span {labels.min()}..{labels.max()} but there are {len(classes)} classes")
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # views of read-only file buffers
        images = images.copy()
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), classes, name, split, tuple(mean), tuple(std))


def _load_idx_folder(path: Path, files: dict, split: str, val_size, val_fold: int = 0) -> ImageSet:
    if "train" not in files:
        raise DataError(f"{path} has no train-*-images-idx3-ubyte / train-*-labels-idx1-ubyte pair")
    train_images, train_labels = read_idx_pair(*files["train"])
    classes = _idx_classes(path, int(train_labels.max()) + 1)
    mean, std = _channel_stats(train_images)
    if split == "test":
        if "test" not in files:
            raise DataError(f"{path} has no t10k-*/test-* IDX pair for the test split")
        images, labels = read_idx_pair(*files["test"])
    else:
        n_val = _val_count(val_size, 5000 if len(train_labels) > 25000 else 0.1, len(train_labels))
        images, labels = _carve(train_images, train_labels, split, n_val, val_fold)
    return _imageset(images, labels, classes, path.name, split, mean, std)


def _load_image_folder(path: Path, split: str, val_size, image_size: int, channels: int, strict: bool,
                       storage: str = "auto", cache_dir=None, workers: int | None = None,
                       val_fold: int = 0) -> ImageSet:
    if folders.has_split_dirs(path):
        if val_fold and (path / "val").is_dir():
            raise DataError(f"validation fold {val_fold} asks to carve val from {path / 'train'}, but {path} has its "
                            f"own val/ folder; use fold 0")
        scanned = path / "train"
        files, labels, classes = folders.scan(scanned, within=path)
        if split == "train" or (split == "val" and not (path / "val").is_dir()):
            if not (path / "val").is_dir():  # carve val from train
                tr, va = stratified_split(np.array(labels), _val_count(val_size, 0.1, len(labels)), fold=val_fold)
                keep = tr if split == "train" else va
                files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        else:
            if not (path / split).is_dir():
                raise DataError(f"{path} has train/ but no {split}/ folder")
            scanned = path / split
            files, labels, split_classes = folders.scan(scanned, within=path)
            if split_classes != classes:
                raise DataError(f"{path / split} has classes {split_classes[:5]}... but train/ has {classes[:5]}...")
    else:  # one tree: a seeded stratified 80 / 10 / 10 split
        scanned = path
        files, labels, classes = folders.scan(path)
        all_labels = np.array(labels)
        n_hold = _val_count(val_size, 0.1, len(labels))
        rest, test = stratified_split(all_labels, n_hold, seed=SPLIT_SEED + 1)
        train, val = stratified_split(all_labels[rest], n_hold, seed=SPLIT_SEED, fold=val_fold)
        keep = {"train": rest[train], "val": rest[val], "test": test}[split]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
    how = stored.choose_storage(storage, len(files), (channels, image_size, image_size))
    checks = dict(strict=strict, labels=labels, classes=classes)
    if how == "memory":
        images, kept = folders.decode_files(files, image_size, channels, workers=workers, root=scanned, **checks)
        return _imageset(images, np.asarray(labels)[kept], classes, path.name, split, mean, std)
    if how == "stream":
        kept = folders.probe_files(files, image_size, workers=workers, root=scanned, **checks)
        lazy = stored.FolderStream([str(files[i]) for i in kept], image_size, channels, workers)
    else:
        lazy, kept = stored.open_cache(files, labels, image_size, channels, path, cache_dir or stored.default_cache_dir(),
                                       workers, strict, classes)
    labels_kept = torch.from_numpy(np.asarray(labels, dtype=np.int64)[kept])
    return ImageSet(lazy, labels_kept, classes, path.name, split, tuple(mean), tuple(std))


__all__ = ["ImageSet", "load_dataset", "stratified_split", "DATASETS", "SPLITS"]
