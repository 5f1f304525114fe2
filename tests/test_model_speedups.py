"""Training speedups on the model side (issue 9): patch dropout, stochastic depth that skips the
dropped samples' computation, and inputs at other sizes than the config's (progressive resizing)."""
import pytest
import torch

from vitlab import InputShapeError, VisionTransformer
from vitlab.attention import capture_attention
from vitlab.layers import PatchDropout, drop_add_residual
from vitlab.model import Block
from vitlab.pos_embed import sincos_pos_embed

from conftest import randomize, tiny_config


def _block_input_rows(model, x):
    """Tokens per image that the first block sees, from a forward hook."""
    seen = []
    handle = model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    model(x)
    handle.remove()
    return seen[0]


# ---- patch dropout -----------------------------------------------------------------------------
@pytest.mark.parametrize("rate, keep", [(0.5, 8), (0.3, 11), (0.75, 4), (0.99, 1), (0.01, 16)])
@pytest.mark.parametrize("cls", [True, False])
def test_patch_dropout_keeps_the_stated_token_count(rate, keep, cls):
    cfg = tiny_config(patch_drop_rate=rate, class_token=cls, pool="token" if cls else "avg")  # 16 patches
    model = VisionTransformer(cfg).train()
    assert keep == max(1, round(16 * (1 - rate)))
    assert _block_input_rows(model, torch.randn(3, 3, 16, 16)) == (3, int(cls) + keep, 32)
    assert _block_input_rows(model.eval(), torch.randn(3, 3, 16, 16)) == (3, int(cls) + 16, 32)


def test_patch_dropout_keeps_the_class_token_and_a_per_image_subset():
    B, n, D = 64, 16, 4
    x = torch.randn(B, 1 + n, D)
    torch.manual_seed(0)
    out = PatchDropout(0.5, num_prefix_tokens=1).train()(x)
    assert out.shape == (B, 1 + 8, D)
    assert torch.equal(out[:, 0], x[:, 0])  # class token first and untouched
    subsets = []
    for b in range(B):  # every kept token is one of this image's own patches, none twice
        match = (out[b, 1:, None, :] == x[b, None, 1:, :]).all(-1)  # (keep, n): kept row == patch row
        assert match.sum(1).eq(1).all()
        picked = match.float().argmax(1)
        assert picked.unique().numel() == 8
        subsets.append(frozenset(picked.tolist()))
    assert len(set(subsets)) > B // 2  # independent draws per image, not one subset for the batch
    torch.manual_seed(0)
    assert torch.equal(PatchDropout(0.5, 1).train()(x), out)  # torch's global RNG: reseeding repeats it
    assert PatchDropout(0.5, 1).eval()(x) is x


def test_patch_dropout_eval_unchanged_and_training_deterministic():
    cfg = tiny_config(patch_drop_rate=0.5, pool="avg", class_token=False)
    torch.manual_seed(0)
    model = randomize(VisionTransformer(cfg))
    plain = VisionTransformer(cfg.replace(patch_drop_rate=0.0))
    plain.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(model.eval()(x), plain.eval()(x))
    model.train(), plain.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    assert torch.equal(model(x), a)
    assert not torch.allclose(a, plain(x))  # training really drops tokens
    a.square().sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    with capture_attention(model) as maps:  # the probe sees the shorter sequence
        model(x)
    assert maps[0].shape == (4, cfg.num_heads, 8, 8)


# ---- stochastic depth that skips computation ---------------------------------------------------
def test_drop_add_residual_expectation_is_x_plus_branch():
    torch.manual_seed(0)
    W = torch.randn(6, 6, dtype=torch.float64)
    branch = lambda t: torch.tanh(t @ W)  # noqa: E731 - per-sample, nonlinear
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    draws = 4000
    mean = sum(drop_add_residual(x, branch, 0.4) for _ in range(draws)) / draws  # keep 3 of 5, scale 5/3
    err = (mean - (x + branch(x))).abs().max() / branch(x).abs().max()
    assert err < 0.05, err  # without the B/keep scale the error would be 40%


def test_skip_block_matches_masking_block_in_expectation():
    """B=4, p=0.5: each sample is kept with probability 1/2 by either rule, so the whole block (two
    branches, nonlinear) has the same expectation with skipping as with DropPath masking."""
    torch.manual_seed(0)
    cfg = tiny_config(drop_path_rate=0.5, init_values=0.5)
    mask_block = randomize(Block(cfg, 0.5, "math")).double().train()
    skip_block = Block(cfg.replace(drop_path_skip=True), 0.5, "math").double().train()
    skip_block.load_state_dict(mask_block.state_dict())
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        draws = 3000
        skip = sum(skip_block(x) for _ in range(draws)) / draws
        mask = sum(mask_block(x) for _ in range(draws)) / draws
        full = mask_block.eval()(x)
    scale = (full - x).abs().max()
    assert (skip - mask).abs().max() / scale < 0.05
    assert (skip - full).abs().max() > 0  # sanity: the draws are random
    assert torch.equal(skip_block.eval()(x), full)  # eval: full computation, no scaling


def test_skip_depth_really_skips_and_trains():
    cfg = tiny_config(depth=3, drop_path_rate=0.5, drop_path_skip=True)  # block rates 0, 0.25, 0.5
    torch.manual_seed(0)
    model = randomize(VisionTransformer(cfg))
    rows = {}
    for i, block in enumerate(model.blocks):
        for name in ("attn", "mlp"):
            getattr(block, name).register_forward_hook(
                lambda mod, inp, out, key=(i, name): rows.setdefault(key, []).append(inp[0].shape[0]))
    x = torch.randn(8, 3, 16, 16)
    torch.manual_seed(1)
    out = model.train()(x)
    assert {k: v[-1] for k, v in rows.items()} == {(0, "attn"): 8, (0, "mlp"): 8, (1, "attn"): 6, (1, "mlp"): 6,
                                                   (2, "attn"): 4, (2, "mlp"): 4}
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    torch.manual_seed(1)
    assert torch.equal(model(x), out)  # deterministic under torch.manual_seed
    model.eval()(x)
    assert all(v[-1] == 8 for v in rows.values())  # eval sees the whole batch
    masking = VisionTransformer(cfg.replace(drop_path_skip=False)).train()
    for block in masking.blocks:
        block.attn.register_forward_hook(lambda mod, inp, out: rows.setdefault("mask", []).append(inp[0].shape[0]))
    masking(x)
    assert rows["mask"] == [8, 8, 8]  # the default still computes every sample


# ---- other input sizes (progressive resizing) ----------------------------------------------------
@pytest.mark.parametrize("pos, cls", [("sincos", False), ("learn", True), ("sincos", True), ("learn", False)])
def test_dynamic_img_size_forward_backward(pos, cls):
    cfg = tiny_config(img_size=32, patch_size=4, pos_embed=pos, class_token=cls, pool="token" if cls else "avg")
    torch.manual_seed(0)
    model = randomize(VisionTransformer(cfg, dynamic_img_size=True))
    fixed = VisionTransformer(cfg)
    fixed.load_state_dict(model.state_dict())
    for size in (16, 24, 32, (16, 24)):
        h, w = (size, size) if isinstance(size, int) else size
        model.zero_grad()
        x = torch.randn(2, 3, h, w)
        assert _block_input_rows(model, x)[1] == int(cls) + (h // 4) * (w // 4)
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
        out.square().sum().backward()
        if pos == "learn":  # resampling is differentiable: the full-size parameter is trained
            assert model.pos_embed.grad.abs().sum() > 0
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), fixed.eval()(x))  # full size: exactly today's model
    assert set(model.state_dict()) == set(fixed.state_dict())  # cached tables are not saved


def test_position_tables_for_other_grids():
    sincos = VisionTransformer(tiny_config(img_size=32, pos_embed="sincos"), dynamic_img_size=True)
    assert torch.equal(sincos_pos_embed(8, 32, 1), sincos.pos_embed)  # fresh table == the buffer
    assert sincos._pos_embed_for((8, 8)) is sincos.pos_embed
    small = sincos._pos_embed_for((4, 6))
    assert small.shape == (1, 1 + 24, 32) and small is sincos._pos_embed_for((4, 6))  # cached
    assert torch.equal(small, sincos_pos_embed((4, 6), 32, 1, span=8))
    # A 4-patch row of a 32-px model shown at 16 px: patch centres 0.5, 2.5, 4.5, 6.5 in 8-grid units.
    row = sincos_pos_embed((1, 4), 32, 0, span=(1, 8))[0]
    omega = 1.0 / 10000.0 ** (torch.arange(8, dtype=torch.float64) / 8)
    x = torch.tensor([0.5, 2.5, 4.5, 6.5], dtype=torch.float64)[:, None] * omega
    assert torch.allclose(row[:, 16:24], x.sin().float(), atol=1e-6)
    assert torch.equal(sincos_pos_embed(5, 32, 1, span=5), sincos_pos_embed(5, 32, 1))
    learn = randomize(VisionTransformer(tiny_config(img_size=32), dynamic_img_size=True))
    small = learn._pos_embed_for((4, 4))
    assert small.shape == (1, 17, 32) and torch.equal(small[:, 0], learn.pos_embed[:, 0])  # class row kept
    assert small.requires_grad


def test_dynamic_img_size_refuses_bad_shapes():
    model = VisionTransformer(tiny_config(img_size=32, patch_size=4), dynamic_img_size=True)
    for shape in [(2, 3, 30, 32), (2, 3, 32, 18), (2, 1, 32, 32), (2, 3, 0, 32), (3, 32, 32)]:
        with pytest.raises(InputShapeError) as err:
            model(torch.randn(shape))
        assert str(tuple(shape)) in str(err.value) and "patch_size=4" in str(err.value)
    model.dynamic_img_size = False  # the default: only the config's size
    assert not VisionTransformer(tiny_config(img_size=32)).dynamic_img_size
    for size in (16, 24):
        with pytest.raises(InputShapeError, match=rf"\(2, 3, {size}, {size}\).*\(batch, 3, 32, 32\)"):
            model(torch.randn(2, 3, size, size))


@pytest.mark.parametrize("B, p", [(8, 0.05), (4, 0.1), (1, 0.3), (5, 0.5)])
def test_skip_depth_drops_drop_prob_of_the_samples_on_average(B, p):
    """The subset size is B(1-p) rounded at random: truncating would drop 12.5% at B=8, p=0.05."""
    seen = []
    torch.manual_seed(0)
    for _ in range(2000):
        drop_add_residual(torch.zeros(B, 2, 3), lambda t: seen.append(t.shape[0]) or t, p)
    expected = max(1.0, B * (1 - p))
    assert abs(sum(seen) / len(seen) - expected) < 0.05 * B, (sum(seen) / len(seen), expected)
    assert max(seen) <= B and min(seen) >= 1
