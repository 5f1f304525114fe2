"""Hostile and careless inputs to `vitlab train`: bad settings, edited or foreign configs on resume,
runs that died before their first checkpoint, concurrent runs, malformed checkpoints, torn logs.
Each ends either in a working run or in one line on stderr, exit 2, and nothing on disk lost."""
import os
import shutil
import socket
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vitlab.cli import main
from vitlab.engine.args import RunConfig, _field_docs, load_run_config
from vitlab.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from vitlab.engine.log import RunLogger, plot_curves, read_metrics, train_accuracy_series
from vitlab.engine.rundir import RunLock
from vitlab.errors import ModelFileError

from conftest import refusal


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two classes of 8-px images, 10 each: enough for a run of a few optimizer steps."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(10):
            img = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8) + 150 * c
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def tiny(images: Path, **extra) -> list[str]:
    sets = {"data.name": str(images), "data.val_size": 4, "model.preset": "vit_micro_patch4_32",
            "model.img_size": 8, "model.depth": 1, "model.embed_dim": 16, "model.num_heads": 2,
            "train.batch_size": 8, "train.epochs": 1, "train.eval_batch_size": 8, "train.test_at_end": False,
            "augment.crop_pad": 0, "runtime.progress": False, "runtime.precision": "fp32",
            "train.resolution_schedule": "null"}  # the recipe's stages are 32-px sides; this model is 8 px
    sets.update(extra)
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def train_cli(*args) -> int:
    return main(["train", *map(str, args)])


def one_line_error(capsys) -> str:
    """The one stderr line of a refused `vitlab train`; each caller has asserted the exit code (2)."""
    err = refusal(2, capsys.readouterr().err)
    assert err.startswith("vitlab train: error: "), err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock file (which a refused resume may create)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "done"
    assert train_cli("--recipe", "cifar10", *tiny(images), "--out", run) == 0
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


# ---- settings: every bad value fails before anything is written ------------------------------
BAD_SETS = [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"), ("optim.warmup_epochs=nan", "warmup_epochs"),
    ("data.val_size=nan", "data.val_size"), ("data.val_size=2.5", "data.val_size"),
    ("data.val_fold=-1", "data.val_fold"), ("data.val_fold=99", "fold 99 must be between 0 and"),
    ("augment.mixup_alpha=nan", "mixup_alpha"), ("augment.mixup_alpha=inf", "mixup_alpha"),
    ("augment.mix_prob=nan", "mix_prob"), ("optim.beta1=2", "optim.beta1"), ("optim.beta2=nan", "optim.beta2"),
    ("optim.clip_grad=nan", "clip_grad"), ("optim.min_lr=1", "optim.min_lr"), ("optim.lr=1e999", "optim.lr"),
    ("train.seed=-1", "train.seed"), ("train.seed=12345678901234567890", "train.seed"),
    ("runtime.threads=-1", "runtime.threads"), ("runtime.threads=0", "runtime.threads"),
    ("runtime.attn_impl=fast", "attn_impl"), ("runtime.precision=fp16", "fp16"), ("runtime.device=tpu", "device"),
    ("runtime.stem_layout=nhwc", "runtime.stem_layout"),
    ("augment.crop_pad=100000", "crop_pad"), ("augment.crop_pad=9", "crop_pad"),
    ("augment.randaug_ops=1000000", "randaug_ops"), ("model.num_heads=5", "num_heads"),
    ("model.depth=1000000000", "depth"), ("model.img_size=10000000", "img_size"),
    ("model.drop_rate=nan", "drop_rate"), ("model.mlp_ratio=inf", "mlp_ratio"), ("model.preset=vit_nope", "vit_nope"),
    ("model.pretrained=/no/such/model", "/no/such/model"), ("train.accum_steps=3", "divisible"),
    ("data.name=/no/such/folder", "unknown dataset"), ("data.name=", "data.name"),
]


@pytest.mark.parametrize("bad, named", BAD_SETS, ids=[b for b, _ in BAD_SETS])
def test_bad_setting_is_one_line_and_writes_nothing(images, tmp_path, capsys, bad, named):
    out = tmp_path / "runs" / "x"
    assert train_cli("--recipe", "cifar10", *tiny(images), "--set", bad, "--out", out) == 2
    assert named in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


def test_named_dataset_not_on_disk_without_download_fails_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "runs" / "x"
    assert train_cli("--recipe", "mnist", "--set", "data.download=false", "--set", "runtime.progress=false",
                     "--out", out) == 2
    assert "vitlab data fetch mnist" in one_line_error(capsys)
    assert not (tmp_path / "runs").exists()


# ---- resume: the settings must be the checkpoint's ------------------------------------------
def test_resume_refuses_an_edited_config(run_copy, capsys):
    settings = yaml.safe_load((run_copy / "config.yaml").read_text())
    settings["data"]["name"] = str(run_copy.parent)  # another folder (a dataset name could reach the network)
    settings["train"]["batch_size"] = 4
    old_lr, settings["optim"]["lr"] = settings["optim"]["lr"], 0.5
    (run_copy / "config.yaml").write_text(yaml.safe_dump(settings))
    before = snapshot(run_copy / "checkpoints")
    assert train_cli("--resume", run_copy) == 2
    err = one_line_error(capsys)
    assert "data.name: " in err and f"-> '{run_copy.parent}'" in err and "train.batch_size: 8 -> 4" in err
    assert f"optim.lr: {old_lr} -> 0.5" in err and old_lr != 0.5
    assert snapshot(run_copy / "checkpoints") == before


def test_resume_refuses_a_checkpoint_from_another_run(run_copy, capsys):
    ckpt = next((run_copy / "checkpoints").glob("ckpt-*.pt"))
    state = torch.load(ckpt, weights_only=True)
    state["run_config"]["train"]["seed"] = 7  # as if copied over from a run with another seed
    torch.save(state, ckpt)
    assert train_cli("--resume", run_copy) == 2
    err = one_line_error(capsys)
    assert "train.seed: 7 -> 0" in err and ckpt.name in err


def test_resume_may_change_runtime_settings_and_cleans_stale_temporaries(run_copy, capsys):
    stale = run_copy / "checkpoints" / ".ckpt-00000099.pt.k3j2.tmp"
    stale.write_bytes(b"half a checkpoint")
    settings = yaml.safe_load((run_copy / "config.yaml").read_text())
    settings["runtime"]["attn_impl"] = "math"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(settings))
    assert train_cli("--resume", run_copy, "--set", "runtime.threads=1") == 0
    assert not stale.exists()
    RunLock(run_copy).release()  # the resumed run let go of its lock


def test_resume_cannot_set_what_the_run_computes(run_copy, capsys):
    assert train_cli("--resume", run_copy, "--set", "optim.lr=1") == 2
    assert "keeps its settings" in one_line_error(capsys)


# ---- runs that died before their first checkpoint -------------------------------------------
def dead_start(images, run: Path) -> Path:
    """What a run leaves when killed during its first epoch (or its first checkpoint write)."""
    settings = load_run_config("cifar10", tiny(images)[1::2])
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(settings.to_dict(), sort_keys=False))
    (run / ".lock").write_text("pid 1 on host gone, started 2026-01-01T00:00:00\n")  # taken before any write
    (run / "env.json").write_text('{"vitlab": "0.1.0"}\n')
    (run / "metrics.jsonl").write_text('{"kind": "step", "step": 1}\n{"kind": "st')
    (run / "checkpoints" / ".ckpt-00000002.pt.x8a1.tmp").write_bytes(b"torn")
    return run


def test_resume_of_a_dead_start_starts_from_step_0(images, tmp_path, capsys):
    run = dead_start(images, tmp_path / "run")
    assert train_cli("--resume", run) == 0
    assert "stopped before its first checkpoint; starting again from step 0" in capsys.readouterr().out
    assert latest_checkpoint(run)["step"] == 1 and not list((run / "checkpoints").glob("*.tmp"))
    assert all("time" in r for r in read_metrics(run / "metrics.jsonl"))  # the dead start's log is gone


def test_fresh_run_takes_over_a_dead_start(images, tmp_path, capsys):
    run = dead_start(images, tmp_path / "run")
    assert train_cli("--recipe", "cifar10", *tiny(images, **{"train.seed": 3}), "--out", run) == 0
    assert f"taking over {run}" in capsys.readouterr().out
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == 3
    assert latest_checkpoint(run)["step"] == 1 and all("time" in r for r in read_metrics(run / "metrics.jsonl"))


def test_fresh_run_never_takes_over_a_dir_with_a_checkpoint_or_other_files(images, tmp_path, capsys):
    run = dead_start(images, tmp_path / "run")
    (run / "checkpoints" / "ckpt-00000001.pt").write_bytes(b"damaged, but a checkpoint")
    before = snapshot(run)
    assert train_cli("--recipe", "cifar10", *tiny(images), "--out", run) == 2
    assert "already holds a run" in one_line_error(capsys) and snapshot(run) == before
    assert train_cli("--resume", run) == 2
    assert "no usable checkpoint" in one_line_error(capsys) and snapshot(run) == before
    other = tmp_path / "mine"
    other.mkdir()
    (other / "config.yaml").write_text("{}\n")
    (other / "notes.txt").write_text("not a vitlab file")
    assert train_cli("--recipe", "cifar10", *tiny(images), "--out", other) == 2
    assert "already holds a run" in one_line_error(capsys)
    assert (other / "notes.txt").read_text() == "not a vitlab file"


# ---- one process per run directory ----------------------------------------------------------
def test_second_process_on_a_locked_run_says_who_holds_it(run_copy, capsys):
    lock = RunLock(run_copy)  # flock: a second open file description conflicts, even in one process
    try:
        before = snapshot(run_copy / "checkpoints")
        assert train_cli("--resume", run_copy) == 2
        err = one_line_error(capsys)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in err and "in use" in err
        assert snapshot(run_copy / "checkpoints") == before
    finally:
        lock.release()


def test_lock_is_released_when_the_holder_dies(tmp_path):
    import subprocess
    import sys
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from vitlab.engine.rundir import RunLock; lock = RunLock(Path(sys.argv[1])); print('held', "
                               "flush=True); time.sleep(60)", str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception, match=f"pid {holder.pid}"):
            RunLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    RunLock(tmp_path).release()  # kill -9 dropped the lock


# ---- malformed checkpoints and logs ---------------------------------------------------------
def _break(state, how):
    if how == "missing optimizer":
        del state["optimizer"]
    elif how == "negative step":
        state["step"] = -1
    elif how == "step not an int":
        state["step"] = "3"
    elif how == "run_config a list":
        state["run_config"] = [1, 2]
    elif how == "model not tensors":
        state["model"] = {"w": 1.0}
    elif how == "ema not tensors":
        state["ema"] = {"module": {"w": "x"}, "updates": 1}
    elif how == "best val_top1 a string":
        state["best"] = {"val_top1": "high", "weights": "raw", "epoch": 1}
    return state


@pytest.mark.parametrize("how", ["missing optimizer", "negative step", "step not an int", "run_config a list",
                                 "model not tensors", "ema not tensors", "best val_top1 a string"])
def test_malformed_checkpoint_is_one_line_naming_the_file(run_copy, capsys, how):
    ckpt = next((run_copy / "checkpoints").glob("ckpt-*.pt"))
    torch.save(_break(torch.load(ckpt, weights_only=True), how), ckpt)
    with pytest.raises(ModelFileError, match="malformed"):
        load_checkpoint(ckpt)
    assert train_cli("--resume", run_copy) == 2
    assert str(ckpt) in one_line_error(capsys)


def test_checkpoint_with_wrong_shapes_is_one_line(run_copy, capsys):
    ckpt = next((run_copy / "checkpoints").glob("ckpt-*.pt"))
    state = torch.load(ckpt, weights_only=True)
    state["model"]["blocks.0.attn.qkv.weight"] = torch.zeros(48, 8)
    torch.save(state, ckpt)
    assert train_cli("--resume", run_copy) == 2
    err = one_line_error(capsys)
    assert str(ckpt) in err and "blocks.0.attn.qkv.weight is (48, 8), expected (48, 16)" in err


def test_unsafe_checkpoint_message_does_not_advise_weights_only_false(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    torch.save({"format": "vitlab.ckpt/1", "x": Evil()}, tmp_path / "ckpt-00000001.pt")
    with pytest.raises(ModelFileError) as e:
        load_checkpoint(tmp_path / "ckpt-00000001.pt")
    assert "weights_only" not in str(e.value) and "could run code" in str(e.value)


def test_checkpoints_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint({"step": 1}, tmp_path, keep_last=1, best=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "checkpoints" / "best.pt").stat().st_mode) == 0o644


def test_torn_metrics_line_is_skipped_with_a_warning(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"kind": "step", "step": 5, "loss": 1.0, "acc": 0.5, "lr": 0.1}\n'
        '{"kind": "epoch", "epoch": 1, "step": 9, "val_top1": 0.5, "val_loss": 1}\n{"kind": "step", "st')
    with pytest.warns(UserWarning, match=r"metrics.jsonl: skipped 1 unreadable line\(s\) \(line 3; a write torn"):
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 9]
    with pytest.warns(UserWarning, match="torn"):
        plot_curves(tmp_path)
    with pytest.warns(UserWarning, match="torn"):
        logger = RunLogger(tmp_path, True, False, resume_step=9)  # resuming rewrites it without the torn line
    logger.write({"kind": "step", "step": 10})
    logger.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5, 9, 10]


def test_the_train_accuracy_curve_is_the_batch_one_and_an_old_runs_running_mean_is_named_so():
    new = [{"kind": "step", "step": 1, "acc": 0.5, "batch_acc": 0.5}, {"kind": "step", "step": 2, "acc": 0.75,
                                                                          "batch_acc": 1.0}]
    assert [s[1:] for s in train_accuracy_series(new)] == [("batch_acc", "train batch (step)")]
    old = [{k: v for k, v in r.items() if k != "batch_acc"} for r in new]  # written before session 27
    assert [s[1:] for s in train_accuracy_series(old)] == [("acc", "train, mean over the epoch so far")]
    mixed = train_accuracy_series(old[:1] + new[1:])  # a run resumed across the change: both, neither lost
    assert [([r["step"] for r in rows], key) for rows, key, _ in mixed] == [([2], "batch_acc"), ([1], "acc")]


# ---- the settings documentation -------------------------------------------------------------
def test_every_setting_has_help():
    import dataclasses
    for group in dataclasses.fields(RunConfig):
        cls = group.default_factory
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), f"{group.name} has no docstring"
        docs = _field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"{group.name}: no help for {missing}"
    assert "Each field left at null" in " ".join(RunConfig.__dataclass_fields__["model"].default_factory.__doc__.split())
    assert "null" not in _field_docs(RunConfig.__dataclass_fields__["model"].default_factory)["drop_rate"]


# ---- found in review: kills between writes, folders vitlab did not make, odd values ---------
def test_a_hand_written_config_folder_is_never_taken_over(images, tmp_path, capsys):
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my notes\ntrain: {epochs: 1}\n")
    (mine / "metrics.jsonl").write_text('{"from": "another tool"}\n')
    before = snapshot(mine)
    assert train_cli("--recipe", "cifar10", *tiny(images), "--out", mine) == 2
    assert "already holds a run" in one_line_error(capsys) and snapshot(mine) == before


def test_a_dead_start_with_a_torn_run_file_write_is_taken_over(images, tmp_path, capsys):
    run = dead_start(images, tmp_path / "run")
    (run / ".env.json.k2j4.tmp").write_text("{")  # a kill while env.json was being written
    assert train_cli("--recipe", "cifar10", *tiny(images), "--out", run) == 0
    assert f"taking over {run}" in capsys.readouterr().out and not (run / ".env.json.k2j4.tmp").exists()


def test_best_is_written_before_the_checkpoint_that_names_it(tmp_path, monkeypatch):
    """A kill between the two writes must leave the previous checkpoint as the newest, never a
    checkpoint whose best.pt is missing."""
    import vitlab.engine.checkpoint as ckpt_mod
    written = []
    real = ckpt_mod.atomic_write
    monkeypatch.setattr(ckpt_mod, "atomic_write", lambda path, write: (written.append(Path(path).name), real(path, write))[1])
    state = {"step": 7, "model": {}, "history": []}
    save_checkpoint(state, tmp_path, keep_last=2, best=True)
    assert written == ["best.pt", "ckpt-00000007.pt"]


def test_pruning_never_drops_the_checkpoint_just_written(tmp_path):
    """After a resume past a damaged newer checkpoint, keep_last=1 must keep the new good one."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt-00000300.pt").write_bytes(b"damaged")
    (tmp_path / "checkpoints" / "ckpt-00000100.pt").write_bytes(b"old")
    save_checkpoint({"step": 250, "model": {}}, tmp_path, keep_last=1, best=False)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-00000250.pt", "ckpt-00000300.pt"]
    save_checkpoint({"step": 300, "model": {}}, tmp_path, keep_last=1, best=False)  # overwrites the damaged one
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000300.pt"]
    assert torch.load(tmp_path / "checkpoints" / "ckpt-00000300.pt", weights_only=True)["step"] == 300


def test_the_lock_is_released_when_writing_the_run_files_fails(images, tmp_path, monkeypatch):
    """In-process callers (notebooks, tests) keep a failed call's traceback alive: the lock must
    not live on in it, or a retry in the same process finds the run dir "in use"."""
    import vitlab.train as train_mod

    def disk_full(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train_mod, "write_run_files", disk_full)
    settings = load_run_config("cifar10", tiny(images)[1::2])
    with pytest.raises(OSError, match="No space left") as first:
        train_mod.run_training(settings, tmp_path / "run")
    with pytest.raises(OSError, match="No space left"):  # not RunDirError "in use by another process"
        train_mod.run_training(settings, tmp_path / "run")
    assert first.value is not None  # the first traceback is still alive here


def test_a_lock_file_that_is_a_symlink_is_not_followed(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(precious)
    from vitlab.errors import RunDirError
    with pytest.raises(RunDirError, match="symbolic link"):
        RunLock(run)
    assert precious.read_text() == "keep me"


@pytest.mark.parametrize("value", ["{[]: 1}", "9" * 5000, "[" * 200 + "]" * 200])
def test_odd_set_values_are_one_line(images, tmp_path, capsys, value):
    assert train_cli("--recipe", "cifar10", *tiny(images), "--set", f"train.seed={value}", "--out", tmp_path / "r") == 2
    assert "train.seed" in one_line_error(capsys) and not (tmp_path / "r").exists()


def test_resume_may_point_at_a_moved_dataset(run_copy, images, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(images, moved)
    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    config["data"]["name"] = str(images)  # unchanged; data_dir and keep_last may differ
    config["train"]["keep_last"] = 3
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert train_cli("--resume", run_copy, "--set", "data.download=false") == 0, capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="two ranks started by hand (gloo) need a POSIX system")
def test_when_rank_0_cannot_take_the_run_dir_every_rank_stops(images, tmp_path):
    """Under launchers without torchrun's agent (srun, mpirun), a rank-0-only error must stop the
    other ranks too, not leave them waiting in a barrier until the process-group timeout."""
    import subprocess
    import sys
    out = tmp_path / "run"
    out.mkdir()
    lock = RunLock(out)  # held by this test: rank 0 of the run below is refused
    try:
        port = 29600 + os.getpid() % 300
        procs = []
        for rank in range(2):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, "-m", "vitlab", "train", "--recipe", "cifar10",
                                           *tiny(images, **{"runtime.device": "cpu"}), "--out", str(out)],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                pytest.fail("a rank was left waiting after rank 0 stopped")
            results.append((p.returncode, err))
    finally:
        lock.release()
    (rc0, err0), (rc1, err1) = results
    assert rc0 == 2 and "in use by another vitlab process" in err0, err0
    assert rc1 == 2 and "rank 0 stopped" in err1, err1
    assert "Traceback" not in err0 + err1
