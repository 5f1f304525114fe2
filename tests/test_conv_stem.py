"""The convolutional stem (ViTConfig.conv_stem): layout, strides, state, interop refusals, training."""
import pytest
import torch

import vitlab
from vitlab import ConfigError, ConversionError
from vitlab.engine.args import ModelArgs
from vitlab.weights.hf import to_hf
from vitlab.weights.torchvision import to_torchvision

from conftest import randomize, tiny_config


@pytest.mark.parametrize("patch, stem, strides, proj", [
    (4, (8, 16), (2, 2), 1),          # 4 = 2 * 2: the projection is a 1x1 conv
    (8, (8, 16), (2, 2), 2),          # the projection covers the last 2 px
    (7, (8, 16), (1, 1), 7),          # odd: full-resolution stem, 7-px projection
    (6, (8, 8, 8), (2, 1, 1), 3),     # halve once, then the odd rest
    (4, (), (), 4),                   # no stem: the ViT paper's patch embedding
])
def test_strides_and_token_grid(patch, stem, strides, proj):
    cfg = tiny_config(img_size=patch * 3, patch_size=patch, conv_stem=stem)
    assert cfg.stem_strides == strides and cfg.proj_size == proj
    model = vitlab.create_model(cfg).eval()
    tokens = model.patch_embed(torch.randn(2, 3, patch * 3, patch * 3))
    assert tokens.shape == (2, 9, cfg.embed_dim)  # the same 3x3 grid whatever the stem
    if stem:
        convs = [layer.conv for layer in model.patch_embed.stem]
        assert [c.stride[0] for c in convs] == list(strides) and [c.out_channels for c in convs] == list(stem)
    assert model.patch_embed.proj.kernel_size == (proj, proj) == model.patch_embed.proj.stride


@pytest.mark.parametrize("patch, stem, full_res, strides, proj", [
    (4, (8, 16, 16), 1, (1, 2, 2), 1),     # full resolution first, then the two halvings
    (4, (8, 16, 16), 2, (1, 1, 2), 2),     # one halving left: the projection covers 2 px
    (4, (8, 16), 2, (1, 1), 4),            # all at full resolution: a 4-px projection
    (4, (8, 16, 16), 0, (2, 2, 1), 1),     # 0: the default layout
])
def test_full_resolution_layers_come_first_and_keep_the_token_grid(patch, stem, full_res, strides, proj):
    cfg = tiny_config(img_size=patch * 3, patch_size=patch, conv_stem=stem, stem_full_res=full_res)
    assert cfg.stem_strides == strides and cfg.proj_size == proj
    model = vitlab.create_model(cfg).eval()
    x = torch.randn(2, 3, patch * 3, patch * 3)
    first = model.patch_embed.stem[0](x)
    assert first.shape[-1] == patch * 3 // strides[0]  # the layer really runs at that resolution
    assert [layer.conv.stride[0] for layer in model.patch_embed.stem] == list(strides)
    assert model.patch_embed(x).shape == (2, 9, cfg.embed_dim)
    assert model.patch_embed.proj.kernel_size == (proj, proj)


@pytest.mark.parametrize("stem, bad", [((8, 16), 3), ((8,), 2), ((8,), -1), ((8,), 0.5), ((8,), True), ((8,), "1"),
                                       ((), -1), ((), "1")])
def test_bad_full_resolution_counts_are_refused_with_the_value(stem, bad):
    with pytest.raises(ConfigError, match=f"stem_full_res={bad!r}"):
        tiny_config(conv_stem=stem, stem_full_res=bad)


def test_full_resolution_round_trips_through_a_saved_model(tmp_path):
    model = randomize(vitlab.create_model(tiny_config(conv_stem=(8, 16), stem_full_res=1))).eval()
    vitlab.save_model(model, tmp_path / "m")
    same = vitlab.load_model(tmp_path / "m").eval()
    assert same.config.stem_full_res == 1 and same.config.stem_strides == (1, 2)
    x = torch.randn(2, 3, *[model.config.img_size] * 2)
    torch.testing.assert_close(same(x), model(x))


@pytest.mark.parametrize("bad", [(0,), (-8,), (8.5,), (True,), "32", (8,) * 17, (10**6,)])
def test_bad_stems_are_refused_with_the_value(bad):
    with pytest.raises(ConfigError, match="conv_stem="):
        tiny_config(conv_stem=bad)


def test_run_setting_is_checked_and_becomes_the_config_field():
    with pytest.raises(ConfigError, match=r"model.conv_stem='32'"):
        ModelArgs(conv_stem="32")
    with pytest.raises(ConfigError, match="model.conv_stem"):
        ModelArgs(conv_stem=[32, "64"])
    assert ModelArgs(conv_stem=[8, 16]).overrides()["conv_stem"] == (8, 16)
    assert ModelArgs(conv_stem=[]).overrides()["conv_stem"] == ()
    assert "conv_stem" not in ModelArgs().overrides()  # null keeps the preset's


def test_batchnorm_statistics_train_and_save_as_floats(tmp_path):
    cfg = tiny_config(conv_stem=(8, 16))
    model = vitlab.create_model(cfg)
    norm = model.patch_embed.stem[0].norm
    assert torch.equal(norm.running_mean, torch.zeros(8)) and torch.equal(norm.running_var, torch.ones(8))
    x = torch.rand(16, 3, 16, 16) * 4 + 2  # far from the initial statistics
    model.train()
    model(x)
    with torch.no_grad():  # training folds the batch statistics in with momentum 0.1...
        conv = model.patch_embed.stem[0].conv(x)
    torch.testing.assert_close(norm.running_mean, 0.1 * conv.mean((0, 2, 3)))
    torch.testing.assert_close(norm.running_var, 0.9 + 0.1 * conv.var((0, 2, 3), unbiased=True))
    model.eval()
    before = norm.running_mean.clone()
    out = model(x)
    assert torch.equal(norm.running_mean, before)  # ... evaluation only reads them
    state = model.state_dict()
    assert all(v.is_floating_point() for v in state.values())  # no integer batch counter
    assert "patch_embed.stem.0.norm.running_var" in state
    same = vitlab.load_model(vitlab.save_model(model, tmp_path / "m")).eval()
    assert same.config.conv_stem == (8, 16)
    assert torch.equal(same.patch_embed.stem[0].norm.running_mean, norm.running_mean)
    with torch.no_grad():
        assert torch.equal(same(x), out)


def test_other_input_sizes_with_a_stem():
    model = randomize(vitlab.create_model(tiny_config(img_size=32, conv_stem=(8, 16))))
    model.dynamic_img_size = True
    model.eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)  # a progressive-resolution stage
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 5)


def test_interop_formats_without_a_stem_refuse_it(tmp_path):
    model = vitlab.create_model(tiny_config(conv_stem=(8,)))
    with pytest.raises(ConversionError, match="convolutional stem"):
        to_torchvision(model)
    with pytest.raises(ConversionError, match="convolutional stem"):
        to_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_stem_model_learns():
    """A few steps on a fixed batch: the stem's conv and norm weights get gradients and the loss falls."""
    torch.manual_seed(0)
    model = vitlab.create_model(tiny_config(conv_stem=(8, 16), num_classes=2))
    x = torch.randn(32, 3, 16, 16)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # (the head starts at zero, so the first step's gradient stops there; not the last one's)
    assert model.patch_embed.stem[0].conv.weight.grad.abs().sum() > 0
    assert model.patch_embed.stem[0].norm.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.5 * losses[0]


def test_a_tuple_setting_is_stored_as_the_list_config_yaml_holds():
    """config.yaml writes a list; the checkpoint's settings must compare equal to it on resume."""
    assert ModelArgs(conv_stem=(8, 16)).conv_stem == [8, 16]


def test_ema_averages_the_batchnorm_statistics_with_the_weights():
    from vitlab.engine.ema import ModelEMA
    model = vitlab.create_model(tiny_config(conv_stem=(8,)))
    ema = ModelEMA(model, decay=0.5)
    norm = model.patch_embed.stem[0].norm
    norm.running_mean.fill_(4.0)
    norm.running_var.fill_(3.0)
    d = ema.update(model)  # the warm-up decay min(0.5, 2 / 11)
    shadow = ema.module.patch_embed.stem[0].norm
    torch.testing.assert_close(shadow.running_mean, torch.full((8,), 4.0 * (1 - d)))
    torch.testing.assert_close(shadow.running_var, torch.full((8,), 1.0 * d + 3.0 * (1 - d)))


def test_a_stem_setting_over_a_pretrained_model_without_one_fails_before_the_run(tmp_path, capsys):
    from vitlab.cli import main
    vitlab.save_model(vitlab.create_model(tiny_config()), tmp_path / "pre")
    out = tmp_path / "run"
    code = main(["train", "--recipe", "cifar10", "--set", f"model.pretrained={tmp_path / 'pre'}",
                 "--set", "model.conv_stem=[8]", "--set", f"data.data_dir={tmp_path / 'nodata'}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "model.conv_stem=[8] differs from the pretrained model's conv_stem=[]" in err
    assert "--set model.conv_stem=[]" in err and not out.exists()


def test_another_full_resolution_over_a_pretrained_stem_fails_before_the_run(tmp_path, capsys):
    """Same weight shapes, other strides: the stem's filters would see another scale, so it is refused."""
    from vitlab.cli import main
    vitlab.save_model(vitlab.create_model(tiny_config(conv_stem=(8,))), tmp_path / "pre")
    out = tmp_path / "run"
    code = main(["train", "--recipe", "cifar10", "--set", f"model.pretrained={tmp_path / 'pre'}",
                 "--set", "model.conv_stem=[8]", "--set", "model.stem_full_res=1",
                 "--set", f"data.data_dir={tmp_path / 'nodata'}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "model.stem_full_res=1 would give the conv stem strides [1], not the pretrained model's [2]" in err
    assert "--set model.stem_full_res=0 keeps them" in err and "patch_size" not in err and not out.exists()


def test_a_patch_size_that_changes_the_stem_strides_over_a_pretrained_stem_is_named(tmp_path, capsys):
    """Patch 4 over a two-layer stem halves twice; patch 2 halves once: the message names patch_size,
    the setting that changed, not stem_full_res, which did not."""
    from vitlab.cli import main
    vitlab.save_model(vitlab.create_model(tiny_config(conv_stem=(8, 8))), tmp_path / "pre")
    out = tmp_path / "run"
    code = main(["train", "--recipe", "cifar10", "--set", f"model.pretrained={tmp_path / 'pre'}",
                 "--set", "model.conv_stem=[8,8]", "--set", "model.stem_full_res=0", "--set", "model.patch_size=2",
                 "--set", f"data.data_dir={tmp_path / 'nodata'}", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "model.patch_size=2 would give the conv stem strides [2, 1], not the pretrained model's [2, 2]" in err
    assert "--set model.patch_size=4 keeps them" in err and "stem_full_res" not in err and not out.exists()


def test_removing_the_stem_of_a_full_resolution_recipe_gives_the_plain_model(tmp_path):
    """`--set model.conv_stem=[]` over the cifar10 recipe (stem_full_res 1): the plain patch embedding,
    equal to a config that never had a stem, so it also fine-tunes from a plain pretrained model."""
    from vitlab.engine.args import load_run_config
    from vitlab.train import base_model_config
    plain = tiny_config(conv_stem=(), stem_full_res=1)
    assert plain.stem_full_res == 0 and plain == tiny_config(conv_stem=())
    cfg = base_model_config(load_run_config("cifar10", ["model.conv_stem=[]"]))
    assert cfg.conv_stem == () and cfg.stem_full_res == 0 and cfg.stem_strides == () and cfg.proj_size == 4
    vitlab.save_model(vitlab.create_model(tiny_config()), tmp_path / "pre")
    tuned = base_model_config(load_run_config("cifar10", ["model.conv_stem=[]", f"model.pretrained={tmp_path / 'pre'}"]))
    assert tuned.stem_full_res == 0 and tuned.conv_stem == ()


def test_the_stem_runs_on_channels_last_input_with_the_same_result():
    """The stem's convs get a channels-last input (faster oneDNN kernels on CPUs); the tokens are
    those of the same layers applied to the plain contiguous image, and gradients reach the image."""
    torch.manual_seed(0)
    model = vitlab.VisionTransformer(tiny_config(img_size=16, patch_size=4, conv_stem=(8, 8), stem_full_res=1))
    randomize(model)
    model.eval()
    layouts = []
    model.patch_embed.stem[0].conv.register_forward_pre_hook(
        lambda _, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    tokens = model.patch_embed(x)
    assert layouts == [True] and x.is_contiguous()  # the caller's tensor is not changed
    reference = x.detach().contiguous()
    for layer in model.patch_embed.stem:
        reference = layer(reference)
    reference = model.patch_embed.proj(reference).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    tokens.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() > 0
    model.set_stem_layout("contiguous")  # the other layout (engine/autotune.py times both): same tokens
    layouts.clear()
    torch.testing.assert_close(model.patch_embed(x), tokens, rtol=1e-5, atol=1e-5)
    assert layouts == [False]
    with pytest.raises(ConfigError, match="stem_layout='nchw' must be one of"):
        model.set_stem_layout("nchw")
