"""Exact values for the engine's formulas (warmup-cosine, layer-wise lr decay, EMA, the loss), the
step function's one check per step, the checkpoint policy, and short runs that still learn."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import VisionTransformer
from vitlab.config import ViTConfig
from vitlab.engine import ema as ema_mod
from vitlab.engine import loop
from vitlab.engine.args import OptimArgs, load_run_config
from vitlab.engine.ema import ModelEMA, decay_for_run
from vitlab.engine.loop import CheckpointPolicy, Position, Trainer, loss_fn, train_step
from vitlab.engine.optim import WarmupCosine, build_optimizer, param_groups
from vitlab.engine.runtime import Runtime
from vitlab.train import train


def _one_param_optimizer(lr: float) -> torch.optim.Optimizer:
    p = torch.nn.Parameter(torch.zeros(1))
    return torch.optim.AdamW([{"params": [p], "lr": lr, "lr_scale": 1.0}], lr=lr)


def _lrs(args: OptimArgs, steps_per_epoch: int, epochs: int, max_steps=None) -> tuple[list[float], WarmupCosine]:
    opt = _one_param_optimizer(args.lr)
    sched = WarmupCosine(opt, args, steps_per_epoch, epochs, max_steps)
    lrs = []
    for _ in range(sched.total):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs, sched


# -- warmup + cosine ---------------------------------------------------------------------------

def test_warmup_cosine_exact_values():
    # 20 epochs x 10 steps = 200 steps; 1 warmup epoch = 10 steps (under the 10% cap of 20 steps)
    lr, min_lr = 0.1, 0.01
    lrs, sched = _lrs(OptimArgs(lr=lr, min_lr=min_lr, warmup_epochs=1), 10, 20)
    assert (sched.total, sched.warmup) == (200, 10) and len(lrs) == 200
    assert lrs[0] == pytest.approx(0.01, rel=1e-12)           # lr * 1/10: warmup starts above 0
    assert lrs[4] == pytest.approx(0.05, rel=1e-12)           # lr * 5/10
    assert lrs[9] == pytest.approx(0.1, rel=1e-12)            # end of warmup: the peak
    assert lrs[10] == pytest.approx(0.1, rel=1e-12)           # cosine starts at the peak
    assert lrs[105] == pytest.approx(0.055, rel=1e-12)        # cosine midpoint: (lr + min_lr) / 2
    # last step 199: cosine progress 189/190, reaching min_lr only one step past the end
    last = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * 189 / 190))
    assert lrs[199] == pytest.approx(last, rel=1e-12) and 0.01 < lrs[199] < 0.01001
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(min_lr, rel=1e-12)  # step 200 (not taken)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))    # monotone decay after warmup


def test_schedule_scales_group_lrs_and_resumes_exactly():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 0.2 * 0.25, "lr_scale": 0.25},
                             {"params": [q], "lr": 0.2, "lr_scale": 1.0}], lr=0.2)
    sched = WarmupCosine(opt, OptimArgs(lr=0.2, warmup_epochs=1), 10, 20)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2 * 0.25 / 10, 0.2 / 10], rel=1e-12)
    for _ in range(57):
        sched.step()
    again = WarmupCosine(_one_param_optimizer(0.2), OptimArgs(lr=0.2, warmup_epochs=1), 10, 20)
    again.load_state_dict(sched.state_dict())
    f = 0.5 * (1 + math.cos(math.pi * 47 / 190))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * f, rel=1e-12)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * f, rel=1e-12)


def test_warmup_is_capped_at_a_tenth_of_the_run():
    # the mnist recipe cut to 1 epoch: 429 steps, 1 warmup epoch asked -> 42 steps
    lrs, sched = _lrs(OptimArgs(lr=0.002, warmup_epochs=1), 429, 1)
    assert sched.warmup == 42
    assert lrs[41] == pytest.approx(0.002, rel=1e-12) and lrs.index(max(lrs)) == 41
    assert lrs[-1] < 0.002 * 1e-3
    # a run shorter than warmup_epochs by far: 5 warmup epochs asked, 30 steps in all
    lrs, sched = _lrs(OptimArgs(lr=0.01, warmup_epochs=5), 10, 3)
    assert sched.warmup == 3 and lrs[2] == pytest.approx(0.01, rel=1e-12)
    # the full 15-epoch recipe keeps its 1-epoch warmup; max_steps shortens the run and the warmup
    assert _lrs(OptimArgs(lr=0.002, warmup_epochs=1), 429, 15)[1].warmup == 429
    assert WarmupCosine(_one_param_optimizer(1.0), OptimArgs(warmup_epochs=1), 429, 15, max_steps=200).warmup == 20


# -- layer-wise lr decay -----------------------------------------------------------------------

def _depth3() -> VisionTransformer:
    return VisionTransformer(ViTConfig(img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=3,
                                       num_heads=2, pos_embed="learn", class_token=True, mean=(0.5,), std=(0.5,)))


def test_layer_decay_exact_scales_per_group():
    model = _depth3()
    d = 0.5
    groups = param_groups(model, OptimArgs(lr=1.0, weight_decay=0.05, layer_decay=d))
    scale_of = {name: g["lr_scale"] for g in groups for name in g["names"]}
    wd_of = {name: g["weight_decay"] for g in groups for name in g["names"]}
    names = [n for n, _ in model.named_parameters()]
    assert sorted(scale_of) == sorted(names)  # every parameter in exactly one group
    assert sum(len(g["names"]) for g in groups) == len(names)
    expected = {}
    for n in names:
        if n.startswith(("patch_embed.", "cls_token", "pos_embed")):
            expected[n] = 0.0625      # embeddings: d^(depth + 1) = 0.5^4
        elif n.startswith("blocks.0."):
            expected[n] = 0.125       # d^3
        elif n.startswith("blocks.1."):
            expected[n] = 0.25        # d^2
        elif n.startswith("blocks.2."):
            expected[n] = 0.5         # d^1
        else:
            expected[n] = 1.0         # final norm and head: the full lr
    assert {n for n in names if expected[n] == 1.0} >= {"head.weight", "head.bias", "norm.weight"}
    for n in names:
        assert scale_of[n] == expected[n], n
    for n, p in model.named_parameters():
        no_decay = p.ndim <= 1 or n in ("pos_embed", "cls_token")
        assert wd_of[n] == (0.0 if no_decay else 0.05), n
    opt = build_optimizer(model, OptimArgs(lr=0.004, layer_decay=d))
    name_of = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert g["lr"] == pytest.approx(0.004 * expected[name_of[id(p)]], rel=1e-12)
    # without layer decay: one scale for all
    assert {g["lr_scale"] for g in param_groups(model, OptimArgs())} == {1.0}


# -- EMA ---------------------------------------------------------------------------------------

class _Scalar(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([value], dtype=torch.float64))
        self.register_buffer("table", torch.zeros(1, dtype=torch.float64))  # e.g. BatchNorm statistics
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))  # e.g. a step counter


def test_ema_exact_recursion_with_warmup():
    model = _Scalar(0.0)
    ema = ModelEMA(model, decay=0.5)
    thetas = [1.0, 2.0, -1.0, 4.0, 0.5, 3.0, 2.0, 7.0, -2.0, 1.0, 5.0, 0.0]
    expected, table, decays = 0.0, 0.0, []
    for n, theta in enumerate(thetas, start=1):
        with torch.no_grad():
            model.w.fill_(theta)
            model.table.fill_(10 * n)
            model.count.fill_(n)
        used = ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))  # warmup: 2/11, 3/12, ... reaching 0.5 at n = 8
        expected = d * expected + (1 - d) * theta
        table = d * table + (1 - d) * 10 * n
        decays.append(used)
        assert used == d
        assert ema.module.w.item() == pytest.approx(expected, rel=1e-12, abs=1e-15), n
        if n == 1:
            assert ema.module.w.item() == pytest.approx(9 / 11, rel=1e-12)
        if n == 2:
            assert ema.module.w.item() == pytest.approx(75 / 44, rel=1e-12)  # 1/4 * 9/11 + 3/4 * 2
        assert ema.module.table.item() == pytest.approx(table, rel=1e-12)  # float buffers averaged alike
        assert ema.module.count.item() == n  # others copied
    assert decays[7:] == [0.5] * 5 and decays[6] == 8 / 17
    assert not ema.module.w.requires_grad and ema.updates == len(thetas)


def test_ema_decay_is_capped_by_the_run_length():
    assert decay_for_run(0.999, 10000) == 0.999                      # horizon 1000 = 10% of 10000
    assert decay_for_run(0.999, 6435) == pytest.approx(1 - 1 / 643.5, rel=1e-12)  # mnist, 15 epochs
    assert decay_for_run(0.999, 429) == pytest.approx(1 - 1 / 42.9, rel=1e-12)   # mnist, 1 epoch
    assert decay_for_run(0.9, 108) == 0.9                            # horizon 10 <= 10.8
    assert decay_for_run(0.9, 50) == pytest.approx(0.8, rel=1e-12)  # horizon 5
    assert decay_for_run(0.9, 10) == 0.0 and decay_for_run(0.9, 3) == 0.0  # the "average" is the model
    for total in (1, 7, 11, 100, 429, 6435, 10**6):
        d = decay_for_run(0.9999, total)
        assert 1 / (1 - d) <= ema_mod.MAX_HORIZON_FRACTION * total + 1e-9 or d == 0.0


# -- loss --------------------------------------------------------------------------------------

def test_loss_soft_targets_with_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], dtype=torch.float64)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    eps, K = 0.1, 3

    def log_softmax(row):
        z = math.log(sum(math.exp(v) for v in row))
        return [v - z for v in row]
    per_row = []
    for row, t in zip(logits.tolist(), soft.tolist()):
        smoothed = [ti * (1 - eps) + eps / K for ti in t]  # [0.6633.., 0.3033.., 0.0333..]
        per_row.append(-sum(s * lp for s, lp in zip(smoothed, log_softmax(row))))
    expected = sum(per_row) / 2
    assert loss_fn(logits, soft, eps).item() == pytest.approx(expected, rel=1e-12)
    # hard labels take cross_entropy's path: the same as their one-hot soft targets
    hard = torch.tensor([0, 2])
    assert loss_fn(logits, hard, eps).item() == pytest.approx(
        loss_fn(logits, torch.nn.functional.one_hot(hard, 3).double(), eps).item(), rel=1e-12)
    row0 = log_softmax([2.0, 0.0, -1.0])
    assert loss_fn(logits[:1], hard[:1], 0.0).item() == pytest.approx(-row0[0], rel=1e-12)


# -- the step function, the position, the checkpoint policy --------------------------------------

def _tiny_trainer(accum: int = 2, **optim) -> Trainer:
    cfg = load_run_config(None, ["train.epochs=4", f"train.accum_steps={accum}", "train.batch_size=8",
                                 "train.ema_decay=0.9", "runtime.precision=fp32", "optim.clip_grad=1.0",
                                 *[f"optim.{k}={v}" for k, v in optim.items()]])
    torch.manual_seed(0)
    return Trainer(_depth3(), cfg, Runtime(torch.device("cpu"), "fp32"), steps_per_epoch=5)


def _micro(n: int, start: int = 0):
    g = torch.Generator().manual_seed(start)
    return [(start + k, torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g))
            for k in range(n)]


def test_train_step_updates_once_and_measures(monkeypatch):
    trainer = _tiny_trainer()
    calls = []
    real = loop.all_reduce_sum
    monkeypatch.setattr(loop, "all_reduce_sum", lambda t, rt: calls.append(t.shape) or real(t, rt))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    m = train_step(trainer, iter(_micro(2)), epoch=0)
    assert m["finite"] and m["n"] == 8 and 0 <= m["correct"] <= 8 and m["batches"] == [0, 1]
    assert m["lr"] == pytest.approx(1e-3 / 2, rel=1e-12)  # 20 steps: warmup capped at 2 steps
    assert m["ema_decay"] == pytest.approx(2 / 11) and m["grad_norm"] > 0 and math.isfinite(m["loss"])
    assert len(calls) == 1  # one all-reduce per optimizer step, not per micro-batch
    assert not torch.equal(before["blocks.0.attn.qkv.weight"], trainer.model.state_dict()["blocks.0.attn.qkv.weight"])
    assert trainer.scheduler.step_count == 1 and trainer.ema.updates == 1
    with pytest.raises(ValueError, match="got 1 micro-batches"):
        train_step(trainer, iter(_micro(1)), epoch=0)


def test_non_finite_step_changes_nothing(monkeypatch):
    trainer = _tiny_trainer()
    real = loop.loss_fn
    monkeypatch.setattr(loop, "loss_fn", lambda lo, t, ls: real(lo, t, ls) * float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    m = train_step(trainer, iter(_micro(2, start=4)), epoch=1)
    assert not m["finite"] and math.isnan(m["loss"]) and m["batches"] == [4, 5]
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.module.state_dict().items())
    assert trainer.scheduler.step_count == 0 and trainer.ema.updates == 0 and not trainer.optimizer.state
    err = loop._nonfinite_error(m, Position(step=7), 1, "none written yet")
    assert str(err).startswith("loss is nan at step 8 (epoch 2, batches 5-6); stopped before updating the weights")


def test_position_advance_and_checkpoint_policy(tmp_path):
    pos = Position(step=3, epoch=1, batch=4)
    pos.advance(1, 6, usable=10)
    assert (pos.step, pos.epoch, pos.batch) == (4, 1, 6)
    pos.advance(1, 10, usable=10)  # the epoch's last step: the next one is epoch 2's first batch
    assert (pos.step, pos.epoch, pos.batch) == (5, 2, 0)
    policy = CheckpointPolicy(tmp_path, every=4, keep_last=2, total_steps=12, model_config={})
    assert policy.due_mid_epoch(Position(step=4, epoch=0, batch=4))
    assert not policy.due_mid_epoch(Position(step=5, epoch=0, batch=5))
    assert not policy.due_mid_epoch(Position(step=8, epoch=2, batch=0))    # epoch end: fit saves it
    assert not policy.due_mid_epoch(Position(step=12, epoch=2, batch=4))   # run end: fit saves it
    assert not CheckpointPolicy(tmp_path, 0, 2, 12, {}).due_mid_epoch(Position(step=4, epoch=0, batch=4))
    assert policy.last_good() == "none written yet"


# -- a run much shorter than its warmup still reaches its peak lr, and its EMA fits the run ----------

def _folder(root: Path, classes=("a", "b", "c"), n: int = 24, size: int = 8) -> Path:
    """n images a class, each class a bright vertical band at its own place on noise."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 50, (size, size)).astype(np.uint8)
            img[:, c * size // len(classes):(c + 1) * size // len(classes)] += 150
            Image.fromarray(img, "L").save(root / name / f"{i}.png")
    return root


def test_short_run_reaches_peak_lr_and_fits_its_ema(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    cfg = load_run_config(None, [f"data.name={data}", "data.val_size=12", "model.preset=vit_micro_patch4_32",
                                 "model.img_size=8", "model.depth=1", "model.embed_dim=16", "model.num_heads=2",
                                 "train.batch_size=4", "train.epochs=2", "train.log_every=1", "optim.lr=0.003",
                                 "optim.warmup_epochs=5", "train.ema_decay=0.999", "augment.crop_pad=0",
                                 "augment.flip=false", "runtime.progress=false", "runtime.precision=fp32",
                                 "train.test_at_end=false"])
    train(cfg, tmp_path / "run")
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    total = len(steps)
    assert total == 24  # 48 train images / batch 4 = 12 steps x 2 epochs; 5 warmup epochs asked = 60 steps
    lrs = [r["lr"] for r in steps]
    assert lrs[1] == pytest.approx(0.003, rel=1e-9) and max(lrs) == lrs[1]  # peak at step 2: 10% of the run
    assert lrs[-1] < 0.003 * 0.01                                        # and decayed by the end
    assert all(1 / (1 - r["ema_decay"]) <= 0.1 * total + 1e-9 for r in steps)
    for epoch in (1, 2):  # "batch_acc" is each step's own batch of 4; "acc" its running mean, restarted each epoch
        accs = [r["batch_acc"] for r in steps if r["epoch"] == epoch]
        assert all(a * 4 == round(a * 4) for a in accs)
        assert [r["acc"] for r in steps if r["epoch"] == epoch] == pytest.approx(
            [sum(accs[:k + 1]) / (k + 1) for k in range(len(accs))], abs=1e-12)
    assert len({r["batch_acc"] for r in steps}) > 1
    out = capsys.readouterr().out
    assert "warmup 2 steps, not 60" in out and "EMA decay 0.58333, not 0.999" in out
