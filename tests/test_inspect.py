"""vitlab.inspect: the ViT paper's Figure 7 views. The numbers are checked against hand
computations and planted structure; the pictures are checked to be real PNGs of a random model."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab import VisionTransformer
from vitlab.errors import DataError, InputShapeError
from vitlab.inspect import (attention_distance, inspect_images, mean_attention_distance, patch_distances,
                            patch_embed_components, pos_embed_similarity, principal_components, write_inspect)

from conftest import tiny_config


def test_principal_components_are_orthonormal_ordered_and_find_planted_directions():
    rng = np.random.default_rng(0)
    u, v = np.linalg.qr(rng.normal(size=(48, 2)))[0].T  # two orthonormal directions in 48-d
    n = 200
    rows = (3.0 * rng.normal(size=(n, 1)) * u + 1.0 * rng.normal(size=(n, 1)) * v
            + 0.05 * rng.normal(size=(n, 48)) + 7.0)  # an offset, which centring must remove
    comps, ratio = principal_components(rows, 28)
    assert comps.shape == (28, 48) and ratio.shape == (28,)
    np.testing.assert_allclose(comps @ comps.T, np.eye(28), atol=1e-10)
    assert np.all(np.diff(ratio) <= 1e-12) and 0 < ratio.sum() <= 1 + 1e-12
    assert abs(comps[0] @ u) > 0.99 and abs(comps[1] @ v) > 0.99
    centred = rows - rows.mean(0)
    var = ((centred @ comps.T) ** 2).sum(0)  # variance along each component
    np.testing.assert_allclose(var / (centred**2).sum(), ratio, rtol=1e-8)
    assert ratio[0] > 0.85  # 9 : 1 : noise


def test_patch_embed_components_of_a_model():
    model = VisionTransformer(tiny_config())  # proj.weight (32, 3, 4, 4): 48-d filters
    fc = patch_embed_components(model)
    assert fc.source == "patch_embed.proj.weight" and fc.components.shape == (28, 3, 4, 4)
    flat = fc.components.reshape(28, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(28), atol=1e-8)
    w = model.patch_embed.proj.weight.detach().numpy().reshape(32, -1)
    ref, _ = principal_components(w, 28)
    np.testing.assert_allclose(flat, ref, atol=1e-10)


def test_conv_stem_model_shows_the_first_stem_conv_and_says_so(tmp_path):
    model = VisionTransformer(tiny_config(conv_stem=(8,)))  # proj reads 8 stem channels, not pixels
    fc = patch_embed_components(model)
    assert fc.source == "patch_embed.stem.0.conv.weight" and "stem" in fc.note
    assert fc.components.shape == (7, 3, 3, 3)  # 8 filters, centred: at most 7 directions
    images, _ = inspect_images(model, n=4)
    paths = write_inspect(model, images, tmp_path)
    assert "stem" in json.loads(paths["json"].read_text())["patch_embed"]["note"]


def test_sincos_position_similarity_is_one_on_the_diagonal_and_falls_with_distance():
    model = VisionTransformer(tiny_config(pos_embed="sincos"))  # class token: one prefix row to drop
    sim = pos_embed_similarity(model)
    g = 4
    assert sim.shape == (g * g, g, g)
    flat = sim.reshape(g * g, g * g)
    np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-6)
    np.testing.assert_allclose(flat, flat.T, atol=1e-6)
    for q in range(g * g):
        r, c = divmod(q, g)
        for line, own in ((sim[q][r, :], c), (sim[q][:, c], r)):  # along the query's row and column
            for step in (1, -1):
                walk = [line[own + k * step] for k in range(g) if 0 <= own + k * step < g]
                assert all(a > b for a, b in zip(walk, walk[1:])), (q, walk)


def test_learned_position_similarity_is_the_cosine_of_the_parameter_rows():
    model = VisionTransformer(tiny_config())
    e = model.pos_embed.detach()[0, 1:]
    ref = torch.nn.functional.cosine_similarity(e[:, None], e[None], dim=-1)
    np.testing.assert_allclose(pos_embed_similarity(model).reshape(16, 16), ref.numpy(), atol=1e-5)
    avg = VisionTransformer(tiny_config(class_token=False, pool="avg"))  # no prefix row
    e = avg.pos_embed.detach()[0]
    ref = torch.nn.functional.cosine_similarity(e[:, None], e[None], dim=-1)
    np.testing.assert_allclose(pos_embed_similarity(avg).reshape(16, 16), ref.numpy(), atol=1e-5)


def test_attention_distance_of_hand_made_maps():
    # 2x2 grid of 4-px patches; tokens: [cls, p0, p1, p2, p3]; p0-p1 and p2-p3 are 4 px apart
    N = 5
    a = torch.zeros(1, 3, N, N)
    for q in range(1, N):
        pair = q + 1 if q % 2 == 1 else q - 1  # horizontal neighbour
        a[0, 0, q, q], a[0, 0, q, pair] = 0.5, 0.5  # head 0: half self, half neighbour -> 2 px
        a[0, 1, q, 1:] = 0.25  # head 1: uniform over patches -> (0 + 4 + 4 + 4*sqrt2) / 4
        a[0, 2, q, 0], a[0, 2, q, q], a[0, 2, q, pair] = 0.5, 0.25, 0.25  # class token dropped, renormalised
    a[0, :, 0, 0] = 1.0  # the class token's row is not a patch query
    d = attention_distance([a, a], (2, 2), 4, num_prefix_tokens=1)
    assert d.shape == (2, 3)
    np.testing.assert_allclose(d[0], [2.0, 2 + math.sqrt(2), 2.0], atol=1e-12)
    np.testing.assert_allclose(patch_distances((2, 2), 4).mean(), 2 + math.sqrt(2))
    with pytest.raises(InputShapeError, match=r"\(B, heads, 5, 5\)"):
        attention_distance([a[:, :, 1:, 1:]], (2, 2), 4, num_prefix_tokens=1)


def test_uniform_and_forced_local_attention_in_a_model(rng_input):
    cfg = tiny_config()
    images = rng_input(cfg, batch=6)
    model = VisionTransformer(cfg).eval()
    D = cfg.embed_dim
    uniform = patch_distances((4, 4), 4).mean()
    with torch.no_grad():
        for block in model.blocks:  # q = k = 0: every query attends uniformly
            block.attn.qkv.weight[:2 * D] = 0
            block.attn.qkv.bias[:2 * D] = 0
    d_uniform = mean_attention_distance(model, images, batch_size=4)  # two batches, unequal sizes
    assert d_uniform.shape == (cfg.depth, cfg.num_heads)
    np.testing.assert_allclose(d_uniform, uniform, rtol=1e-6)

    # force each layer's attention to a local kernel over the patch grid (class token row/column kept apart)
    dist = torch.from_numpy(patch_distances((4, 4), 4)).float()
    local = torch.zeros(17, 17)
    local[0, 0] = 1
    local[1:, 1:] = torch.softmax(-dist**2 / 8, dim=-1)
    handles = [b.attn.probe.register_forward_hook(lambda m, i, out: local.expand_as(out).clone())
               for b in model.blocks]
    try:
        d_local = mean_attention_distance(model, images)
    finally:
        for h in handles:
            h.remove()
    expected = (local[1:, 1:] * dist).sum(-1).mean().item()
    np.testing.assert_allclose(d_local, expected, rtol=1e-5)
    assert d_local.max() < 0.5 * uniform


def test_random_init_model_writes_every_view(tmp_path):
    model = vitlab.create_model(tiny_config(depth=3, num_heads=4))
    images, note = inspect_images(model, n=8)
    assert "noise" in note and images.shape == (8, 3, 16, 16)
    paths = write_inspect(model, images, tmp_path / "out", note=note)
    assert set(paths) == {"filters", "pos_embed", "attention_distance", "json"}
    for key in ("filters", "pos_embed", "attention_distance"):
        with Image.open(paths[key]) as im:
            assert im.format == "PNG" and im.size[0] > 200
            assert np.asarray(im.convert("L")).std() > 1  # not blank
    doc = json.loads(paths["json"].read_text())
    dist = np.array(doc["attention_distance"]["per_layer_per_head"])
    assert dist.shape == (3, 4)
    # a random-init model attends almost uniformly: every head near the uniform distance
    np.testing.assert_allclose(dist, doc["attention_distance"]["uniform_attention"], rtol=0.05)
    assert len(doc["patch_embed"]["variance_ratio"]) == 28 and doc["images_from"] == note
    assert doc["pos_embed"]["mean_similarity_by_grid_distance"]["0.000"] == pytest.approx(1.0)


def test_images_from_files_from_the_dataset_or_noise(tmp_path):
    cfg = tiny_config()
    model = VisionTransformer(cfg)
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    x, note = inspect_images(model, paths=[folder])
    assert x.shape == (3, 3, 16, 16) and "3 image(s)" in note
    assert abs(x.mean().item()) < 1.5 and x.std().item() > 0.3  # normalised with the model's mean/std
    with pytest.raises(DataError, match="missing.png"):
        inspect_images(model, paths=[tmp_path / "missing.png"])

    # the dataset a model directory records: an image folder with classes a, b
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / c / f"{i}.png")
    model2 = VisionTransformer(tiny_config(num_classes=2, class_names=("a", "b")))
    vitlab.save_model(model2, tmp_path / "m", extra={"dataset": {"name": str(data), "data_dir": None}})
    x, note = inspect_images(model2, model_dir=tmp_path / "m", n=64)
    assert x.shape == (4, 3, 16, 16) and "test split" in note  # 10% of 40 images
    vitlab.save_model(model2, tmp_path / "m2", extra={"dataset": {"name": str(tmp_path / "gone")}})
    x, note = inspect_images(model2, model_dir=tmp_path / "m2", n=5)
    assert x.shape == (5, 3, 16, 16) and "noise" in note and "gone" in note


def test_bad_images_are_refused_with_their_shape():
    model = VisionTransformer(tiny_config())
    with pytest.raises(InputShapeError, match=r"\(2, 3, 20, 20\)"):
        mean_attention_distance(model, torch.zeros(2, 3, 20, 20))
    with pytest.raises(InputShapeError, match="non-empty"):
        mean_attention_distance(model, torch.zeros(3, 16, 16))


def test_inspect_command_and_its_output_folder(tmp_path, capsys):
    from vitlab.cli import main
    model_dir = tmp_path / "model"
    vitlab.save_model(vitlab.create_model(tiny_config()), model_dir)
    out = tmp_path / "views"
    assert main(["inspect", str(model_dir), "--out", str(out), "--num-images", "4"]) == 0
    printed = capsys.readouterr().out
    assert "noise" in printed and "inspect.json" in printed
    assert sorted(p.name for p in out.iterdir()) == ["attention_distance.png", "inspect.json",
                                                     "patch_embed_pca.png", "pos_embed_similarity.png"]
    assert main(["inspect", str(model_dir), "--out", str(out), "--num-images", "4"]) == 0  # its own files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "patch_embed_pca.png").write_bytes(b"my picture")
    assert main(["inspect", str(model_dir), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "never replaces other files" in err and "Traceback" not in err
    assert (mine / "patch_embed_pca.png").read_bytes() == b"my picture"
    assert main(["inspect", str(model_dir), "--out", str(out), "--num-images", "0"]) == 2
