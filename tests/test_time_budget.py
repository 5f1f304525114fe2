"""One progress p drives the schedule: `train.time_budget` (training seconds / budget, on a fake
clock that only model forwards advance, so no test sleeps) and `train.resolution_schedule` (input
sizes by p); step-based runs keep their exact lr sequence; bad settings are ConfigErrors."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import VisionTransformer
from vitlab.config import ViTConfig
from vitlab.engine import loop
from vitlab.engine.args import load_run_config, parse_resolution_schedule
from vitlab.engine.checkpoint import latest_checkpoint
from vitlab.engine.ema import decay_for_budget, decay_for_run
from vitlab.engine.log import RunLogger, mmss
from vitlab.engine.optim import MAX_WARMUP_FRACTION, budget_lr_factor, lr_factor
from vitlab.engine.runtime import Runtime
from vitlab.errors import ConfigError
from vitlab.train import rescaled_schedule, resolve, run_training

TRAIN_IMAGES = 48  # 3 classes x 24 images: 12 for validation, 12 for test; 12 steps of batch 4 an epoch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16-px greyscale images, each class a bright vertical band at its own place on noise."""
    root = tmp_path_factory.mktemp("bands")
    rng = np.random.default_rng(0)
    for c, name in enumerate("abc"):
        (root / name).mkdir()
        for i in range(24):
            img = rng.integers(0, 50, (16, 16)).astype(np.uint8)
            img[:, c * 5:(c + 1) * 5] += 150
            Image.fromarray(img, "L").save(root / name / f"{i}.png")
    return root


def _settings(data: Path, **extra):
    sets = {"data.name": str(data), "data.val_size": 12, "model.preset": "vit_micro_patch4_32", "model.img_size": 16,
            "model.depth": 1, "model.embed_dim": 16, "model.num_heads": 2, "train.batch_size": 4, "train.epochs": 1,
            "train.log_every": 1, "train.ckpt_every": 0, "optim.lr": 0.003, "optim.min_lr": 1e-4,
            "optim.warmup_epochs": 5, "augment.crop_pad": 0, "augment.flip": False, "runtime.progress": False,
            "runtime.precision": "fp32", "train.test_at_end": False}
    sets.update(extra)
    return load_run_config(None, [f"{k}={v}" for k, v in sets.items()])


class Killed(Exception):
    pass


class FakeClock:
    """Seconds that pass only in model forwards: 1 s per forward, in training and in evaluation
    alike, so the training seconds count the steps alone exactly when evaluation is left out."""

    def __init__(self, stop_at: int | None = None):
        self.t, self.forwards, self.stop_at = 0.0, 0, stop_at
        self.train_sizes: list[int] = []
        self.eval_sizes: list[int] = []

    def __call__(self) -> float:
        return self.t

    def forward(self, module, args) -> None:
        x = args[0]
        (self.train_sizes if module.training else self.eval_sizes).append(x.shape[-1])
        self.t += 1.0
        self.forwards += 1
        if self.stop_at is not None and self.forwards == self.stop_at:
            raise Killed(f"forward {self.forwards}")


def _with_clock(monkeypatch, clock: FakeClock) -> None:
    """run_training builds its Trainer with this clock, which the model's patch embedding drives."""
    def make(model, *args, **kw):
        model.patch_embed.register_forward_pre_hook(clock.forward)
        return loop.Trainer(model, *args, clock=clock, **kw)
    monkeypatch.setattr("vitlab.train.Trainer", make)


def _records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_budget_ends_the_run_on_time_with_a_finished_schedule(data, tmp_path, monkeypatch, capsys):
    clock = FakeClock()
    _with_clock(monkeypatch, clock)
    # 0.5 min = 30 one-second steps: epochs 1 and 2 (train.epochs=1 is ignored) and 6 steps of epoch 3
    results = run_training(_settings(data, **{"train.time_budget": 0.5, "train.ema_decay": 0.999}), tmp_path / "run")
    run = tmp_path / "run"
    assert results["steps"] == 30 and results["train_s"] == 30.0 and results["epochs"] is None
    assert results["images_seen"] == 120 and results["epochs_equivalent"] == pytest.approx(120 / TRAIN_IMAGES)
    assert len(clock.train_sizes) == 30 and len(clock.eval_sizes) > 0  # evaluation ran, and was not counted
    steps = _records(run, "step")
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert [r["train_s"] for r in steps] == [float(s) for s in range(1, 31)]
    assert [r["p"] for r in steps] == pytest.approx([s / 30 for s in range(1, 31)], abs=1e-12)
    epochs = _records(run, "epoch")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 12), (2, 24), (3, 30)] and "val_top1" in epochs[-1]
    # warmup: 5 epochs (60 steps) asked; 10% of the budget (3 s) ends it first, at the third step
    lrs = [r["lr"] for r in steps]
    assert lrs[0] == pytest.approx(0.003 / 60) and lrs[1] == pytest.approx(0.003 * (2 / 30) / MAX_WARMUP_FRACTION)
    assert lrs[2] == pytest.approx(0.003) and max(lrs) == lrs[2]
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.003 * 0.05
    state = latest_checkpoint(run)
    assert state["train_s"] == 30.0 and state["step"] == 30
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4, rel=1e-9)  # the schedule's end
    horizons = [1 / (1 - r["ema_decay"]) for r in steps]  # capped at 10% of the estimated 30 steps
    assert max(horizons[-5:]) <= 3 + 1e-9
    assert (run / "model" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "time budget 0.5 min" in out and "train.epochs=1 is ignored" in out
    assert "epoch 3 (00:30 of 00:30)" in out


def test_resume_continues_the_budget_from_the_checkpoint(data, tmp_path, monkeypatch):
    settings = _settings(data, **{"train.time_budget": 0.5, "train.ckpt_every": 8})
    # forwards: steps 1-12, the epoch's evaluation, steps 13-19: killed in step 19, after step 16's checkpoint
    _with_clock(monkeypatch, FakeClock(stop_at=20))
    with pytest.raises(Killed):
        run_training(settings, tmp_path / "run")
    state = latest_checkpoint(tmp_path / "run")
    assert state["step"] == 16 and state["train_s"] == 16.0
    again = FakeClock()  # a new session's clock starts anywhere: only the checkpoint's seconds count
    again.t = 1e6
    _with_clock(monkeypatch, again)
    results = run_training(settings, tmp_path / "run", resume=True)
    assert results["steps"] == 30 and results["train_s"] == 30.0 and len(again.train_sizes) == 14
    assert latest_checkpoint(tmp_path / "run")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


def test_step_based_runs_keep_their_exact_lr_sequence(data, tmp_path, monkeypatch):
    _with_clock(monkeypatch, FakeClock())
    run_training(_settings(data, **{"train.epochs": 3, "optim.warmup_epochs": 0.2}), tmp_path / "run")
    steps = _records(tmp_path / "run", "step")
    total, warmup = 36, 2  # round(0.2 x 12) = 2 steps, under the 10% cap of 3
    assert [r["lr"] for r in steps] == [0.003 * lr_factor(s, warmup, total, 1e-4 / 0.003) for s in range(total)]
    assert [r["p"] for r in steps] == [(s + 1) / total for s in range(total)]
    assert all("train_s" not in r and "img_size" not in r for r in steps)


@pytest.mark.parametrize("budget", [None, 0.5])
def test_resolution_stages_switch_at_their_progress(data, tmp_path, monkeypatch, capsys, budget):
    clock = FakeClock()
    _with_clock(monkeypatch, clock)
    # 30 steps either way (train.max_steps, or 30 one-second steps); p before step s is s / 30
    extra = {"train.resolution_schedule": "8:0.25,12:0.25,16:0.5", "train.epochs": 3}
    extra.update({"train.time_budget": budget} if budget else {"train.max_steps": 30})
    run_training(_settings(data, **extra), tmp_path / "run")
    expected = [8] * 8 + [12] * 7 + [16] * 15  # p < 0.25: s <= 7; p < 0.5: s <= 14
    assert clock.train_sizes == expected
    assert set(clock.eval_sizes) == {16}  # evaluation always at full size
    assert [r["img_size"] for r in _records(tmp_path / "run", "step")] == expected
    out = capsys.readouterr().out
    for line in ("resolution 8x8 px from step 1 ", "resolution 12x12 px from step 9 ",
                 "resolution 16x16 px from step 16 "):
        assert line in out


def test_resize_batch_is_antialiased_bilinear():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert loop.resize_batch(x, 8) is x
    small = loop.resize_batch(x, 4)
    assert small.shape == (2, 3, 4, 4)
    # an antialiased 2x bilinear reduction of a linear ramp averages each 2x2 (plus neighbours evenly)
    assert torch.allclose(small, torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear", antialias=True,
                                                                 align_corners=False))
    assert not torch.allclose(small, torch.nn.functional.interpolate(x, size=(4, 4), mode="bilinear"))


def test_ranks_agree_on_rank_0s_seconds_in_the_one_all_reduce(monkeypatch):
    """The seconds travel in train_step's only all-reduce, rank 0's alone: a rank adds what rank 0
    measured, whatever its own clock says (here a fake second rank contributes to the sum)."""
    cfg = load_run_config(None, ["train.batch_size=4", "train.time_budget=1", "runtime.precision=fp32"])
    model_cfg = ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=1, num_heads=2,
                          mean=(0.5,), std=(0.5,))
    batch = [(0, torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,)))]
    calls = []
    for rank, other_rank_sends, expected in ((0, 0.0, 2.5), (1, 7.0, 7.0)):
        ticks = iter([0.0, 2.5, 2.6])  # start, before the all-reduce, end
        trainer = loop.Trainer(VisionTransformer(model_cfg), cfg, Runtime(torch.device("cpu"), "fp32", rank=rank),
                               steps_per_epoch=5, clock=lambda: next(ticks))

        def reduce(t, rt, sends=other_rank_sends):
            calls.append(1)
            other = torch.zeros_like(t)
            other[-1] = sends
            return t + other
        monkeypatch.setattr(loop, "all_reduce_sum", reduce)
        m = loop.train_step(trainer, iter(batch), epoch=0)
        assert m["step_s"] == expected and trainer.train_s == expected
        assert trainer.progress() == pytest.approx(expected / 60)
        assert trainer.untold_s == pytest.approx(0.1)  # the reduce and update, counted with the next step
    assert len(calls) == 2  # one per step


def test_budget_lr_factor_and_ema_cap():
    # warmup by steps (4 asked) when they come before 10% of the budget
    assert budget_lr_factor(0, 0.0, 0.0, 4, None, 0.0) == (0.25, None)
    assert budget_lr_factor(2, 0.01, 0.005, 4, None, 0.0) == (0.75, None)
    f, end = budget_lr_factor(3, 0.02, 0.005, 4, None, 0.0)
    assert (f, end) == (1.0, 0.02)
    # by progress when 10% of the budget comes first; no warmup asked: the cosine from p = 0
    assert budget_lr_factor(1, 0.04, 0.01, 1000, None, 0.0)[0] == pytest.approx(0.5)
    assert budget_lr_factor(0, 0.0, 0.0, 0, None, 0.1) == (1.0, 0.0)
    # the cosine over the rest of p: midpoint and end
    assert budget_lr_factor(50, 0.6, 0.01, 4, 0.2, 0.1)[0] == pytest.approx(0.55)
    assert budget_lr_factor(90, 1.0, 0.01, 4, 0.2, 0.1)[0] == 0.1
    # EMA: 100 steps at p = 0.5 -> 200 estimated -> horizon at most 20
    assert decay_for_budget(0.999, 100, 0.5) == decay_for_run(0.999, 200) == pytest.approx(0.95)
    assert decay_for_budget(0.999, 0, 0.0) == 0.999 and decay_for_budget(0.9, 1000, 0.5) == 0.9


def test_progress_bar_shows_the_budget_left(tmp_path):
    assert mmss(125.2) == "02:06" and mmss(0) == "00:00" and mmss(-3) == "00:00" and mmss(6000) == "100:00"
    logger = RunLogger(tmp_path, enabled=True, progress=True)
    logger.start_epoch(2, None, total=10, initial=0, left_s=90)
    assert logger.bar.desc == "epoch 3, 01:30 left"
    logger.update(left_s=30.2, loss="1.0")
    assert logger.bar.desc == "epoch 3, 00:31 left"
    logger.end_epoch("done")
    logger.start_epoch(2, 15, total=10, initial=0)
    assert logger.bar.desc == "epoch 3/15"
    logger.close()


@pytest.mark.parametrize("sets, words", [
    (["train.time_budget=0"], "train.time_budget=0.0 must be"),
    (["train.time_budget=-5"], "train.time_budget=-5.0 must be"),
    (["train.time_budget=nan"], "train.time_budget=nan"),
    (["train.time_budget=.inf"], "train.time_budget=inf"),
    (["train.time_budget=10", "train.max_steps=100"], "train.time_budget=10.0 and train.max_steps=100"),
    (["train.resolution_schedule=16:0.5,32:0.4"], "sum to 0.9, not 1"),
    (["train.resolution_schedule=16 0.5,32:0.5"], "stage '16 0.5' is not SIZE:FRACTION"),
    (["train.resolution_schedule=a:1"], "stage 'a:1' is not SIZE:FRACTION"),
    (["train.resolution_schedule=0:1"], "stage '0:1' needs a size > 0"),
    (["train.resolution_schedule=16:0,32:1"], "stage '16:0' needs"),
    (["train.resolution_schedule=16:-0.5,32:1.5"], "stage '16:-0.5' needs"),
    (["train.resolution_schedule=16:nan,32:1"], "stage '16:nan' needs"),
])
def test_bad_settings_name_themselves(sets, words):
    with pytest.raises(ConfigError, match="train.time_budget|train.resolution_schedule") as err:
        load_run_config(None, sets)
    assert words in str(err.value)


def test_resolution_schedule_must_fit_the_model(data):
    assert parse_resolution_schedule(" 8:0.3, 12:0.3 ,16:0.4") == ((8, 0.3), (12, 0.3), (16, 0.4))
    resolve(_settings(data, **{"train.resolution_schedule": "8:0.5,16:0.5"}))
    with pytest.raises(ConfigError, match=r"sizes \[10\] are not multiples of the model's patch_size=4 "
                                          r"\(model.patch_size\)"):
        resolve(_settings(data, **{"train.resolution_schedule": "10:0.5,16:0.5"}))
    with pytest.raises(ConfigError, match=r"resolution_schedule='8:0.5,12:0.5'.*img_size=16 \(model.img_size\), "
                                          r"not 12"):
        resolve(_settings(data, **{"train.resolution_schedule": "8:0.5,12:0.5"}))
    assert math.isclose(sum(f for _, f in parse_resolution_schedule("8:0.1,12:0.2,16:0.7")), 1.0)
    # the refusal offers the same stages rescaled to this model, and that schedule is accepted
    with pytest.raises(ConfigError) as err:
        resolve(_settings(data, **{"train.resolution_schedule": "6:0.3,9:0.3,12:0.4"}))
    assert "e.g. --set train.resolution_schedule=8:0.3,12:0.3,16:0.4 (the same stages rescaled)" in str(err.value)
    assert str(err.value).endswith("--set train.resolution_schedule=null for full size throughout")
    resolve(_settings(data, **{"train.resolution_schedule": "8:0.3,12:0.3,16:0.4"}))


def test_a_schedule_rescaled_to_another_model():
    stages = parse_resolution_schedule("16:0.25,24:0.25,32:0.5")  # the cifar10 recipe's
    assert rescaled_schedule(stages, 64, 4) == "32:0.25,48:0.25,64:0.5"
    assert rescaled_schedule(stages, 224, 16) == "112:0.25,176:0.25,224:0.5"  # 168 rounds to 11 patches
    assert rescaled_schedule(stages, 8, 4) == "4:0.25,8:0.25,8:0.5"  # 6 px rounds (half up) to 8
    assert rescaled_schedule(parse_resolution_schedule("4:0.5,64:0.5"), 16, 4) is None  # 1 px rounds to 0
    assert rescaled_schedule(parse_resolution_schedule("24:0.5,16:0.5"), 32, 4) is None  # out of order
    thirds = parse_resolution_schedule("8:0.3333333333,12:0.3333333333,16:0.3333333334")
    assert parse_resolution_schedule(rescaled_schedule(thirds, 32, 4)) == ((16, 0.3333333333), (24, 0.3333333333),
                                                                           (32, 0.3333333334))  # fractions kept exactly
    with pytest.raises(ConfigError, match=r"sizes \[4096\] exceed the model's img_size=16"):
        resolve(_settings(data, **{"train.resolution_schedule": "4096:0.5,16:0.5"}))
