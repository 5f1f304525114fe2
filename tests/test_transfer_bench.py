"""benchmarks/transfer.py end to end on a tiny CIFAR-shaped set: the seeded, stratified, disjoint
subsets written as image folders, one pretraining run and the three methods through the real
command line (2 optimizer steps each), and the README table built from the records."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import transfer  # noqa: E402

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _fake_cifar(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    rng.shuffle(labels)
    images = rng.integers(0, 80, (len(labels), 3, 32, 32), dtype=np.uint8)
    images[np.arange(len(labels)), labels % 3] += (25 * labels).astype(np.uint8)[:, None, None]  # learnable
    return images, labels


def test_subsets_are_seeded_stratified_and_disjoint():
    _, labels = _fake_cifar(80, 0)
    tr, va = transfer.subset(labels, transfer.TARGET_CLASSES, 20, seed=1)
    assert np.bincount(labels[tr], minlength=10).tolist() == [0] * 5 + [20] * 5
    assert np.bincount(labels[va], minlength=10).tolist() == [0] * 5 + [transfer.VAL_PER_CLASS] * 5
    assert not set(tr) & set(va)
    again, _ = transfer.subset(labels, transfer.TARGET_CLASSES, 20, seed=1)
    other, _ = transfer.subset(labels, transfer.TARGET_CLASSES, 20, seed=2)
    assert np.array_equal(tr, again) and not np.array_equal(tr, other)
    with pytest.raises(ValueError, match="class 5 has 80 images, fewer than 40 \\+ 50"):
        transfer.subset(labels, transfer.TARGET_CLASSES, 40, seed=0)


def test_the_whole_benchmark_on_a_tiny_set(tmp_path, monkeypatch):
    train, test = _fake_cifar(60, 0), _fake_cifar(4, 1)
    monkeypatch.setattr(transfer, "load_cifar10", lambda data_dir: (train, test, NAMES))
    monkeypatch.setattr(transfer, "RESULTS", tmp_path / "transfer.json")
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{transfer.BEGIN}\nold\n{transfer.END}\nafter\n")
    monkeypatch.setattr(transfer, "README", readme)
    work = tmp_path / "work"
    fast = ["--set", "runtime.precision=fp32", "--set", "runtime.attn_impl=sdpa"]  # no autotune timing
    transfer.main(["--work", str(work), "--sizes", "8", "--seeds", "0", "--steps", "2", *fast,
                   "--pretrain-set", "train.max_steps=2"])

    # the folders a user would have: pretraining on classes 0-4, the target subset on classes 5-9
    pre = work / "pretrain"
    assert sorted(p.name for p in (pre / "train").iterdir()) == NAMES[:5]
    assert sum(1 for _ in (pre / "train").rglob("*.png")) == 300 and sum(1 for _ in (pre / "test").rglob("*.png")) == 20
    target = work / "target-n8-s0"
    for split, n in (("train", 8), ("val", transfer.VAL_PER_CLASS), ("test", 4)):
        assert sorted(p.name for p in (target / split).iterdir()) == NAMES[5:]
        assert [len(list((target / split / c).iterdir())) for c in NAMES[5:]] == [n] * 5, split
    assert not list(work.glob("*.partial"))

    records = json.loads((tmp_path / "transfer.json").read_text())["runs"]
    assert [r["method"] for r in records] == ["pretrain", "scratch", "probe", "full"]
    assert all(r["test_top1"] is not None for r in records)
    runs = {r["method"]: r for r in records[1:]}
    assert runs["scratch"]["pretrained"] is None and runs["full"]["pretrained"].endswith("pretrain-run/model")
    assert runs["probe"]["per_class"] == 8 and runs["probe"]["steps"] == 2
    import vitlab
    model = vitlab.load_model(Path(runs["full"]["run_dir"]) / "model")
    from vitlab.engine.args import load_run_config
    stem = tuple(load_run_config("cifar10").model.conv_stem)  # the recipe's model, whatever it is now
    assert model.config.class_names == tuple(NAMES[5:]) and model.config.conv_stem == stem and len(stem) >= 2
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| 8 | probe |" in text and "Pretrained model: `cifar10` recipe on classes 0-4" in text

    # a second call reuses the folders and the pretrained model, and appends
    transfer.main(["--work", str(work), "--sizes", "8", "--seeds", "0", "--methods", "probe", "--steps", "2", *fast])
    records = json.loads((tmp_path / "transfer.json").read_text())["runs"]
    assert [r["method"] for r in records] == ["pretrain", "scratch", "probe", "full", "probe"]
    text = readme.read_text()  # the repeat of seed 0 replaces the first in the table
    assert "| 8 | probe | " in text and "| 1 (0) |" in text and "| 2 (0, 0) |" not in text
