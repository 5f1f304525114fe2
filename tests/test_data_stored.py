"""Image folders held three ways (vitlab.data.stored): in memory, streamed through worker processes,
and decoded once into a cache file. The batches must be identical whichever is used, the cache
must be keyed by the folder's content, the stream's memory bounded, and a damaged file named."""
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data import load_dataset, stored
from vitlab.data.augment import AugmentArgs, TrainTransform
from vitlab.data.loader import BatchLoader
from vitlab.engine.args import load_run_config
from vitlab.errors import ConfigError, DataError

from conftest import tiny_config


def make_folder(root, per_class=12, classes=("ant", "bee", "cow")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(20, 50, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def batches(data, train=True, epoch=1, start=0):
    cfg = tiny_config(img_size=16, num_classes=3)
    tf = TrainTransform(AugmentArgs(crop_pad=2, flip=True), cfg)
    loader = BatchLoader(data, 5, train, tf if train else (lambda x, y, g: (x, y)), seed=3)
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("workers", [1, 2])
def test_memory_stream_and_cache_give_identical_batches(tmp_path, workers):
    root = make_folder(tmp_path / "pets")
    sets = {how: load_dataset(root, "train", image_size=16, storage=how, cache_dir=tmp_path / "cache", workers=workers)
            for how in ("memory", "stream", "cache")}
    assert isinstance(sets["memory"].images, torch.Tensor)
    assert isinstance(sets["stream"].images, stored.FolderStream)
    assert isinstance(sets["cache"].images, stored.DecodedCache)
    for how, data in sets.items():
        assert len(data) == 28 and data.images.shape == (28, 3, 16, 16), how
        assert torch.equal(data.labels, sets["memory"].labels), how
        assert torch.equal(data.images[torch.tensor([3, 0, 27])], sets["memory"].images[[3, 0, 27]]), how
    want = batches(sets["memory"])
    assert len(want) == 5
    for how in ("stream", "cache"):
        got = batches(sets[how])
        assert len(got) == len(want)
        for (xa, ya), (xb, yb) in zip(want, got):
            assert torch.equal(xa, xb) and torch.equal(ya, yb), how
        # resumed mid-epoch: the same remaining batches
        for (xa, _), (xb, _) in zip(want[2:], batches(sets[how], start=2)):
            assert torch.equal(xa, xb), how
        ev = batches(sets[how], train=False)
        assert torch.equal(torch.cat([x for x, _ in ev]), sets["memory"].images), how
    sub = sets["stream"].take(torch.tensor([5, 1]))
    assert torch.equal(sub.images[torch.arange(2)], sets["memory"].images[[5, 1]])
    assert torch.equal(sub.labels, sets["memory"].labels[[5, 1]])


def test_the_cache_is_built_once_and_keyed_by_the_folder(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pets")
    cache = tmp_path / "cache"
    first = load_dataset(root, "train", image_size=16, storage="cache", cache_dir=cache, workers=1)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".u8")
    assert (cache / files[1]).stat().st_size == 28 * 3 * 16 * 16

    def no_decoding(*a, **k):
        raise AssertionError("decoded again")
    monkeypatch.setattr(stored.folders, "decode_image", no_decoding)
    again = load_dataset(root, "train", image_size=16, storage="cache", cache_dir=cache, workers=1)
    assert torch.equal(again.images[torch.arange(28)], first.images[torch.arange(28)])
    monkeypatch.undo()
    # another image size, or an edited file, is another cache
    load_dataset(root, "train", image_size=8, storage="cache", cache_dir=cache, workers=1)
    victim = sorted((root / "bee").iterdir())[0]
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(victim)
    os.utime(victim, ns=(1, 1))
    edited = load_dataset(root, "train", image_size=16, storage="cache", cache_dir=cache, workers=1)
    assert len(list(cache.glob("*.u8"))) == 3
    memory = load_dataset(root, "train", image_size=16, storage="memory")
    assert torch.equal(edited.images[torch.arange(28)], memory.images)


def test_a_damaged_cache_is_rebuilt_and_a_stopped_build_leaves_nothing(tmp_path, monkeypatch, capsys):
    root = make_folder(tmp_path / "pets")
    cache = tmp_path / "cache"
    load_dataset(root, "train", image_size=16, storage="cache", cache_dir=cache, workers=1)
    data_file = next(cache.glob("*.u8"))
    with open(data_file, "r+b") as f:
        f.truncate(100)
    capsys.readouterr()
    rebuilt = load_dataset(root, "train", image_size=16, storage="cache", cache_dir=cache, workers=1)
    assert "does not match its index; rebuilding it" in capsys.readouterr().out
    assert torch.equal(rebuilt.images[torch.arange(28)], load_dataset(root, "train", image_size=16).images)

    calls = []

    def dies_on_second_chunk(job):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(job)
    real = stored._decode_each
    monkeypatch.setattr(stored, "_decode_each", dies_on_second_chunk)
    monkeypatch.setattr(stored.folders, "default_workers", lambda: 1)
    big = make_folder(tmp_path / "big", per_class=40)
    with pytest.raises(KeyboardInterrupt):
        load_dataset(big, "train", image_size=16, storage="cache", cache_dir=tmp_path / "c2", workers=1)
    assert list((tmp_path / "c2").iterdir()) == []


def test_unreadable_files_are_skipped_alike_and_a_damaged_file_is_named_when_streamed(tmp_path):
    root = make_folder(tmp_path / "pets")
    (root / "ant" / "notes.png").write_text("not an image")
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        mem = load_dataset(root, "train", image_size=16, storage="memory")
    for how in ("stream", "cache"):
        with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
            data = load_dataset(root, "train", image_size=16, storage=how, cache_dir=tmp_path / "c", workers=1)
        assert torch.equal(data.labels, mem.labels), how
        assert torch.equal(data.images[torch.arange(len(data))], mem.images), how
    # a file whose header is fine but whose pixels are cut off: found when its batch is decoded
    with pytest.warns(UserWarning, match="skipped 1 unreadable file"):
        stream = load_dataset(root, "train", image_size=16, storage="stream", workers=1)
    victim = stream.images.files[7]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(DataError, match=f"{victim}.*passed the header check before training but cannot be decoded"):
        batches(stream, train=False)


def _exit_worker(_):
    os._exit(3)  # a decoding process killed (the OOM killer, say)


def test_one_decoding_pool_serves_the_run_and_a_broken_one_is_replaced(tmp_path, monkeypatch):
    """A run's streamed splits share one pool of worker processes, started once (not per epoch or
    evaluation) and shut down when the splits are gone. A worker that dies while idle costs nothing;
    one that dies mid-stream gives one DataError; either way the next stream gets a fresh pool."""
    import gc
    made = []

    class Counted(stored.ProcessPoolExecutor):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)
    monkeypatch.setattr(stored, "ProcessPoolExecutor", Counted)
    root = make_folder(tmp_path / "pets")
    train, val = (load_dataset(root, split, image_size=16, storage="stream", workers=2) for split in ("train", "val"))
    first = [batches(train, epoch=e) for e in (1, 2, 3)]
    batches(val, train=False)
    assert len(made) == 1 and train.images.pool is val.images.pool
    with pytest.raises(BrokenProcessPool):  # a worker dies; the pool is idle again, and broken
        made[0].submit(_exit_worker, 0).result()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[0], batches(train)))
    assert len(made) == 2
    with pytest.raises(DataError, match="a process decoding images died"):  # mid-stream
        list(stored.ordered(train.images.pool.get(), _exit_worker, range(4), ahead=2))
    assert len(batches(train)) == len(first[0]) and len(made) == 3
    del train, val
    gc.collect()
    with pytest.raises(RuntimeError, match="shutdown"):  # the last split gone: its workers are stopped
        made[2].submit(int)


def test_streaming_holds_a_bounded_number_of_batches():
    taken, in_flight, peak = [0], [0], [0]
    lock = threading.Lock()

    def job(i):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0] - taken[0])
        return i
    with ThreadPoolExecutor(4) as pool:
        out = []
        for r in stored.ordered(pool, job, range(40), ahead=3):
            time.sleep(0.002)  # a slow consumer
            with lock:
                taken[0] += 1
            out.append(r)
    assert out == list(range(40))
    assert peak[0] <= 3


def test_auto_streams_what_does_not_fit_and_settings_are_checked(monkeypatch):
    monkeypatch.setattr(stored, "available_memory", lambda: 4 * 10**9)
    assert stored.choose_storage("auto", 1000, (3, 224, 224)) == "memory"  # 0.15 GB
    assert stored.choose_storage("auto", 20000, (3, 224, 224)) == "stream"  # 3 GB > 1 GB
    assert stored.choose_storage("cache", 1, (1, 8, 8)) == "cache"
    with pytest.raises(ConfigError, match="data.storage='disk' must be one of"):
        load_run_config(None, ["data.storage=disk"])
    with pytest.raises(ConfigError, match="data.workers=0 must be >= 1"):
        load_run_config(None, ["data.workers=0"])


def test_a_cache_that_does_not_fit_on_disk_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "pets")
    monkeypatch.setattr(stored.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(DataError, match="needs 0.0 GiB but .* has 0.0 GiB free; set data.cache_dir"):
        load_dataset(root, "train", image_size=16, storage="cache", cache_dir=tmp_path / "c", workers=1)
    assert not list((tmp_path / "c").glob("*.u8"))


def test_training_gives_the_same_weights_whichever_storage(tmp_path):
    from conftest import write_shapes
    from vitlab.engine.checkpoint import latest_checkpoint
    from vitlab.train import run_training
    data = write_shapes(tmp_path / "shapes", ("h", "v", "d"), 30)
    weights = {}
    for how in ("memory", "stream", "cache"):
        sets = [f"data.name={data}", f"data.storage={how}", f"data.cache_dir={tmp_path / 'decoded'}", "data.workers=2",
                "model.preset=vit_micro_patch4_32", "model.img_size=16", "model.depth=1", "model.embed_dim=16",
                "model.num_heads=2", "model.conv_stem=[]", "train.batch_size=8", "train.epochs=2", "runtime.progress=false",
                "runtime.precision=fp32", "runtime.attn_impl=math", "train.resolution_schedule=null"]
        results = run_training(load_run_config("cifar10", sets), tmp_path / how)
        weights[how] = latest_checkpoint(tmp_path / how)["model"]
        assert results["test"]["n"] == 9, how
    for how in ("stream", "cache"):
        for k, v in weights["memory"].items():
            assert torch.equal(v, weights[how][k]), (how, k)


def test_resume_refuses_a_folder_that_changed_size(tmp_path, monkeypatch):
    import vitlab.engine.loop as loop
    from conftest import write_shapes
    from vitlab.errors import RunDirError
    from vitlab.train import run_training
    data = write_shapes(tmp_path / "shapes", ("h", "v", "d"), 30)
    sets = [f"data.name={data}", "model.preset=vit_micro_patch4_32", "model.img_size=16", "model.depth=1",
            "model.embed_dim=16", "model.num_heads=2", "model.conv_stem=[]", "train.batch_size=8", "train.epochs=3",
            "runtime.progress=false", "runtime.precision=fp32", "runtime.attn_impl=math",
            "train.resolution_schedule=null"]
    real, calls = loop.train_step, []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 12:  # after the first epoch's checkpoint (9 steps)
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(loop, "train_step", dies)
    with pytest.raises(KeyboardInterrupt):
        run_training(load_run_config("cifar10", sets), tmp_path / "run")
    monkeypatch.setattr(loop, "train_step", real)
    for f in sorted((data / "h").iterdir())[:3]:
        f.unlink()
    with pytest.raises(RunDirError, match=r"trained on 72 images but .* now gives 69"):
        run_training(load_run_config("cifar10", sets), tmp_path / "run", resume=True)
