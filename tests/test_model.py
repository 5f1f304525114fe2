import math

import pytest
import torch

import vitlab
from vitlab import InputShapeError, VisionTransformer
from vitlab.attention import attention_rollout, capture_attention
from vitlab.config import PRESETS
from vitlab.layers import DropPath
from vitlab.pos_embed import resample_pos_embed, sincos_2d

from conftest import randomize, tiny_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_and_backpropagates(name):
    cfg = PRESETS[name]
    # Shrunk where huge: at most 2 blocks, and the 224-px presets on a 4x4 patch grid, keep the test
    # fast; widths, heads, patch sizes, channels and pooling are the preset's own.
    small_img = cfg.patch_size * 4 if cfg.img_size == 224 else cfg.img_size
    cfg = cfg.replace(depth=min(cfg.depth, 2), img_size=small_img)
    torch.manual_seed(0)
    model = VisionTransformer(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # a zero head would zero every other gradient
    x = torch.randn(2, *cfg.input_size)
    out = model(x)
    assert out.shape == (2, cfg.num_classes)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_parameter_counts_equal_timm():
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    expected = {"vit_tiny_patch16_224": 5_717_416, "vit_small_patch16_224": 22_050_664,
                "vit_base_patch16_224": 86_567_656, "vit_large_patch16_224": 304_326_632}
    for name, count in expected.items():
        with torch.device("meta"):  # shapes only: no memory, no init time
            ours = sum(p.numel() for p in vitlab.create_model(name).parameters())
            theirs = sum(p.numel() for p in timm_vit.__dict__[name](pretrained=False).parameters())
        assert ours == theirs == count, name


GOLDEN = {  # logits of a seeded tiny model (see test below); guards against silent numeric changes
    ("token", "learn", True): [[6.164053, 6.158729, -3.303086], [5.923331, 6.538258, -2.812900]],
    ("avg", "sincos", False): [[2.152964, -16.997330, 3.032666], [-3.497721, -9.547761, -1.687070]],
}


@pytest.mark.parametrize("pool, pos, cls", list(GOLDEN))
def test_golden_logits(pool, pos, cls):
    torch.manual_seed(0)
    model = vitlab.create_model(tiny_config(num_classes=3, pool=pool, pos_embed=pos, class_token=cls)).eval()
    torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, torch.tensor(GOLDEN[(pool, pos, cls)]), atol=1e-4, rtol=1e-4)


def test_head_starts_at_zero_and_loss_is_log_classes():
    model = vitlab.create_model(tiny_config(num_classes=7))
    out = model(torch.randn(3, 3, 16, 16))
    assert torch.equal(out, torch.zeros(3, 7))
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2]))
    assert math.isclose(loss.item(), math.log(7), rel_tol=1e-6)


@pytest.mark.parametrize("layout", [{}, dict(class_token=False, pool="avg", pos_embed="sincos")])
def test_attention_paths_agree(layout, rng_input):
    """sdpa, math and the captured (hooked) path: same outputs and same gradients."""
    cfg = tiny_config(**layout)
    torch.manual_seed(0)
    model = randomize(VisionTransformer(cfg))
    x = rng_input(cfg)
    results = {}
    for impl in ("sdpa", "math", "captured"):
        model.zero_grad()
        model.set_attn_impl("sdpa" if impl == "captured" else impl)
        if impl == "captured":
            with capture_attention(model) as maps:
                out = model(x)
            assert len(maps) == cfg.depth
            for m in maps:
                assert m.shape == (2, cfg.num_heads, cfg.seq_len, cfg.seq_len)
                torch.testing.assert_close(m.sum(-1), torch.ones(2, cfg.num_heads, cfg.seq_len))
        else:
            out = model(x)
        out.square().sum().backward()
        results[impl] = (out.detach(), [p.grad.clone() for p in model.parameters()])
    ref_out, ref_grads = results["math"]
    for impl in ("sdpa", "captured"):
        out, grads = results[impl]
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4)
    # hooks are gone after the block: no more maps recorded
    with capture_attention(model) as maps:
        pass
    model(x)
    assert maps == []


def test_auto_kernel_choice():
    from vitlab.model import pick_attn_impl
    assert pick_attn_impl("cuda", 65, torch.bfloat16) == "sdpa"
    assert pick_attn_impl("cpu", 65, torch.float32) == "sdpa"
    assert pick_attn_impl("cpu", 65, torch.bfloat16) == "math"
    assert pick_attn_impl("cpu", 4097, torch.bfloat16) == "sdpa"
    with pytest.raises(vitlab.ConfigError, match="attn_impl='flash'"):
        vitlab.create_model(tiny_config(), attn_impl="flash")


def test_rollout_is_row_stochastic():
    cfg = tiny_config()
    model = randomize(VisionTransformer(cfg)).eval()
    with capture_attention(model) as maps, torch.no_grad():
        model(torch.randn(2, *cfg.input_size))
    roll = attention_rollout(maps)
    assert roll.shape == (2, cfg.seq_len, cfg.seq_len)
    torch.testing.assert_close(roll.sum(-1), torch.ones(2, cfg.seq_len))
    assert (roll >= 0).all()


def test_input_checks_give_the_numbers():
    model = vitlab.create_model(tiny_config())
    with pytest.raises(InputShapeError, match=r"\(2, 3, 30, 30\).*\(batch, 3, 16, 16\)"):
        model(torch.randn(2, 3, 30, 30))
    with pytest.raises(InputShapeError, match=r"\(2, 1, 16, 16\)"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(InputShapeError):
        model(torch.randn(3, 16, 16))


def test_timm_api():
    model = vitlab.create_model(tiny_config(num_classes=4))
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 32)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    assert model.no_weight_decay() == {"pos_embed", "cls_token"}
    model.reset_classifier(9, class_names=tuple("abcdefghi"))
    assert model(x).shape == (2, 9) and model.config.num_classes == 9
    assert model.get_classifier().out_features == 9
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)


def test_sincos_embedding_is_fixed_and_not_saved():
    model = vitlab.create_model(tiny_config(pos_embed="sincos", class_token=False, pool="avg"))
    assert "pos_embed" not in model.state_dict()
    assert all(not n.startswith("pos_embed") for n, _ in model.named_parameters())
    table = sincos_2d(4, 32)
    assert table.shape == (16, 32)
    torch.testing.assert_close(model.pos_embed[0], table)
    # positions differ from each other: the embedding tells patches apart
    assert torch.cdist(table, table).fill_diagonal_(1.0).min() > 0.1


def test_resample_pos_embed():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pos, 4, 1) is pos
    big = resample_pos_embed(pos, 8, 1)
    assert big.shape == (1, 65, 8)
    assert torch.equal(big[:, 0], pos[:, 0])  # class-token position kept
    const = torch.ones(1, 16, 8) * 3.0  # a constant grid stays constant after interpolation
    torch.testing.assert_close(resample_pos_embed(const, 6, 0), torch.full((1, 36, 8), 3.0))
    with pytest.raises(vitlab.ConfigError, match="15 grid positions"):
        resample_pos_embed(torch.randn(1, 16, 8), 4, 1)


def test_drop_path():
    dp = DropPath(0.5)
    x = torch.ones(1000, 3)
    dp.eval()
    assert torch.equal(dp(x), x)
    dp.train()
    torch.manual_seed(0)
    y = dp(x)
    kept = (y[:, 0] > 0).float().mean().item()
    assert 0.4 < kept < 0.6  # about half the samples dropped...
    assert torch.equal(y[:, 0], y[:, 1])  # ...whole samples, not single elements
    assert torch.allclose(y[y > 0], torch.tensor(2.0))  # survivors rescaled by 1 / keep
    assert 0.9 < y.mean().item() < 1.1


def test_stochastic_depth_rule_and_layerscale():
    model = vitlab.create_model(tiny_config(depth=3, drop_path_rate=0.2, init_values=1e-4))
    assert [b.drop_path1.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((32,), 1e-4))


def test_weight_init_modes():
    """xavier scales each linear layer by its width; trunc_normal is timm's fixed std 0.02. The patch
    embedding (LeCun normal) and the zero head are the same in both."""
    model = VisionTransformer(tiny_config(embed_dim=64, depth=2, num_heads=2))
    fc1 = model.blocks[0].mlp.fc1.weight  # (256, 64)
    assert fc1.std().item() == pytest.approx(0.02, rel=0.1)
    torch.manual_seed(0)
    model.init_weights("xavier")
    out_f, in_f = fc1.shape
    assert fc1.std().item() == pytest.approx(math.sqrt(2.0 / (in_f + out_f)), rel=0.1)
    assert fc1.abs().max().item() <= math.sqrt(6.0 / (in_f + out_f)) + 1e-6  # uniform, not normal
    assert torch.count_nonzero(model.head.weight) == 0
    fan_in = model.patch_embed.proj.weight[0].numel()
    assert model.patch_embed.proj.weight.std().item() == pytest.approx(fan_in ** -0.5, rel=0.15)
    with pytest.raises(vitlab.errors.ConfigError, match="'he'"):
        model.init_weights("he")
