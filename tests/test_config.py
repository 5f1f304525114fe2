import dataclasses
import json

import pytest

import vitlab
from vitlab import ConfigError, UnknownModelError, ViTConfig
from vitlab.config import PRESETS, get_config, parse_variant


def test_defaults_are_vit_b16():
    cfg = ViTConfig()
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (224, 16, 768, 12, 12)
    assert cfg.grid_size == 14 and cfg.num_patches == 196 and cfg.seq_len == 197
    assert cfg.head_dim == 64 and cfg.mlp_hidden_dim == 3072 and cfg.input_size == (3, 224, 224)


def test_json_round_trip_every_preset():
    for name, cfg in PRESETS.items():
        again = ViTConfig.from_json(cfg.to_json())
        assert again == cfg, name
    named = PRESETS["vit_tiny_patch4_32"].replace(class_names=tuple("abcdefghij"))
    assert ViTConfig.from_dict(json.loads(named.to_json())) == named


def test_frozen():
    cfg = ViTConfig()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'depth'"):
        cfg.depth = 3
    assert cfg.depth == 12 and cfg.replace(depth=3).depth == 3 and cfg.depth == 12  # replace makes a copy


@pytest.mark.parametrize("changes, words", [
    (dict(img_size=30, patch_size=4), ["img_size=30", "patch_size=4"]),
    (dict(embed_dim=100, num_heads=3), ["embed_dim=100", "num_heads=3"]),
    (dict(pool="max"), ["pool='max'"]),
    (dict(pool="token", class_token=False), ["class_token"]),
    (dict(pos_embed="rope"), ["pos_embed='rope'"]),
    (dict(drop_path_rate=1.5), ["drop_path_rate=1.5"]),
    (dict(in_chans=1), ["mean has 3 values", "in_chans=1"]),
    (dict(num_classes=3, class_names=("a", "b")), ["class_names has 2", "num_classes=3"]),
    (dict(depth=0), ["depth=0"]),
    (dict(std=(0.5, 0.0, 0.5)), ["std="]),
])
def test_invalid_combinations_name_fields_and_values(changes, words):
    with pytest.raises(ConfigError) as err:
        ViTConfig().replace(**changes)
    for word in words:
        assert word in str(err.value)


def test_unknown_field_is_an_error():
    with pytest.raises(ConfigError, match="unknown ViTConfig field.*'widht'"):
        ViTConfig.from_dict({"widht": 3})
    with pytest.raises(ConfigError, match="depht"):
        ViTConfig().replace(depht=3)


def test_preset_table():
    for size in ("tiny", "small", "medium", "base", "large", "huge"):
        for patch in (8, 14, 16, 32):
            cfg = PRESETS[f"vit_{size}_patch{patch}_224"]
            assert cfg.img_size == 224 and cfg.patch_size == patch
    assert PRESETS["vit_huge_patch14_224"].num_heads == 16 and PRESETS["vit_huge_patch14_224"].embed_dim == 1280
    small = PRESETS["vit_tiny_patch4_32"]
    assert (small.img_size, small.in_chans, small.embed_dim, small.depth, small.num_heads) == (32, 3, 192, 6, 3)
    grey = PRESETS["vit_tiny_patch2_28"]
    assert (grey.img_size, grey.in_chans, grey.patch_size, grey.grid_size) == (28, 1, 2, 14)
    seed = PRESETS["seed_b16"]
    assert (seed.img_size, seed.patch_size, seed.depth, seed.embed_dim, seed.mlp_hidden_dim, seed.num_heads,
            seed.drop_rate, seed.class_token, seed.pos_embed, seed.pool) == \
        (224, 16, 12, 768, 3072, 12, 0.1, True, "learn", "token")


def test_variant_parser():
    assert parse_variant("S/16") == PRESETS["vit_small_patch16_224"].replace(name="S/16")
    ti = parse_variant("Ti/4@32", num_classes=10)
    assert (ti.img_size, ti.patch_size, ti.embed_dim, ti.num_classes) == (32, 4, 192, 10)
    assert get_config("B/32").patch_size == 32
    with pytest.raises(UnknownModelError, match="'X/16'"):
        parse_variant("X/16")
    with pytest.raises(ConfigError, match="img_size=224 is not divisible by patch_size=5"):
        get_config("S/5")


def test_unknown_model_suggests_names():
    with pytest.raises(UnknownModelError) as err:
        vitlab.create_model("vit_tiny")
    assert "vit_tiny" in str(err.value) and "did you mean" in str(err.value)
    with pytest.raises(UnknownModelError, match="vitlab models"):
        get_config("resnet50")


@pytest.mark.parametrize("field, value", [("patch_drop_rate", 1.5), ("patch_drop_rate", "x"),
                                          ("patch_drop_rate", float("nan")), ("patch_drop_rate", 1.0),
                                          ("patch_drop_rate", -0.1), ("drop_path_skip", "yes")])
def test_training_speedup_fields_are_checked(field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r}"):
        ViTConfig(**{field: value})


def test_config_written_before_the_speedup_fields_still_loads():
    cfg = ViTConfig(patch_drop_rate=0.25, drop_path_skip=True, drop_path_rate=0.1)
    assert ViTConfig.from_json(cfg.to_json()) == cfg
    old = {k: v for k, v in PRESETS["vit_tiny_patch4_32"].to_dict().items()
           if k not in ("patch_drop_rate", "drop_path_skip")}
    loaded = ViTConfig.from_dict(old)
    assert (loaded.patch_drop_rate, loaded.drop_path_skip) == (0.0, False)
    assert loaded == PRESETS["vit_tiny_patch4_32"]
    assert cfg.state_shapes() == ViTConfig().state_shapes()  # no new weights
