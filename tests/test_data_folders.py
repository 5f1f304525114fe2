import warnings

import numpy as np
import pytest
from PIL import Image

from vitlab.data import folders, load_dataset
from vitlab.errors import DataError


def make_folder(root, classes=("cat", "dog", "emu"), per_class=10, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def test_single_tree_gets_a_seeded_stratified_split(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=20)
    parts = {s: load_dataset(root, s, image_size=16) for s in ("train", "val", "test")}
    assert parts["train"].classes == ["cat", "dog", "emu"]
    assert [len(parts[s]) for s in ("train", "val", "test")] == [48, 6, 6]
    assert parts["val"].label_counts() == [2, 2, 2] and parts["test"].label_counts() == [2, 2, 2]
    assert parts["train"].images.shape == (48, 3, 16, 16)
    again = load_dataset(root, "val", image_size=16)
    assert (again.images == parts["val"].images).all()


def test_validation_folds_of_folders(tmp_path):
    """A single tree keeps its test split on every fold; train/ alone is carved per fold; a folder
    with its own val/ has nothing to carve, so a fold other than 0 is an error, not silently fold 0."""
    root = make_folder(tmp_path / "pets", per_class=20)
    f0, f1 = ({s: load_dataset(root, s, image_size=16, val_fold=f) for s in ("train", "val", "test")} for f in (0, 1))
    assert (f0["test"].images == f1["test"].images).all()
    assert [len(f1[s]) for s in ("train", "val", "test")] == [48, 6, 6] and f1["val"].label_counts() == [2, 2, 2]
    pixels = lambda d: {bytes(x.numpy()) for x in d.images}  # noqa: E731 (random images: all distinct)
    assert not pixels(f0["val"]) & pixels(f1["val"]) and not pixels(f1["val"]) & pixels(f1["train"])
    assert pixels(f0["train"]) | pixels(f0["val"]) == pixels(f1["train"]) | pixels(f1["val"])
    make_folder(tmp_path / "d" / "train", per_class=10)
    tr0, va0, va1 = (load_dataset(tmp_path / "d", s, image_size=8, val_fold=f) for s, f in (("train", 0), ("val", 0), ("val", 1)))
    assert len(va1) == len(va0) == 3 and not pixels(va0) & pixels(va1) and pixels(va1) <= pixels(tr0)
    make_folder(tmp_path / "d" / "val", per_class=2)
    assert len(load_dataset(tmp_path / "d", "val", image_size=8)) == 6
    with pytest.raises(DataError, match="own val/ folder"):
        load_dataset(tmp_path / "d", "val", image_size=8, val_fold=1)


def test_split_subfolders_and_greyscale(tmp_path):
    make_folder(tmp_path / "d" / "train", per_class=10, mode="L")
    make_folder(tmp_path / "d" / "test", per_class=3, mode="L")
    train = load_dataset(tmp_path / "d", "train", image_size=8, channels=1)
    val = load_dataset(tmp_path / "d", "val", image_size=8, channels=1)
    test = load_dataset(tmp_path / "d", "test", image_size=8, channels=1)
    assert train.images.shape[1:] == (1, 8, 8)
    assert len(train) + len(val) == 30 and len(val) == 3 and len(test) == 9


def test_resize_keeps_aspect_and_center_crops(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    img = np.zeros((20, 60, 3), dtype=np.uint8)  # wide: left third red, middle green, right blue
    img[:, :20, 0] = 255
    img[:, 20:40, 1] = 255
    img[:, 40:, 2] = 255
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    Image.fromarray(img).save(tmp_path / "b" / "x.png")
    arr, kept = folders.decode_files([tmp_path / "a" / "x.png"], 10, 3, workers=1)
    assert arr.shape == (1, 3, 10, 10)
    assert arr[0, 1].mean() > 200 and arr[0, 0].mean() < 30  # the centre crop is the green third


def test_unreadable_files_are_skipped_with_a_warning_or_fail_when_strict(tmp_path):
    root = make_folder(tmp_path / "d", per_class=10)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    files, labels, _ = folders.scan(root)
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable file\(s\).*notes.txt.*broken.png"):
        arr, kept = folders.decode_files(files, 8, 3, workers=1)
    assert len(arr) == len(files) - 2
    with pytest.raises(DataError, match=r"2 unreadable file\(s\)"):
        folders.decode_files(files, 8, 3, strict=True, workers=1)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", per_class=2)
    monkeypatch.setattr(folders, "MAX_PIXELS", 1000)  # a 40x30 image stands in for a huge one
    files, _, _ = folders.scan(root)
    with pytest.raises(DataError, match="40x30 = 1,200 pixels exceeds the 1,000-pixel limit"):
        folders.decode_files(files, 8, 3, workers=1)


def test_empty_class_and_single_class(tmp_path):
    root = make_folder(tmp_path / "d", per_class=2)
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="class folder .*empty is empty"):
        folders.scan(root)
    one = make_folder(tmp_path / "one", classes=("only",), per_class=2)
    with pytest.raises(DataError, match="single class folder \\('only'\\)"):
        load_dataset(one, "train")
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset(tmp_path / "none", "train")


def test_parallel_decode_matches_serial(tmp_path):
    root = make_folder(tmp_path / "d", per_class=30)
    files, _, _ = folders.scan(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, _ = folders.decode_files(files, 12, 3, workers=2)
    b, _ = folders.decode_files(files, 12, 3, workers=1)
    assert np.array_equal(a, b)
