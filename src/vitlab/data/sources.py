"""Where datasets live, how they are verified and fetched, and how their official files are read.

Lookup order for a named dataset: an explicit data dir, then $VITLAB_DATA, then ~/.cache/vitlab.
Inside a root, each dataset may sit in its own folder (`mnist/`, `cifar10/cifar-10-batches-bin/`)
or in torchvision's layout (`MNIST/raw/`, `cifar-10-batches-py/`). Every file is checked against
its official md5 (or, where none is published, its exact size) before it is read.

Downloading is the only network use: archives go to a temporary name, are verified, extracted
into a temporary folder, and renamed into place, so an interrupted fetch is never taken for data.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import math
import os
import pickle
import shutil
import stat
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import DataError, DatasetNotFoundError


@dataclass(frozen=True)
class FileSpec:
    name: str
    md5: str | None = None
    size: int | None = None  # checked where no md5 is published


@dataclass(frozen=True)
class Layout:
    """One on-disk form of a dataset: the folders it may sit in (relative to a root) and its files."""
    folders: tuple[str, ...]
    files: tuple[FileSpec, ...]
    read: Callable[[Path, str], tuple[np.ndarray, np.ndarray]]  # (folder, "train"|"test") -> (NCHW uint8, labels)


@dataclass(frozen=True)
class Download:
    urls: tuple[str, ...]  # mirrors tried in order
    filename: str
    md5: str
    extract: bool  # a tar archive to unpack, or a single file to keep as it is


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per-channel, of the training images in [0, 1]
    std: tuple[float, ...]
    layouts: tuple[Layout, ...]
    downloads: tuple[Download, ...] = field(default=())
    val_size: int = 5000


def data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The roots searched, in order."""
    roots = []
    if data_dir:
        roots.append(Path(data_dir).expanduser())
    if os.environ.get("VITLAB_DATA"):
        roots.append(Path(os.environ["VITLAB_DATA"]).expanduser())
    roots.append(Path.home() / ".cache" / "vitlab")
    return roots


# ---- readers of the official formats ----------------------------------------------------------
IDX_MAX_DIMS = 4  # images are N x H x W (x C), labels N
IDX_MAX_BYTES = 1 << 34  # 16 GiB: the whole dataset is held in memory


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format), gzipped or not, as a numpy array.

    The header is checked before the body is read: 1 to IDX_MAX_DIMS dimensions, a size within
    IDX_MAX_BYTES, and (uncompressed) a file size that matches. A gzipped body is read in chunks, so a
    header that claims more than the file holds costs only what the file holds.
    """
    try:
        st = path.stat()
    except OSError as e:
        raise DataError(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever
        raise DataError(f"{path} is not a regular file")
    fix = "run `vitlab data fetch NAME --force` or replace the file"
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            head = f.read(4)
            if len(head) < 4 or head[:3] != b"\x00\x00\x08":
                raise DataError(f"{path} is not an unsigned-byte IDX file (magic {head.hex() or 'empty'})")
            ndim = head[3]
            if not 1 <= ndim <= IDX_MAX_DIMS:
                raise DataError(f"{path}: IDX header declares {ndim} dimensions; image and label files have 1 to "
                                f"{IDX_MAX_DIMS}")
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataError(f"{path} is truncated inside its header; {fix}")
            shape = struct.unpack(f">{ndim}I", dims)
            n = math.prod(shape)
            if n > IDX_MAX_BYTES:
                raise DataError(f"{path}: IDX header declares shape {shape} = {n:,} bytes, over the "
                                f"{IDX_MAX_BYTES:,}-byte limit of an in-memory dataset")
            if not gz and st.st_size != 4 + 4 * ndim + n:
                raise DataError(f"{path} is truncated or has trailing bytes: header says {shape} = {n} bytes, file "
                                f"holds {st.st_size - 4 - 4 * ndim}; {fix}")
            body = bytearray()
            while len(body) < n and (chunk := f.read(min(1 << 24, n - len(body)))):
                body += chunk
            if len(body) < n or f.read(1):
                raise DataError(f"{path} is truncated or has trailing bytes: header says {shape} = {n} bytes, file "
                                f"holds {len(body)}{'' if len(body) < n else ' or more'}; {fix}")
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path} is not a readable (gzip) IDX file ({e}); {fix}") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{images_path.name} should be N x H x W and {labels_path.name} N, got "
                        f"{images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path.name} holds {len(images)} images but {labels_path.name} "
                        f"holds {len(labels)} labels")
    return images[:, None], labels.astype(np.int64)


def _read_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    return read_idx_pair(folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz")


def read_cifar_binary(files: list[Path], label_bytes: int = 1, label_index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR binary records: label byte(s), then 3072 pixel bytes (R, G, B planes, row-major)."""
    record = label_bytes + 3072
    images, labels = [], []
    for f in files:
        raw = np.frombuffer(f.read_bytes(), dtype=np.uint8)
        if raw.size % record:
            raise DataError(f"{f} holds {raw.size} bytes, not a whole number of {record}-byte records: truncated?")
        raw = raw.reshape(-1, record)
        labels.append(raw[:, label_index].astype(np.int64))
        images.append(raw[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.concatenate(images), np.concatenate(labels)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR python batches are pickled dicts of numpy arrays: allow exactly that, nothing that
    could run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only numpy arrays")


def read_cifar_pickle(path: Path) -> dict:
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path} is not a readable CIFAR python batch ({e}); run `vitlab data fetch NAME --force`") from None


def _from_pickled(batches: list[dict], label_key: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        images = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    except (KeyError, ValueError) as e:
        raise DataError(f"{path} does not hold CIFAR batches ({e})") from None
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def _read_cifar10_bin(folder: Path, split: str):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    return read_cifar_binary([folder / n for n in names])


def _read_cifar10_py(folder: Path, split: str):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _from_pickled([read_cifar_pickle(folder / n) for n in names], "labels", folder)


def _read_cifar100_bin(folder: Path, split: str):
    # records: coarse label byte, fine label byte, 3072 pixels; we classify the 100 fine labels
    return read_cifar_binary([folder / f"{split}.bin"], label_bytes=2, label_index=1)


def _read_cifar100_py(folder: Path, split: str):
    return _from_pickled([read_cifar_pickle(folder / split)], "fine_labels", folder)


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew
skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television
tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())

DATASETS: dict[str, Source] = {
    "mnist": Source(
        "mnist", "MNIST handwritten digits: 60,000 train + 10,000 test, 28x28 greyscale",
        tuple(str(i) for i in range(10)), (0.1307,), (0.3081,),
        layouts=(Layout(("mnist", "MNIST/raw", "MNIST", "."), (
            FileSpec("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            FileSpec("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            FileSpec("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            FileSpec("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ), _read_mnist),),
        downloads=tuple(
            Download(tuple(f"{mirror}{name}" for mirror in ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                                                            "http://yann.lecun.com/exdb/mnist/")), name, md5, False)
            for name, md5 in (("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                              ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
                              ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
                              ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"))),
    ),
    "cifar10": Source(
        "cifar10", "CIFAR-10: 50,000 train + 10,000 test, 32x32 RGB, 10 classes",
        CIFAR10_CLASSES, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        layouts=(
            Layout(("cifar10/cifar-10-batches-bin", "cifar-10-batches-bin"), (
                FileSpec("data_batch_1.bin", "5dd7e06a14cb22eb9f671a540d1b7c25"),
                FileSpec("data_batch_2.bin", "5ea93a67294ea407fff1d09f752e9692"),
                FileSpec("data_batch_3.bin", "942cd6a4bcdd0dd3c604fbe906cb4421"),
                FileSpec("data_batch_4.bin", "ae636b3ba5c66a11e91e8cb52e771fcb"),
                FileSpec("data_batch_5.bin", "53f37980c15c3d472c316c40844f3f0d"),
                FileSpec("test_batch.bin", "803d5f7f4d78ea53de84dbe85f74fb6d"),
            ), _read_cifar10_bin),
            Layout(("cifar10/cifar-10-batches-py", "cifar-10-batches-py"), (
                FileSpec("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                FileSpec("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                FileSpec("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                FileSpec("data_batch_4", "634d18415352ddfa80567beed471001a"),
                FileSpec("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
                FileSpec("test_batch", "40351d587109b95175f43aff81a1287e"),
            ), _read_cifar10_py),
        ),
        downloads=(Download(("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                            "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", True),),
    ),
    "cifar100": Source(
        "cifar100", "CIFAR-100: 50,000 train + 10,000 test, 32x32 RGB, 100 fine classes",
        CIFAR100_CLASSES, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
        layouts=(
            Layout(("cifar100/cifar-100-python", "cifar-100-python"), (
                FileSpec("train", "16019d7e3df5f24257cddd939b257f8d"),
                FileSpec("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),
            ), _read_cifar100_py),
            # No per-file md5 is published for the binary version: exact sizes are checked instead.
            Layout(("cifar100/cifar-100-binary", "cifar-100-binary"), (
                FileSpec("train.bin", size=50000 * 3074),
                FileSpec("test.bin", size=10000 * 3074),
            ), _read_cifar100_bin),
        ),
        downloads=(Download(("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                            "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", True),),
    ),
}


def get_source(name: str) -> Source:
    if name not in DATASETS:
        raise DatasetNotFoundError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}, or give the path "
                                   f"of an image folder or a folder of IDX files")
    return DATASETS[name]


# ---- finding and verifying -------------------------------------------------------------------
def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, spec: FileSpec, dataset: str) -> None:
    """Raise DataError naming the file, what was expected and what was found."""
    fix = f"run `vitlab data fetch {dataset} --force`"
    if not path.exists():  # e.g. an interrupted fetch: fetching again (without --force) completes it
        raise DatasetNotFoundError(f"{path} is missing; run `vitlab data fetch {dataset}`")
    if not path.is_file():  # a folder or a FIFO (reading a FIFO would block)
        raise DataError(f"{path} is not a regular file; remove it and {fix}")
    if spec.size is not None and path.stat().st_size != spec.size:
        raise DataError(f"{path} has {path.stat().st_size} bytes, expected {spec.size}: truncated or "
                        f"corrupted; {fix}")
    if spec.md5 is not None:
        try:
            got = md5sum(path)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        if got != spec.md5:
            raise DataError(f"{path} has md5 {got}, expected {spec.md5} ({path.stat().st_size} bytes): "
                            f"truncated or corrupted; {fix}")


def locate(source: Source, data_dir: str | os.PathLike | None = None) -> tuple[Path, Layout]:
    """The first folder, over roots and layouts, that holds a layout's files (not yet verified)."""
    searched = []
    for root in data_roots(data_dir):
        for layout in source.layouts:
            for rel in layout.folders:
                folder = (root / rel).resolve() if rel != "." else root.resolve()
                searched.append(str(folder))
                if folder.is_dir() and any((folder / f.name).exists() for f in layout.files):
                    return folder, layout
    raise DatasetNotFoundError(
        f"dataset {source.name!r} not found under {', '.join(str(r) for r in data_roots(data_dir))}; "
        f"run `vitlab data fetch {source.name}` (or point --data-dir / $VITLAB_DATA at a copy)")


def check_files(source: Source, data_dir: str | os.PathLike | None = None) -> tuple[Path, list[tuple[Path, str | None]]]:
    """(folder, [(file, problem or None)]) for every file of the dataset's layout found on disk."""
    folder, layout = locate(source, data_dir)
    report = []
    for spec in layout.files:
        try:
            verify_file(folder / spec.name, spec, source.name)
            report.append((folder / spec.name, None))
        except DataError as e:
            report.append((folder / spec.name, str(e)))
    return folder, report


def verify(source: Source, data_dir: str | os.PathLike | None = None) -> tuple[Path, Layout]:
    """The dataset's folder and layout, every file checked; DataError on the first bad one."""
    folder, layout = locate(source, data_dir)
    for spec in layout.files:
        verify_file(folder / spec.name, spec, source.name)
    return folder, layout


# ---- fetching --------------------------------------------------------------------------------
def _download(urls: tuple[str, ...], dest: Path, md5: str, progress: bool) -> None:
    errors = []
    for url in urls:
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0)
                bar = None
                if progress:
                    from tqdm import tqdm
                    bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=dest.name)
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    if bar:
                        bar.update(len(chunk))
                if bar:
                    bar.close()
            got = md5sum(tmp)
            if got != md5:
                raise DataError(f"{url} gave md5 {got}, expected {md5}")
            os.replace(tmp, dest)
            return
        except (OSError, DataError, http.client.HTTPException) as e:  # URLError is an OSError
            errors.append(f"{url}: {e}")
        finally:
            tmp.unlink(missing_ok=True)
    raise DataError("download failed: " + "; ".join(errors))


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract regular files and folders only, never outside `dest` (no absolute paths, no '..', no
    links, devices or FIFOs), on every Python version: every member is checked first, comparing
    resolved paths (a string-prefix test lets `../unpacked_x/y` through); then tarfile's "data"
    filter does the extraction where it exists (Python >= 3.11.4, 3.10.12), else each member is
    written here, with default permissions and owner (never the archive's)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    members = tar.getmembers()
    for member in members:
        target = (root / member.name).resolve()
        if not (member.isfile() or member.isdir()) or not target.is_relative_to(root):
            what = "a link" if member.issym() or member.islnk() else "not a plain file" if not (
                member.isfile() or member.isdir()) else "a path outside the archive's folder"
            raise DataError(f"refusing to extract {member.name!r} from {tar.name}: {what}; only plain files and "
                            f"folders inside the archive are extracted")
    if hasattr(tarfile, "data_filter"):
        try:
            tar.extractall(root, members=members, filter="data")
        except tarfile.FilterError as e:
            raise DataError(f"refusing to extract from {tar.name}: {e}") from None
        return
    for member in members:
        target = (root / member.name).resolve()
        if member.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with tar.extractfile(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)


def fetch(name: str, data_dir: str | os.PathLike | None = None, force: bool = False,
          progress: bool = True) -> Path:
    """Make dataset `name` present and verified under the first root; returns its folder."""
    source = get_source(name)
    if not force:
        try:
            return verify(source, data_dir)[0]
        except DatasetNotFoundError:
            pass  # not there: download it
    first = data_roots(data_dir)[0]
    if first.exists() and not first.is_dir():
        raise DataError(f"data root {first} is not a folder; point --data-dir (or $VITLAB_DATA) at a folder")
    target = first / source.name
    if target.exists() and not target.is_dir():
        raise DataError(f"{target} is not a folder; move it away so that {source.name} can be fetched there")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target, prefix=".fetch.") as tmp:
        tmp = Path(tmp)
        for d in source.downloads:
            archive = tmp / d.filename
            _download(d.urls, archive, d.md5, progress)
            if not d.extract:
                os.replace(archive, target / d.filename)  # verified, then renamed into place
                continue
            unpacked = tmp / "unpacked"
            with tarfile.open(archive) as tar:
                _safe_extract(tar, unpacked)
            for entry in unpacked.iterdir():  # each top-level folder appears whole, or not at all
                dest = target / entry.name
                if dest.is_dir():
                    shutil.rmtree(dest)
                os.replace(entry, dest)
    return verify(source, data_dir)[0]
