"""Dataset finding, verifying, reading and splitting. Tests marked `shared` read the real MNIST and
CIFAR-10 copies in ../shared/datasets and are skipped where that folder is absent."""
import hashlib
import io
import pickle
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from vitlab.data import load_dataset, stratified_split
from vitlab.data import sources
from vitlab.errors import DataError, DatasetNotFoundError

from conftest import SHARED, idx_bytes, write_mnist_like

SHARED_DATA = SHARED / "datasets"
shared = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="../shared/datasets not present")

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@shared
def test_shared_mnist_histogram_and_splits():
    train = load_dataset("mnist", "train", data_dir=SHARED_DATA)
    val = load_dataset("mnist", "val", data_dir=SHARED_DATA)
    test = load_dataset("mnist", "test", data_dir=SHARED_DATA)
    assert train.images.shape == (55000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(val) == 5000 and len(test) == 10000
    total = [a + b for a, b in zip(train.label_counts(), val.label_counts())]
    assert total == MNIST_TRAIN_COUNTS
    assert train.classes == [str(i) for i in range(10)]
    # the validation split is stratified: each class within one image of its share
    for count, v in zip(MNIST_TRAIN_COUNTS, val.label_counts()):
        assert abs(v - count * 5000 / 60000) <= 1
    assert_partition_of_the_training_set("mnist", train, val)


@shared
def test_shared_cifar10_histogram():
    train = load_dataset("cifar10", "train", data_dir=SHARED_DATA)
    val = load_dataset("cifar10", "val", data_dir=SHARED_DATA)
    test = load_dataset("cifar10", "test", data_dir=SHARED_DATA)
    assert train.images.shape == (45000, 3, 32, 32)
    assert [a + b for a, b in zip(train.label_counts(), val.label_counts())] == [5000] * 10
    assert val.label_counts() == [500] * 10 and test.label_counts() == [1000] * 10
    assert train.classes[0] == "airplane" and train.classes[9] == "truck"
    assert_partition_of_the_training_set("cifar10", train, val)


def _image_label_pairs(images, labels) -> Counter:
    """How often each (image bytes, label) pair occurs."""
    flat = np.ascontiguousarray(images).reshape(len(images), -1)
    return Counter((hashlib.blake2b(row.tobytes(), digest_size=16).digest(), int(y)) for row, y in zip(flat, labels))


def assert_partition_of_the_training_set(name, train, val):
    """train and val are disjoint and together the original training set, each image with its label."""
    folder, layout = sources.verify(sources.get_source(name), SHARED_DATA)
    images, labels = layout.read(folder, "train")
    original = _image_label_pairs(images, labels)
    assert sum(original.values()) == len(original), "the check below assumes no duplicate images"
    a, b = _image_label_pairs(train.images.numpy(), train.labels), _image_label_pairs(val.images.numpy(), val.labels)
    both = len(a.keys() & b.keys())
    assert both == 0, f"{both} images are in both train and val"
    assert a + b == original, f"{sum(((a + b) - original).values())} extra, {sum((original - (a + b)).values())} missing"


def test_split_is_deterministic_stratified_and_disjoint():
    labels = np.repeat(np.arange(7), [10, 20, 30, 40, 50, 60, 70])
    tr1, va1 = stratified_split(labels, 28)
    tr2, va2 = stratified_split(labels, 28)
    assert np.array_equal(va1, va2) and np.array_equal(tr1, tr2)
    assert len(va1) == 28 and len(np.intersect1d(tr1, va1)) == 0 and len(tr1) + len(va1) == len(labels)
    assert np.bincount(labels[va1]).tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert not np.array_equal(stratified_split(labels, 28, seed=1)[1], va1)
    with pytest.raises(DataError, match="validation size 280"):
        stratified_split(labels, 280)


def test_validation_folds_are_disjoint_stratified_and_fold_0_is_the_default_split():
    labels = np.repeat(np.arange(7), [10, 20, 30, 40, 50, 60, 70])
    train0, val0 = stratified_split(labels, 28, fold=0)
    # fold 0 is the split every run had before folds existed (vitlab 92a379f's indices)
    assert val0.tolist() == [4, 14, 28, 37, 48, 52, 61, 73, 80, 87, 104, 126, 128, 130, 141, 151, 157, 200, 202, 204,
                             208, 213, 217, 224, 243, 262, 263, 275]
    assert np.array_equal(stratified_split(labels, 28)[1], val0)
    folds = [stratified_split(labels, 28, fold=f) for f in range(10)]  # class 0: 10 images, 1 a fold
    for tr, va in folds:
        assert np.bincount(labels[va]).tolist() == [1, 2, 3, 4, 5, 6, 7]
        assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(labels)
    vals = np.concatenate([va for _, va in folds])
    assert len(np.unique(vals)) == len(vals) == 280  # disjoint, and together every image
    with pytest.raises(DataError, match="fold 10 must be between 0 and 9"):
        stratified_split(labels, 28, fold=10)
    with pytest.raises(DataError, match="fold -1"):
        stratified_split(labels, 28, fold=-1)
    # a class too small for a share of its own caps nothing; rounding can leave fewer folds than 1 / fraction
    small = np.repeat(np.arange(3), [100, 100, 2])
    assert np.bincount(small[stratified_split(small, 20, fold=9)[1]], minlength=3).tolist() == [10, 10, 0]
    uneven = np.repeat(np.arange(3), [39, 39, 38])
    with pytest.raises(DataError, match="make 4 disjoint folds"):  # 23 of 116 (20%): shares 8, 8, 7
        stratified_split(uneven, 23, fold=4)


@shared
def test_a_validation_fold_of_a_named_dataset():
    """Fold 1 of MNIST's 5,000 val images is another 5,000, disjoint from fold 0's; each is carved
    out of train, which holds the other 55,000."""
    val0, val1 = (load_dataset("mnist", "val", data_dir=SHARED_DATA, val_fold=f) for f in (0, 1))
    train1 = load_dataset("mnist", "train", data_dir=SHARED_DATA, val_fold=1)
    assert len(val0) == len(val1) == 5000 and val0.label_counts() == val1.label_counts()
    seen = _image_label_pairs(val0.images.numpy(), val0.labels)
    assert not seen.keys() & _image_label_pairs(val1.images.numpy(), val1.labels).keys()
    assert_partition_of_the_training_set("mnist", train1, val1)
    folder, layout = sources.verify(sources.get_source("mnist"), SHARED_DATA)
    _, labels = layout.read(folder, "train")
    val_idx = stratified_split(np.asarray(labels), 5000)[1].astype(np.int64)
    assert hashlib.sha1(val_idx.tobytes()).hexdigest()[:16] == "5b37818a9bb897bf"  # vitlab 92a379f's fold 0


# ---- a fake data root in the official formats --------------------------------------------------
def test_any_idx_folder_by_path(tmp_path):
    write_mnist_like(tmp_path / "fashion", gz=False)
    train = load_dataset(tmp_path / "fashion", "train", val_size=10)
    test = load_dataset(tmp_path / "fashion", "test")
    assert train.images.shape == (50, 1, 28, 28) and len(test) == 20
    assert train.classes == [str(i) for i in range(10)]
    # the statistics are those of the whole training file (before the split), not a constant
    raw = np.frombuffer((tmp_path / "fashion" / "train-images-idx3-ubyte").read_bytes()[16:], np.uint8) / 255
    assert train.mean == pytest.approx((raw.mean(),), abs=1e-4)
    assert train.std == pytest.approx((raw.std(ddof=1),), abs=1e-4)


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def test_an_idx_folder_names_its_classes_in_classes_txt(tmp_path):
    folder = tmp_path / "fashion"
    write_mnist_like(folder, gz=False)
    (folder / "classes.txt").write_text("\n".join(f"  {name}" for name in FASHION) + "\n\n", encoding="utf-8")
    for split in ("train", "val", "test"):
        assert load_dataset(folder, split, val_size=10).classes == FASHION  # stripped, trailing blank lines dropped
    for text, match in (("\n".join(FASHION[:9]), "9 lines for the 10 classes"),
                        ("\n".join(FASHION[:4] + [""] + FASHION[5:]), "an empty line"),
                        ("\n".join(FASHION[:9] + ["Bag"]), "given twice: \\['Bag'\\]"),
                        ("\n".join(FASHION[:9] + ["Ankle\x1b[31mboot"]), "control characters in 'Ankle\\\\x1b")):
        (folder / "classes.txt").write_text(text)
        with pytest.raises(DataError, match=match):
            load_dataset(folder, "train", val_size=10)
    (folder / "classes.txt").write_bytes(b"\xff\xfe" + b"x\n" * 10)
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(folder, "test")
    (folder / "classes.txt").write_bytes(b"x" * (2**20 + 1))
    with pytest.raises(DataError, match="over the 1,048,576-byte limit"):
        load_dataset(folder, "test")


def write_numberedidx_bytes(folder, n_train, n_test):
    """IDX files whose image i carries its number i in its first two pixels (every image unique);
    the label of training image i is a function of i, so a pair torn apart shows."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28))
        imgs[:, 0, 0], imgs[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(imgs))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(numbered_label(np.arange(n))))


def numbered_label(i):
    return np.sqrt(np.asarray(i) * 3).astype(int) % 10  # uneven class sizes; the first images are classes 0-5


def image_numbers(data) -> np.ndarray:
    return data.images[:, 0, 0, 0].numpy().astype(int) * 256 + data.images[:, 0, 0, 1].numpy()


@pytest.mark.parametrize("val_size", [None, 37, 0.25])
def test_train_and_val_partition_the_training_set(tmp_path, val_size):
    write_numberedidx_bytes(tmp_path / "d", 300, 40)
    train = load_dataset(tmp_path / "d", "train", val_size=val_size)
    val = load_dataset(tmp_path / "d", "val", val_size=val_size)
    test = load_dataset(tmp_path / "d", "test", val_size=val_size)
    tr, va, te = image_numbers(train), image_numbers(val), image_numbers(test)
    assert len(va) == {None: 30, 37: 37, 0.25: 75}[val_size]  # 10% of the training set by default
    assert not set(tr) & set(va) and len(set(tr)) == len(tr) and len(set(va)) == len(va)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(300))
    assert sorted(te.tolist()) == list(range(40))
    for data, numbers in ((train, tr), (val, va), (test, te)):  # every image kept its own label
        assert data.labels.tolist() == numbered_label(numbers).tolist()
    # stratified: each class gives its share of the validation set, within one image
    counts = np.bincount(numbered_label(np.arange(300)), minlength=10)
    assert np.abs(np.array(val.label_counts()) - counts * len(va) / 300).max() < 1
    # and the same split every time
    assert np.array_equal(image_numbers(load_dataset(tmp_path / "d", "val", val_size=val_size)), va)


def test_idx_image_label_count_mismatch(tmp_path):
    write_mnist_like(tmp_path / "d", gz=False)
    (tmp_path / "d" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(59)))
    with pytest.raises(DataError, match="holds 60 images but .* holds 59 labels"):
        load_dataset(tmp_path / "d", "train")


def test_truncatedidx_bytes(tmp_path):
    write_mnist_like(tmp_path / "d", gz=False)
    f = tmp_path / "d" / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(tmp_path / "d", "train")


@pytest.fixture
def mnist_copy(tmp_path):
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip("../shared/datasets not present")
    shutil.copytree(SHARED_DATA / "mnist", tmp_path / "root" / "mnist")
    return tmp_path / "root"


def test_corrupted_file_names_file_checksums_and_fix(mnist_copy):
    f = mnist_copy / "mnist" / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(DataError) as err:
        load_dataset("mnist", "test", data_dir=mnist_copy)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg and "ec29112dd5afa0611ce80d1b7f02629c" in msg
    assert sources.md5sum(f) in msg and "vitlab data fetch mnist --force" in msg


def test_truncated_file(mnist_copy):
    f = mnist_copy / "mnist" / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz has md5 \w+, expected d53e105e.*\(1000 bytes\)"):
        load_dataset("mnist", "train", data_dir=mnist_copy)


def test_lookup_order(mnist_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="vitlab data fetch mnist"):
        load_dataset("mnist", "test")
    monkeypatch.setenv("VITLAB_DATA", str(mnist_copy))
    assert len(load_dataset("mnist", "test")) == 10000
    # an explicit data dir comes first
    assert sources.data_roots(tmp_path / "x")[:2] == [tmp_path / "x", mnist_copy]
    # torchvision's layout is found too
    (tmp_path / "tv" / "MNIST").mkdir(parents=True)
    shutil.move(str(mnist_copy / "mnist"), str(tmp_path / "tv" / "MNIST" / "raw"))
    assert len(load_dataset("mnist", "test", data_dir=tmp_path / "tv")) == 10000


def test_unknown_dataset_and_split(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="unknown dataset 'imagenet42'"):
        load_dataset("imagenet42")
    with pytest.raises(DataError, match="split 'dev'"):
        load_dataset("mnist", "dev")


def _cifar_py_batch(n, label_key="labels", seed=0):
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: [int(v) for v in np.arange(n) % 10]}


def test_cifar_python_layout_reads_safely(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_cifar_py_batch(40)))
    images, labels = sources._read_cifar10_py(folder, "train")
    assert images.shape == (200, 3, 32, 32) and labels.shape == (200,)

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("touch pwned",))
    monkeypatch.chdir(tmp_path)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        sources._read_cifar10_py(folder, "test")
    assert not (tmp_path / "pwned").exists()


def test_cifar100_binary_fine_labels(tmp_path):
    rec = np.zeros((5, 3074), dtype=np.uint8)
    rec[:, 0] = 7  # coarse
    rec[:, 1] = np.arange(5) * 20  # fine
    (tmp_path / "test.bin").write_bytes(rec.tobytes())
    images, labels = sources._read_cifar100_bin(tmp_path, "test")
    assert labels.tolist() == [0, 20, 40, 60, 80] and images.shape == (5, 3, 32, 32)
    (tmp_path / "test.bin").write_bytes(rec.tobytes()[:-10])
    with pytest.raises(DataError, match="not a whole number of 3074-byte records"):
        sources._read_cifar100_bin(tmp_path, "test")


@pytest.fixture
def no_other_roots(tmp_path, monkeypatch):
    """Only the data dir a test passes is searched: no $VITLAB_DATA, an empty home."""
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_fetch_downloads_verifies_and_renames_atomically(tmp_path, monkeypatch, no_other_roots):
    """Downloads served from local files: the md5 is checked, a bad download leaves nothing."""
    src = tmp_path / "server"
    write_mnist_like(src, n_train=30, n_test=10)
    specs = tuple(sources.FileSpec(p.name, sources.md5sum(p)) for p in sorted(src.iterdir()))
    fake = sources.Source("mnist", "fake", tuple("0123456789"), (0.5,), (0.5,),
                          layouts=(sources.Layout(("mnist",), specs, sources._read_mnist),),
                          downloads=tuple(sources.Download((p.as_uri(),), p.name, sources.md5sum(p), False)
                                          for p in sorted(src.iterdir())))
    monkeypatch.setitem(sources.DATASETS, "mnist", fake)
    root = tmp_path / "root"
    folder = sources.fetch("mnist", data_dir=root, progress=False)
    assert folder == (root / "mnist").resolve()
    assert len(load_dataset("mnist", "test", data_dir=root)) == 10
    # a corrupted server copy: the fetch fails and the good local copy is untouched
    good = (root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    (src / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="download failed.*md5"):
        sources.fetch("mnist", data_dir=root, force=True, progress=False)
    assert (root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes() == good
    assert not [p for p in (root / "mnist").iterdir() if p.name.startswith(".")]  # no temp files left


def test_fetch_extracts_archives(tmp_path, monkeypatch, no_other_roots):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            data = pickle.dumps(_cifar_py_batch(20))
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(buf.getvalue())
    real = sources.DATASETS["cifar10"]
    layout = sources.Layout(real.layouts[1].folders, tuple(sources.FileSpec(f.name) for f in real.layouts[1].files),
                            real.layouts[1].read)
    fake = sources.Source("cifar10", "fake", real.classes, real.mean, real.std, layouts=(layout,),
                          downloads=(sources.Download((archive.as_uri(),), archive.name, sources.md5sum(archive), True),))
    monkeypatch.setitem(sources.DATASETS, "cifar10", fake)
    sources.fetch("cifar10", data_dir=tmp_path / "root", progress=False)
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path / "root")) == 20
