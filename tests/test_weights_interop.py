"""Parity with timm, torchvision and Hugging Face, both directions, on tiny random models built
locally (no network). The bar: max |logit difference| <= 1e-4 in fp32."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab import ConversionError
from vitlab.weights.convert import convert
from vitlab.weights.hf import from_hf, to_hf
from vitlab.weights.timm import infer_config, timm_kwargs
from vitlab.weights.torchvision import from_torchvision, to_torchvision

from conftest import LAYOUTS, randomize, tiny_config

timm_vit = pytest.importorskip("timm.models.vision_transformer")
TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- timm -----------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_timm_both_directions(layout, rng_input, tmp_path):
    cfg = tiny_config(**LAYOUTS[layout])
    ours = randomize(vitlab.create_model(cfg)).eval()
    theirs = timm_vit.VisionTransformer(**timm_kwargs(cfg)).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # vitlab -> timm: no mapping at all
    x = rng_input(cfg)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) <= TOL
    # timm -> vitlab, config inferred from the shapes (heads given: 32 wide is not 64-per-head)
    randomize(theirs, seed=1)
    back = vitlab.VisionTransformer(infer_config(theirs.state_dict(), num_heads=cfg.num_heads,
                                                 init_values=cfg.init_values)).eval()
    back.load_state_dict(theirs.state_dict(), strict=True)
    assert back.config.replace(name=None) == cfg.replace(name=None)
    with torch.no_grad():
        assert max_diff(back(x), theirs(x)) <= TOL
    # and through files + the converter, as a user would
    save_file(theirs.state_dict(), tmp_path / "timm.safetensors")
    converted = convert(tmp_path / "timm.safetensors", "timm", tmp_path / "out", num_heads=cfg.num_heads).eval()
    with torch.no_grad():
        assert max_diff(vitlab.load_model(tmp_path / "out")(x), theirs(x)) <= TOL
        assert max_diff(converted(x), theirs(x)) <= TOL


def test_timm_preset_models_load_strictly():
    """A real-size timm ViT-S/16 (random weights) loads into the preset with strict=True."""
    theirs = timm_vit.vit_small_patch16_224(pretrained=False, num_classes=10)
    ours = vitlab.create_model("vit_small_patch16_224", num_classes=10)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert infer_config(theirs.state_dict()).replace(name=None) == ours.config.replace(name=None)


def test_sincos_models_do_not_pretend_to_be_timm():
    with pytest.raises(ConversionError, match="sin-cos"):
        timm_kwargs(tiny_config(pos_embed="sincos"))


def test_conv_stem_models_do_not_pretend_to_be_timm():
    with pytest.raises(ConversionError, match=r"no convolutional stem \(conv_stem=\[8, 16\]\)"):
        timm_kwargs(tiny_config(conv_stem=(8, 16)))


# ---- torchvision ----------------------------------------------------------------------------
def test_torchvision_both_directions(rng_input, tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer as TvViT
    cfg = tiny_config()
    ours = randomize(vitlab.create_model(cfg)).eval()
    kwargs, state = to_torchvision(ours)
    theirs = TvViT(**kwargs).eval()
    theirs.load_state_dict(state, strict=True)
    x = rng_input(cfg)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x)) <= TOL
    randomize(theirs, seed=3)
    back_cfg, back_state = from_torchvision(theirs.state_dict(), num_heads=2)
    back = vitlab.VisionTransformer(back_cfg).eval()
    back.load_state_dict(back_state, strict=True)
    with torch.no_grad():
        assert max_diff(back(x), theirs(x)) <= TOL
    torch.save(theirs.state_dict(), tmp_path / "tv.pth")
    converted = convert(tmp_path / "tv.pth", "torchvision", tmp_path / "out", num_heads=2).eval()
    with torch.no_grad():
        assert max_diff(converted(x), theirs(x)) <= TOL


def test_torchvision_vit_b_16_layout_and_preset():
    from torchvision.models import vit_b_16
    with torch.device("meta"):
        state = vit_b_16().state_dict()
    cfg, ours = from_torchvision(state, base=vitlab.get_config("vit_base_patch16_224"))
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size, cfg.num_classes) == (768, 12, 12, 224, 1000)
    with torch.device("meta"):
        model = vitlab.VisionTransformer(cfg)
    assert set(ours) == set(model.state_dict())
    assert all(ours[k].shape == v.shape for k, v in model.state_dict().items())


def test_torchvision_rejects_what_it_cannot_express():
    with pytest.raises(ConversionError, match="class token.*LayerScale"):
        to_torchvision(vitlab.create_model(tiny_config(pool="avg", init_values=0.1)))
    with pytest.raises(ConversionError, match="pre-logits"):
        from_torchvision({"heads.pre_logits.weight": torch.zeros(1)})


# ---- Hugging Face ---------------------------------------------------------------------------
def _hf_model(cfg, seed=0, **extra):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.ViTConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_hidden_dim, image_size=cfg.img_size, patch_size=cfg.patch_size,
        num_channels=cfg.in_chans, num_labels=cfg.num_classes, **extra)
    return randomize(transformers.ViTForImageClassification(hf_cfg), seed=seed).eval()


@pytest.mark.parametrize("extra", [{}, dict(qkv_bias=False, layer_norm_eps=1e-12)])
def test_hf_to_vitlab(extra, rng_input, tmp_path):
    cfg = tiny_config()
    theirs = _hf_model(cfg, **extra)
    theirs.config.id2label = {i: f"class{i}" for i in range(5)}
    theirs.save_pretrained(tmp_path / "hf")
    converted = convert(tmp_path / "hf", "hf", tmp_path / "out").eval()
    assert converted.config.class_names == tuple(f"class{i}" for i in range(5))
    assert converted.config.norm_eps == theirs.config.layer_norm_eps
    x = rng_input(cfg)
    with torch.no_grad():
        assert max_diff(converted(x), theirs(x).logits) <= TOL


def test_vitlab_to_hf(rng_input, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(norm_eps=1e-12, class_names=tuple("abcde"), mean=(0.4, 0.5, 0.6))
    ours = randomize(vitlab.create_model(cfg)).eval()
    to_hf(ours, tmp_path / "hf")
    theirs = transformers.ViTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.id2label[2] == "c"
    x = rng_input(cfg)
    with torch.no_grad():
        assert max_diff(ours(x), theirs(x).logits) <= TOL
    proc = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert proc["image_mean"] == [0.4, 0.5, 0.6]
    cfg2, _ = from_hf(tmp_path / "hf")  # and back, mean/std included
    assert cfg2.replace(name=None) == cfg.replace(name=None)


def test_hf_errors(tmp_path):
    from vitlab import ModelFileError
    with pytest.raises(ModelFileError, match="config.json is missing"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match="model_type='bert'"):
        from_hf(tmp_path)


# ---- command line -----------------------------------------------------------------------------
def test_cli_convert_and_errors(tmp_path):
    theirs = timm_vit.VisionTransformer(**timm_kwargs(tiny_config(embed_dim=64, num_heads=1)))
    torch.save(theirs.state_dict(), tmp_path / "ckpt.pth")
    run = [sys.executable, "-m", "vitlab", "convert"]
    ok = subprocess.run(run + [str(tmp_path / "ckpt.pth"), "--from", "timm", "--out", str(tmp_path / "m")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2x64 (1 heads)" in ok.stdout
    assert vitlab.load_model(tmp_path / "m").config.num_heads == 1  # 64 wide -> 64-wide heads
    bad = subprocess.run(run + [str(tmp_path / "missing.pth"), "--from", "timm", "--out", str(tmp_path / "x")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "missing.pth does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "x").exists()  # nothing written on failure


def test_paper_sizes_get_their_head_count():
    """ViT-H has 16 heads of 80; width/64 would say 20 and give wrong outputs silently."""
    with torch.device("meta"):
        huge = timm_vit.VisionTransformer(**timm_kwargs(vitlab.get_config("vit_huge_patch14_224", depth=32)))
    assert infer_config(huge.state_dict()).num_heads == 16
    from torchvision.models import vit_b_16
    with torch.device("meta"):
        cfg, _ = from_torchvision(vit_b_16().state_dict())
    assert cfg.num_heads == 12 and cfg.mean == (0.485, 0.456, 0.406)  # torchvision's ImageNet statistics
