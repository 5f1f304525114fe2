"""Attention maps (vitlab.attention, `vitlab attention`): the methods match their definitions, and a
pointing game on a synthetic task shows that the maps find what decides the label."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab import VisionTransformer, ViTConfig, save_model
from vitlab.attention import (attention_rollout, capture_attention, discard_weakest, explain, overlay,
                              pointing_game)
from vitlab.cli import main
from vitlab.errors import ConfigError, InputShapeError

from conftest import randomize, tiny_config

COLOURS = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
NAMES = ("red", "green", "blue", "yellow")
IMG, P = 16, 4
G = IMG // P  # 4 x 4 patch grid: chance in the pointing game is 1/16


def squares(n: int, seed: int, count: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images in [0, 1], labels (n, count), patch index (n, count)): grey noise with `count` solid
    squares of distinct colours, each exactly covering one random patch. The first square's
    colour is the label; nothing else in the image tells the classes apart."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, IMG, IMG, generator=gen).expand(n, 3, IMG, IMG)
    labels = torch.rand(n, len(COLOURS), generator=gen).argsort(1)[:, :count]  # distinct colours
    where = torch.rand(n, G * G, generator=gen).argsort(1)[:, :count]  # distinct patches
    for k in range(count):
        mask = torch.zeros(n, G * G, dtype=torch.bool)
        mask[torch.arange(n), where[:, k]] = True  # (n, G*G) -> (n, 1, IMG, IMG): one patch of pixels
        mask = mask.reshape(n, 1, G, G).repeat_interleave(P, 2).repeat_interleave(P, 3)
        x = torch.where(mask, COLOURS[labels[:, k]][:, :, None, None], x)
    return x, labels, where


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - 0.5) / 0.5  # the model's mean/std


@pytest.fixture(scope="module", params=["token", "avg"])
def trained(request):
    """A tiny ViT trained for a few seconds to name the square's colour (100% held-out accuracy)."""
    layout = dict(class_token=True, pool="token") if request.param == "token" else dict(class_token=False, pool="avg")
    torch.manual_seed(0)
    cfg = ViTConfig(img_size=IMG, patch_size=P, num_classes=4, embed_dim=32, depth=2, num_heads=2,
                    class_names=NAMES, **layout)
    model = VisionTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for step in range(300):
        x, y, _ = squares(64, seed=1000 + step)
        loss = torch.nn.functional.cross_entropy(model(normalise(x)), y[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, _ = squares(200, seed=1)
    with torch.no_grad():
        assert (model(normalise(x)).argmax(-1) == y[:, 0]).float().mean() > 0.97
    return model


def test_pointing_game_finds_the_deciding_patch(trained):
    x, _, where = squares(256, seed=7)
    x = normalise(x)
    scores = {m: pointing_game(explain(trained, x, m)[0], where[:, 0]) for m in ("gradient", "rollout", "raw")}
    assert scores["gradient"] >= 0.9, scores
    assert scores["rollout"] >= 0.5, scores  # 8x chance (1/16)
    # The same scoring gives maps that carry no information nothing:
    assert pointing_game(torch.ones(256, G, G), where[:, 0]) == 0.0
    assert pointing_game(torch.rand(256, G, G, generator=torch.Generator().manual_seed(0)), where[:, 0]) < 0.15
    # ... and a map of the wrong image (shuffled) stays near chance.
    maps = explain(trained, x, "gradient")[0]
    assert pointing_game(maps.roll(1, dims=0), where[:, 0]) < 0.2


def test_class_specific_maps_follow_the_class_asked(trained):
    """Two squares of different colours (the model only ever saw one): gradient maps for each
    colour's class point at that square; rollout gives one map whatever the class, so its hits on
    the two squares add up to at most 1."""
    x, labels, where = squares(256, seed=11, count=2)
    x = normalise(x)
    hits = []
    for k in (0, 1):  # measured: 0.76 for each square (class token), 1.0 (average pooling)
        maps, _ = explain(trained, x, "gradient", target=labels[:, k])
        hits.append(pointing_game(maps, where[:, k]))
    assert min(hits) >= 0.6 and sum(hits) >= 1.3, hits  # a class-blind map scores <= 1 in total
    roll_a, _ = explain(trained, x, "rollout", target=labels[:, 0])
    roll_b, _ = explain(trained, x, "rollout", target=labels[:, 1])
    torch.testing.assert_close(roll_a, roll_b)
    assert pointing_game(roll_a, where[:, 0]) + pointing_game(roll_a, where[:, 1]) <= 1.0


@pytest.mark.parametrize("layout", [{}, dict(class_token=False, pool="avg"), dict(pool="avg")])
def test_rollout_and_raw_match_their_definitions(layout):
    cfg = tiny_config(depth=3, **layout)
    model = randomize(VisionTransformer(cfg)).eval()
    x = torch.randn(3, *cfg.input_size, generator=torch.Generator().manual_seed(0))
    with capture_attention(model) as maps, torch.no_grad():
        model(x)
    p = model.num_prefix_tokens
    # Abnar & Zuidema, written out: A_l = rownorm(0.5 * mean_heads(attn_l) + 0.5 * I); R = A_L ... A_1
    eye = torch.eye(cfg.seq_len)
    R = eye
    for attn in maps:
        a = 0.5 * attn.mean(1) + 0.5 * eye
        R = (a / a.sum(-1, keepdim=True)) @ R
    want = R[:, 0, p:] if cfg.pool == "token" else R[:, p:, p:].mean(1)
    torch.testing.assert_close(explain(model, x, "rollout", normalize=False)[0].flatten(1), want)
    for fusion, ratio in (("mean", 0.0), ("max", 0.5), ("min", 0.9)):
        got, _ = explain(model, x, "rollout", head_fusion=fusion, discard_ratio=ratio, normalize=False)
        roll = attention_rollout(maps, head_fusion=fusion, discard_ratio=ratio, keep_columns=p)
        want = roll[:, 0, p:] if cfg.pool == "token" else roll[:, p:, p:].mean(1)
        torch.testing.assert_close(got.flatten(1), want)
    for layer, head in ((0, None), (-1, 1), (1, 0)):
        a = maps[layer].mean(1) if head is None else maps[layer][:, head]
        want = a[:, 0, p:] if cfg.pool == "token" else a[:, p:, p:].mean(1)
        got, _ = explain(model, x, "raw", layer=layer, head=head, normalize=False)
        torch.testing.assert_close(got.flatten(1), want)
    scaled, _ = explain(model, x, "rollout")
    assert scaled.shape == (3, cfg.grid_size, cfg.grid_size)
    torch.testing.assert_close(scaled.flatten(1).amax(1), torch.ones(3))
    torch.testing.assert_close(scaled.flatten(1).amin(1), torch.zeros(3))


def test_only_the_needed_layers_are_captured():
    cfg = tiny_config(depth=4)
    model = randomize(VisionTransformer(cfg)).eval()
    x = torch.randn(2, *cfg.input_size)
    with capture_attention(model, [1, -1]) as maps, torch.no_grad():
        model(x)
    with capture_attention(model) as every, torch.no_grad():
        model(x)
    assert len(maps) == 2 and len(every) == 4
    torch.testing.assert_close(maps[0], every[1])
    torch.testing.assert_close(maps[1], every[3])
    with pytest.raises(ConfigError, match=r"layer\(s\) \[4\] out of range: the model has 4 layers"):
        with capture_attention(model, [4]):
            pass
    hooks = []
    real = torch.nn.Module.register_forward_hook

    def counting(self, hook, *a, **kw):
        hooks.append(self)
        return real(self, hook, *a, **kw)

    torch.nn.Module.register_forward_hook = counting
    try:
        explain(model, x, "raw", layer=2)
    finally:
        torch.nn.Module.register_forward_hook = real
    assert hooks == [model.blocks[2].attn.probe]
    assert all(not b.attn.probe._forward_hooks for b in model.blocks)  # removed afterwards


@pytest.mark.parametrize("layout", [{}, dict(class_token=False, pool="avg")])
def test_gradient_method_is_the_chefer_recursion(layout):
    """R = I; R += mean_heads((dy_c/dA * A)^+) @ R per layer; read the row(s) the head reads."""
    cfg = tiny_config(depth=3, **layout)
    model = randomize(VisionTransformer(cfg)).eval()
    x = torch.randn(2, *cfg.input_size, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3, 1])
    with capture_attention(model, keep_graph=True) as maps:
        logits = model(x.requires_grad_(True))
        grads = torch.autograd.grad(logits[0, 3] + logits[1, 1], maps)
    N, p = cfg.seq_len, model.num_prefix_tokens
    R = torch.eye(N).repeat(2, 1, 1)
    for a, g in zip(maps, grads):
        R = R + (g * a).clamp(min=0).mean(1) @ R
    want = R[:, 0, p:] if cfg.pool == "token" else R[:, p:, p:].mean(1)
    got, out = explain(model, x.detach(), "gradient", target=target, normalize=False)
    torch.testing.assert_close(got.flatten(1), want.detach())
    torch.testing.assert_close(out, logits.detach())
    assert all(q.grad is None for q in model.parameters())  # no gradients left on the weights
    top, _ = explain(model, x.detach(), "gradient", normalize=False)  # default: each image's top-1 class
    best, _ = explain(model, x.detach(), "gradient", target=logits.argmax(-1), normalize=False)
    torch.testing.assert_close(top, best)
    assert not torch.allclose(got, explain(model, x.detach(), "gradient", target=0, normalize=False)[0])


def test_explain_rejects_bad_settings():
    cfg = tiny_config()
    model = VisionTransformer(cfg)
    x = torch.randn(1, *cfg.input_size)
    with pytest.raises(ConfigError, match="method 'grad' must be one of"):
        explain(model, x, "grad")
    with pytest.raises(ConfigError, match="head 2 out of range: the model has 2 heads"):
        explain(model, x, "raw", head=2)
    with pytest.raises(ConfigError, match=r"layer\(s\) \[-3\] out of range"):
        explain(model, x, "raw", layer=-3)
    with pytest.raises(ConfigError, match="discard ratio 1.0 must be in"):
        explain(model, x, "rollout", discard_ratio=1.0)
    with pytest.raises(ConfigError, match="head fusion 'median'"):
        explain(model, x, "rollout", head_fusion="median")
    with pytest.raises(ConfigError, match="class 5 out of range: the model has 5 classes"):
        explain(model, x, "gradient", target=5)
    with pytest.raises(ConfigError, match="2 target classes for 1 images"):
        explain(model, x, "gradient", target=[0, 1])
    with pytest.raises(InputShapeError, match="expects"):
        explain(model, torch.randn(1, 3, 20, 20), "rollout")
    with pytest.raises(ConfigError, match="needs a classifier head"):
        explain(VisionTransformer(tiny_config(num_classes=0)), x, "gradient")


def test_discard_keeps_the_class_column_and_drops_the_weakest():
    a = torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(0))
    d = discard_weakest(a, 0.5, keep_columns=1)
    torch.testing.assert_close(d[:, :, 0], a[:, :, 0])
    body, kept = a[:, :, 1:].flatten(1), d[:, :, 1:].flatten(1)
    assert ((kept == 0).sum(1) == 10).all()  # half of the 20 non-class weights per map
    for b in range(2):  # and exactly the smallest ones
        assert body[b][kept[b] == 0].max() <= body[b][kept[b] > 0].min()
    assert discard_weakest(a, 0.0) is a


def test_overlay_blends_the_upsampled_map():
    from vitlab.attention import heatmap_rgb
    grey = np.full((1, 8, 8), 100, np.uint8)
    heat = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    assert overlay(grey, heat, alpha=0.0).tolist() == np.full((8, 8, 3), 100).tolist()
    full = overlay(grey, heat, alpha=1.0)
    assert full.shape == (8, 8, 3)
    assert (full[0, 0] == heatmap_rgb(np.zeros((1, 1)))[0, 0]).all()  # corners: the map's own values
    assert (full[0, -1] == heatmap_rgb(np.ones((1, 1)))[0, 0]).all()
    with pytest.raises(InputShapeError, match=r"image has shape \(8, 8\)"):
        overlay(grey[0], heat)
    with pytest.raises(InputShapeError, match="map has shape"):
        overlay(grey, heat[0])


def _write_pngs(folder, x):
    folder.mkdir()
    for i, img in enumerate((x * 255).round().byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(folder / f"img{i}.png")


def test_attention_command(trained, tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_model(trained, model_dir)
    x, labels, where = squares(6, seed=3, count=2)
    _write_pngs(tmp_path / "images", x)
    (tmp_path / "images" / "notes.png").write_text("not an image")
    out = tmp_path / "maps"
    # class-specific maps of the second square's colour, by name, as .npy over the patch grid
    for k in (0, 1):
        target = NAMES[labels[0, k]]
        rc = main(["attention", str(model_dir), str(tmp_path / "images" / "img0.png"), "--out", str(out / str(k)),
                   "--method", "gradient", "--class", target, "--format", "npy"])
        assert rc == 0
        heat = np.load(out / str(k) / "img0.gradient.npy")
        assert heat.shape == (G, G) and heat.argmax() == where[0, k]
        meta = json.loads((out / str(k) / "attention.json").read_text())
        assert meta["method"] == "gradient" and meta["images"][0]["explained"] == labels[0, k].item()
    capsys.readouterr()
    rc = main(["attention", str(model_dir), str(tmp_path / "images"), str(tmp_path / "images" / "img0.png"),
               "--out", str(out / "png")])  # img0 named twice: explained once
    assert rc == 3  # notes.png skipped: the others explained, and scripts can tell
    err = capsys.readouterr().err
    assert "skipped" in err and "notes.png" in err
    pngs = sorted(p.name for p in (out / "png").glob("*.png"))
    assert pngs == [f"img{i}.rollout.png" for i in range(6)]
    with Image.open(out / "png" / "img0.rollout.png") as im:
        assert im.size[0] > 300 and len(set(np.asarray(im.convert("L")).flatten().tolist())) > 10
    meta = json.loads((out / "png" / "attention.json").read_text())
    assert len(meta["images"]) == 6
    for m in meta["images"]:  # the prediction is the colour of one of the image's two squares
        i = int(m["file"].split("img")[-1].split(".")[0])
        assert m["label"] in {NAMES[c] for c in labels[i]} and m["out"] == f"img{i}.rollout.png"
    before = (out / "png" / "img0.rollout.png").read_bytes()
    rc = main(["attention", str(model_dir), str(tmp_path / "images"), "--out", str(out / "png")])
    assert rc == 2
    assert "already exist" in capsys.readouterr().err
    assert (out / "png" / "img0.rollout.png").read_bytes() == before  # nothing replaced
    for bad, message in ((["--class", "purple", "--method", "gradient"], "neither a class name nor an index"),
                         (["--class", "red"], "--class explains one class with --method gradient"),
                         (["--method", "raw", "--layer", "7"], "out of range: the model has 2 layers"),
                         (["--alpha", "2"], "--alpha 2.0 must be in [0, 1]")):
        rc = main(["attention", str(model_dir), str(tmp_path / "images" / "img1.png"), "--out",
                   str(out / "bad"), *bad])
        assert rc == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (out / "bad").exists()  # bad settings write nothing


def test_class_index_takes_a_name_or_an_index():
    from vitlab.attention import class_index
    from vitlab.config import ViTConfig
    from vitlab.errors import ConfigError
    cfg = ViTConfig(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3,
                    class_names=("cat", "2", "bird"))
    assert [class_index(cfg, c) for c in ("cat", "bird", "2", "0")] == [0, 2, 1, 0]  # a name first, then an index
    for bad in ("3", "-1", "dog", ""):
        with pytest.raises(ConfigError, match="neither a class name nor an index in \\[0, 3\\)"):
            class_index(cfg, bad)


def test_output_names_are_safe_unique_and_never_replace(tmp_path):
    from vitlab.attention import output_paths
    from vitlab.errors import ConfigError
    files = [Path("a/cat.png"), Path("b/cat.png"), Path("c/cat.jpg"), Path("d/../ev il;rm.png"), Path("e/.png")]
    out = tmp_path / "maps"
    targets = output_paths(files, out, "rollout", "png")
    assert [t.name for t in targets.values()] == ["cat.rollout.png", "cat-2.rollout.png", "cat-3.rollout.png",
                                                  "ev_il_rm.rollout.png", "_png.rollout.png"]
    assert all(t.parent == out for t in targets.values())
    out.mkdir()
    (out / "attention.json").symlink_to(tmp_path / "nowhere")  # a dangling link is a file in the way too
    with pytest.raises(ConfigError, match=r"1 output file\(s\) already exist.*attention.json"):
        output_paths(files, out, "rollout", "png")
    (out / "attention.json").unlink()
    (out / "cat-2.rollout.png").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="cat-2.rollout.png"):
        output_paths(files, out, "rollout", "png")
    assert output_paths(files, out, "raw", "png")  # another method's names are free


def test_pictures_without_matplotlib_are_one_clear_error(monkeypatch):
    import sys

    from vitlab.attention import heatmap_rgb
    from vitlab.errors import VitlabError
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the viz extra were not installed
    with pytest.raises(VitlabError, match=r"pip install 'vitlab\[viz\]' \(or use --format npy\)"):
        heatmap_rgb(np.zeros((2, 2)))
