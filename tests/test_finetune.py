"""One end-to-end fine-tuning run from `model.pretrained`: a 10-class 16-px model fine-tuned on a
3-class 24-px image folder with layer-wise lr decay. The run's starting point (new head, resampled
position embedding, pretrained body) and its parameter groups' lrs are checked exactly."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
import vitlab.train as train_mod
from conftest import refusal
from vitlab.config import ViTConfig
from vitlab.engine.args import load_run_config
from vitlab.pos_embed import resample_pos_embed
from vitlab.weights.modeldir import save_model


def _pretrained(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    cfg = ViTConfig(img_size=16, patch_size=4, num_classes=10, embed_dim=16, depth=3, num_heads=2, pool="token",
                    class_token=True, pos_embed="learn", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6),
                    class_names=tuple(str(i) for i in range(10)))
    model = vitlab.VisionTransformer(cfg)
    with torch.no_grad():  # a position embedding with structure, as if it had been trained
        model.pos_embed.normal_(0, 1.0)
        model.head.weight.normal_(0, 1.0)
    save_model(model, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _folder(root: Path, classes=("fox", "cat", "dog"), n: int = 12, size: int = 24) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
            img[:, :, c] += 150
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_finetune_from_pretrained_with_layer_decay(tmp_path, monkeypatch):
    original = _pretrained(tmp_path / "pre")
    data = _folder(tmp_path / "data")
    seen = {}
    real_fit = train_mod.fit

    def inspecting_fit(trainer, *args, **kw):  # the trainer exactly as training begins
        seen["start"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        name_of = {id(p): n for n, p in trainer.model.named_parameters()}
        seen["lr"] = {name_of[id(p)]: g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
        return real_fit(trainer, *args, **kw)
    monkeypatch.setattr(train_mod, "fit", inspecting_fit)
    cfg = load_run_config(None, [f"data.name={data}", "data.val_size=6", f"model.pretrained={tmp_path / 'pre'}",
                                 "model.img_size=24", "optim.layer_decay=0.75", "optim.lr=0.01",
                                 "optim.warmup_epochs=0", "train.batch_size=6", "train.epochs=2",
                                 "augment.crop_pad=0", "augment.flip=false", "runtime.progress=false",
                                 "runtime.precision=fp32", "train.test_at_end=false"])
    results = train_mod.train(cfg, tmp_path / "run")
    start = seen["start"]

    # a new, zero-initialised head for the folder's 3 classes (sorted folder names)
    assert start["head.weight"].shape == (3, 16) and start["head.bias"].shape == (3,)
    assert not start["head.weight"].any() and not start["head.bias"].any()
    # the learned position embedding resampled from the 4x4 grid to 6x6, class-token slot kept
    assert original["pos_embed"].shape == (1, 1 + 16, 16) and start["pos_embed"].shape == (1, 1 + 36, 16)
    assert torch.equal(start["pos_embed"], resample_pos_embed(original["pos_embed"], 6, 1))
    assert torch.equal(start["pos_embed"][:, 0], original["pos_embed"][:, 0])
    # everything else starts from the pretrained weights
    body = [k for k in original if not k.startswith(("head.", "pos_embed"))]
    assert len(body) > 30 and set(start) == set(original)
    for k in body:
        assert torch.equal(start[k], original[k]), k
    # layer decay over depth 3: embeddings 0.75^4, block i 0.75^(3 - i), final norm and head 0.75^0
    for name, lr in seen["lr"].items():
        if name.startswith(("patch_embed", "cls_token", "pos_embed")):
            scale = 0.75 ** 4
        elif name.startswith("blocks."):
            scale = 0.75 ** (3 - int(name.split(".")[1]))
        else:
            scale = 1.0
        assert lr == pytest.approx(0.01 * scale, rel=1e-12), name
    assert seen["lr"]["head.weight"] == pytest.approx(0.01) and seen["lr"]["blocks.0.mlp.fc1.weight"] == \
        pytest.approx(0.01 * 0.421875) and seen["lr"]["pos_embed"] == pytest.approx(0.01 * 0.31640625)

    # the fine-tuned model: the folder's classes at 24 px, the pretrained preprocessing kept
    model = vitlab.load_model(tmp_path / "run" / "model")
    assert model.config.class_names == ("cat", "dog", "fox") and model.config.num_classes == 3
    assert model.config.img_size == 24 and model.config.mean == (0.1, 0.2, 0.3) and model.config.std == (0.4, 0.5, 0.6)
    assert results["steps"] == 8  # 24 train images (6 carved for val, 6 for test) / 6 x 2 epochs
    assert model.head.weight.abs().sum() > 0  # the new head trained


def _foreign(kind: str, root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The `_pretrained` model written as another library would have it: (source path, its weights)."""
    from safetensors.torch import save_file
    from vitlab.weights.hf import to_hf
    from vitlab.weights.torchvision import to_torchvision
    original = _pretrained(root / "vitlab")
    model = vitlab.load_model(root / "vitlab")
    if kind == "timm.pth":
        torch.save({"state_dict": model.state_dict()}, root / "w.pth")  # a training-checkpoint wrapper
        return root / "w.pth", original
    if kind == "timm.safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "w.safetensors")
        return root / "w.safetensors", original
    if kind == "torchvision":
        torch.save(to_torchvision(model)[1], root / "tv.pth")
        return root / "tv.pth", original
    to_hf(model, root / "hf")
    return root / "hf", original


def _start_of_run(tmp_path, monkeypatch, pretrained: Path, *sets: str) -> dict[str, torch.Tensor]:
    seen = {}
    real_fit = train_mod.fit

    def inspecting_fit(trainer, *args, **kw):
        seen["start"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        return real_fit(trainer, *args, **kw)
    monkeypatch.setattr(train_mod, "fit", inspecting_fit)
    data = _folder(tmp_path / "data")
    cfg = load_run_config(None, [f"data.name={data}", "data.val_size=6", f"model.pretrained={pretrained}",
                                 "model.img_size=24", "train.batch_size=6", "train.max_steps=1",
                                 "runtime.progress=false", "runtime.precision=fp32", "train.test_at_end=false",
                                 *sets])
    train_mod.train(cfg, tmp_path / "run")
    return seen["start"]


@pytest.mark.parametrize("kind", ["timm.pth", "timm.safetensors", "torchvision", "hf"])
def test_finetune_from_a_foreign_checkpoint_converted_on_the_fly(tmp_path, monkeypatch, kind):
    source, original = _foreign(kind, tmp_path / "src")
    before = sorted(p.relative_to(tmp_path / "src") for p in (tmp_path / "src").rglob("*"))
    heads = [] if kind == "hf" else ["model.num_heads=2"]  # width 16: shapes cannot tell the head count
    start = _start_of_run(tmp_path, monkeypatch, source, *heads)
    assert start["head.weight"].shape == (3, 16) and not start["head.weight"].any()
    assert torch.equal(start["pos_embed"], resample_pos_embed(original["pos_embed"], 6, 1))
    body = [k for k in original if not k.startswith(("head.", "pos_embed"))]
    for k in body:
        assert torch.equal(start[k], original[k]), k
    model = vitlab.load_model(tmp_path / "run" / "model")
    assert model.config.num_heads == 2 and model.config.img_size == 24
    assert sorted(p.relative_to(tmp_path / "src") for p in (tmp_path / "src").rglob("*")) == before  # untouched


def test_a_diverged_head_does_not_block_fine_tuning_with_a_new_head(tmp_path, monkeypatch, capsys):
    """NaN or infinite values in the head of a checkpoint do not matter when the head is replaced
    (other classes); in the body they still refuse the run, in one line, before it starts."""
    from safetensors.torch import load_file, save_file
    from vitlab.cli import main
    source, original = _foreign("timm.safetensors", tmp_path / "src")
    state = load_file(source)
    state["head.weight"][0, 0], state["head.bias"][1] = float("nan"), float("inf")
    save_file(state, source)
    start = _start_of_run(tmp_path, monkeypatch, source, "model.num_heads=2")
    assert start["head.weight"].shape == (3, 16) and not start["head.weight"].any() and not start["head.bias"].any()
    for k in original:
        if not k.startswith(("head.", "pos_embed")):
            assert torch.equal(start[k], original[k]), k

    state["blocks.1.mlp.fc1.weight"][2, 3] = float("nan")
    save_file(state, source)
    code = main(["train", "--recipe", "finetune", "--set", f"data.name={tmp_path / 'data'}", "--set",
                 f"model.pretrained={source}", "--set", "model.num_heads=2", "--set", "runtime.progress=false",
                 "--out", str(tmp_path / "run2")])
    refusal(code, capsys.readouterr().err, "NaN or infinite values in 1 tensor(s): blocks.1.mlp.fc1.weight")
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("setup, message", [
    ("no_heads", "cannot infer the head count for width 16; give it with --set model.num_heads=N"),
    ("hf_weights_file", "holds Hugging Face ViT weights: pass the save_pretrained directory"),
    ("not_a_vit", "has neither timm nor torchvision ViT key names"),
    ("two_files", "is a folder with 2 weight files"),
    ("missing", "no such file or directory"),
])
def test_a_pretrained_source_that_cannot_be_read_is_one_line(tmp_path, capsys, setup, message):
    from safetensors.torch import save_file
    from vitlab.cli import main
    source, _ = _foreign("timm.pth", tmp_path / "src")
    if setup == "hf_weights_file":
        _foreign("hf", tmp_path / "h")
        source = next((tmp_path / "h" / "hf").glob("*.safetensors"))
    elif setup == "not_a_vit":
        save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "lin.safetensors")
        source = tmp_path / "lin.safetensors"
    elif setup == "two_files":
        (tmp_path / "two").mkdir()
        save_file({"a": torch.zeros(1)}, tmp_path / "two" / "a.safetensors")
        save_file({"a": torch.zeros(1)}, tmp_path / "two" / "b.safetensors")
        source = tmp_path / "two"
    elif setup == "missing":
        source = tmp_path / "nothing.pth"
    data = _folder(tmp_path / "data")
    code = main(["train", "--recipe", "finetune", "--set", f"data.name={data}", "--set", f"model.pretrained={source}",
                 "--set", "runtime.progress=false", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


class Killed(Exception):
    pass


import vitlab.engine.loop as loop  # noqa: E402

REAL_EPOCH, REAL_STEP = loop.train_one_epoch, loop.train_step  # wrapped afresh by each run below


def _probe_run(tmp_path, monkeypatch, out: str, kill_at_step: int | None = None, resume: bool = False,
               *sets: str) -> tuple[dict, list]:
    """A fine-tuning run over a pretrained model with a BatchNorm conv stem and stochastic depth:
    (the pretrained weights, [(state after each epoch, names that required grad in it)])."""
    pre = tmp_path / "pre"
    if not pre.exists():
        torch.manual_seed(2)
        cfg = ViTConfig(img_size=16, patch_size=4, num_classes=10, embed_dim=16, depth=2, num_heads=2,
                        conv_stem=(4,), drop_path_rate=0.2, drop_rate=0.1,
                        class_names=tuple(str(i) for i in range(10)))
        save_model(vitlab.VisionTransformer(cfg), pre)
    data = tmp_path / "data" if (tmp_path / "data").exists() else _folder(tmp_path / "data")
    snapshots, steps = [], [0]
    real_epoch, real_step = REAL_EPOCH, REAL_STEP

    def epoch_then_snapshot(trainer, *args, **kw):
        stats = real_epoch(trainer, *args, **kw)
        snapshots.append(({k: v.clone() for k, v in trainer.model.state_dict().items()},
                          sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)))
        return stats

    def step_or_die(*args, **kw):
        steps[0] += 1
        if steps[0] == kill_at_step:
            raise Killed
        return real_step(*args, **kw)
    monkeypatch.setattr(loop, "train_one_epoch", epoch_then_snapshot)
    monkeypatch.setattr(loop, "train_step", step_or_die)
    cfg = load_run_config(None, [f"data.name={data}", "data.val_size=6", f"model.pretrained={pre}", "optim.lr=0.01",
                                 "optim.warmup_epochs=0", "train.batch_size=6", "train.epochs=3", "train.ckpt_every=2",
                                 "optim.freeze=backbone", "runtime.progress=false", "runtime.precision=fp32",
                                 "train.test_at_end=false", *sets])
    train_mod.train(cfg, tmp_path / out, resume=resume)
    return vitlab.load_model(pre).state_dict(), snapshots


def test_a_linear_probe_trains_the_head_alone_then_unfreezes(tmp_path, monkeypatch, capsys):
    original, snaps = _probe_run(tmp_path, monkeypatch, "run", None, False, "optim.unfreeze_epoch=2")
    assert len(snaps) == 3
    body = [k for k in original if not k.startswith("head.")]
    assert "patch_embed.stem.0.norm.running_mean" in body
    heads = []
    for state, learning in snaps[:2]:  # epochs 1 and 2: the head alone learns
        assert learning == ["head.bias", "head.weight"]
        for k in body:  # weights and BatchNorm statistics untouched
            assert torch.equal(state[k], original[k]), k
        heads.append(state["head.weight"])
    assert heads[0].abs().sum() > 0 and not torch.equal(heads[0], heads[1])
    state, learning = snaps[2]  # epoch 3: everything
    assert len(learning) > 20 and "patch_embed.proj.weight" in learning
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    assert not torch.equal(state["patch_embed.stem.0.norm.running_mean"], original["patch_embed.stem.0.norm.running_mean"])
    out = capsys.readouterr().out
    assert "epoch 1: backbone frozen, only the head learns" in out
    assert "epoch 3: backbone unfrozen: every weight learns (optim.unfreeze_epoch=2)" in out


def test_a_probe_resumed_mid_run_unfreezes_exactly_as_the_uninterrupted_one(tmp_path, monkeypatch):
    _, full = _probe_run(tmp_path, monkeypatch, "full", None, False, "optim.unfreeze_epoch=2")
    # 4 steps an epoch; killed in step 7 (epoch 2, frozen), after step 6's checkpoint
    with pytest.raises(Killed):
        _probe_run(tmp_path, monkeypatch, "killed", 7, False, "optim.unfreeze_epoch=2")
    assert latest_checkpoint_step(tmp_path / "killed") == 6
    _, resumed = _probe_run(tmp_path, monkeypatch, "killed", None, True, "optim.unfreeze_epoch=2")
    assert len(full) == 3 and len(resumed) == 2  # the resumed run did epochs 2 (from step 6) and 3
    a, b = full[-1][0], resumed[-1][0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], full[1][0]["blocks.0.attn.qkv.weight"])  # it unfroze


def latest_checkpoint_step(run: Path) -> int:
    from vitlab.engine.checkpoint import latest_checkpoint
    return latest_checkpoint(run)["step"]


@pytest.mark.parametrize("sets, message", [
    (["optim.freeze=head"], "optim.freeze='head' must be one of ('none', 'backbone')"),
    (["optim.unfreeze_epoch=2"], "optim.unfreeze_epoch=2 needs optim.freeze=backbone"),
    (["optim.freeze=backbone", "optim.unfreeze_epoch=0"], "optim.unfreeze_epoch=0 must be >= 1"),
    (["optim.freeze=backbone", "optim.unfreeze_epoch=15"], "optim.unfreeze_epoch=15 is not before the end of the run "
                                                           "(train.epochs=15)"),
])
def test_freeze_settings_are_checked(sets, message):
    from vitlab.errors import ConfigError
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_run_config(None, sets + ["train.epochs=15"])
