"""Hostile and careless inputs to model directories, configs and `vitlab convert` (issue 8 items 2,
3, 10, 11): each either works or ends in one clear error naming the file or setting, nothing on disk
is lost, and sizes in a config are never trusted before the weights confirm them. `vitlab convert --out`
has its own file (test_hostile_convert.py), and so do Hugging Face folders (test_hostile_hf.py)."""
import json
import math
import os
import stat
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from vitlab import ConfigError, ModelFileError, ViTConfig
from vitlab.errors import ConversionError
from vitlab.weights.convert import convert
from vitlab.weights.hf import to_hf
from vitlab.weights.modeldir import read_config
from vitlab.weights.timm import infer_config

from conftest import tiny_config
from weights_fixtures import FAST_S, cli, edit_json, tree


def edit_config(saved, **changes):
    f = saved / "config.json"
    doc = json.loads(f.read_text())
    doc["config"].update(changes)
    f.write_text(json.dumps(doc))


# ---- item 3: sizes in config.json are checked against the weights before anything is built -----
@pytest.mark.parametrize("changes", [
    dict(depth=10**9), dict(embed_dim=2**40, num_heads=1), dict(img_size=2**31, patch_size=1),
    dict(num_classes=10**12), dict(mlp_ratio=1e12), dict(mlp_ratio=float("inf")),
    # within every per-field limit, but 13B parameters: only the weights' header can refuse it
    dict(depth=1024, embed_dim=1024, num_heads=16),
], ids=["depth", "embed_dim", "img_size", "num_classes", "mlp_ratio", "mlp_ratio-inf", "big-but-legal"])
def test_huge_sizes_in_config_fail_fast(saved, changes):
    edit_config(saved, **changes)
    start = time.perf_counter()
    with pytest.raises(ModelFileError) as err:
        vitlab.load_model(saved)
    assert time.perf_counter() - start < FAST_S
    assert next(iter(changes)) in str(err.value)


def test_config_that_disagrees_with_the_weights_is_refused_before_building(saved, monkeypatch):
    edit_config(saved, depth=3)
    monkeypatch.setattr("vitlab.weights.modeldir.VisionTransformer", None)  # building would crash
    with pytest.raises(ModelFileError, match=r"does not match the config: missing .*blocks\.2\."):
        vitlab.load_model(saved)


def test_config_state_shapes_match_the_model_for_every_layout():
    """The shape table that load_model checks files against is the model's real state dict."""
    layouts = [{}, dict(class_token=False, pool="avg", pos_embed="sincos"), dict(pool="avg"),
               dict(init_values=0.1, qkv_bias=False, mlp_ratio=2.0, num_classes=0),
               dict(pool="avg", fc_norm=False), dict(conv_stem=(8, 16)), dict(conv_stem=(8,), patch_size=8),
               dict(conv_stem=(8, 8, 8), img_size=12, patch_size=6)]
    for layout in layouts:
        cfg = tiny_config(**layout)
        real = {k: tuple(v.shape) for k, v in vitlab.create_model(cfg).state_dict().items()}
        assert cfg.state_shapes() == real, layout
        assert cfg.num_params == sum(p.numel() for p in vitlab.create_model(cfg).parameters())


def test_cli_img_size_huge_fails_fast(capsys, ckpt, tmp_path):
    start = time.perf_counter()
    assert "img_size" in cli(capsys, "convert", ckpt, "--from", "timm", "--out", tmp_path / "o",
                             "--img-size", 10**6)
    assert time.perf_counter() - start < FAST_S


# ---- item 10: odd values in a model config are one ConfigError naming field and value ----------
BAD_VALUES = {
    "mean-string": dict(mean="abc"),
    "mean-nan": dict(mean=[float("nan"), 0.5, 0.5]),
    "mean-wrong-length": dict(mean=[0.5, 0.5]),
    "mean-dict": dict(mean={"r": 0.5}),
    "mean-null": dict(mean=None),
    "std-string-item": dict(std=[0.5, "x", 0.5]),
    "std-inf": dict(std=[0.5, float("inf"), 0.5]),
    "num_classes-bool": dict(num_classes=True),
    "depth-float": dict(depth=2.5),
    "depth-string": dict(depth="2"),
    "norm_eps-inf": dict(norm_eps=float("inf")),
    "norm_eps-string": dict(norm_eps="1e-6"),
    "mlp_ratio-nan": dict(mlp_ratio=float("nan")),
    "drop_rate-nan": dict(drop_rate=float("nan")),
    "drop_path_rate-string": dict(drop_path_rate="0.1"),
    "init_values-nan": dict(init_values=float("nan")),
    "qkv_bias-string": dict(qkv_bias="yes"),
    "class_token-int": dict(class_token=1),
    "fc_norm-string": dict(fc_norm="no"),
    "pool-list": dict(pool=["token"]),
    "class_names-ints": dict(class_names=[1, 2, 3, 4, 5]),
    "class_names-string": dict(class_names="abcde"),
    "name-int": dict(name=5),
    "mlp_ratio-tiny": dict(mlp_ratio=1e-9),
}


@pytest.mark.parametrize("changes", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_odd_config_values_are_one_config_error(changes):
    field = next(iter(changes))
    with pytest.raises(ConfigError) as err:
        ViTConfig(**{**tiny_config().to_dict(), **changes})
    assert field in str(err.value)


@pytest.mark.parametrize("changes", [BAD_VALUES["mean-string"], BAD_VALUES["num_classes-bool"],
                                     BAD_VALUES["norm_eps-inf"], BAD_VALUES["mean-nan"]],
                         ids=["mean-string", "num_classes-bool", "norm_eps-inf", "mean-nan"])
def test_odd_config_values_in_a_model_dir_are_one_line(saved, changes):
    edit_config(saved, **changes)
    with pytest.raises(ModelFileError) as err:
        vitlab.load_model(saved)
    assert "config.json holds an invalid config" in str(err.value) and next(iter(changes)) in str(err.value)
    assert "\n" not in str(err.value)


def test_config_that_is_a_list_is_one_error(saved):
    f = saved / "config.json"
    doc = json.loads(f.read_text())
    doc["config"] = list(doc["config"])
    f.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="mapping of field names"):
        vitlab.load_model(saved)
    with pytest.raises(ConfigError, match="got list"):
        ViTConfig.from_dict(["depth"])


def test_extra_that_is_a_list_is_one_error(saved):
    edit_json(saved / "config.json", extra=[1, 2])
    with pytest.raises(ModelFileError, match="'extra' must be a mapping"):
        read_config(saved)


def test_config_from_json_that_is_not_json():
    with pytest.raises(ConfigError, match="must be JSON"):
        ViTConfig.from_json("{depth: 3")


# ---- timm / torchvision inference from odd shapes -----------------------------------------------
def _state(model, **changes):
    state = dict(model.state_dict())
    for k, v in changes.items():
        if v is None:
            state.pop(k.replace("__", "."))
        else:
            state[k.replace("__", ".")] = v
    return state


@pytest.mark.parametrize("changes, words", [
    (dict(patch_embed__proj__weight=torch.zeros(32, 3, 4)), "patch_embed.proj.weight' has shape (32, 3, 4)"),
    (dict(pos_embed=torch.zeros(17, 32)), "'pos_embed' has shape (17, 32)"),
    (dict(pos_embed=torch.zeros(1, 17, 31)), "pos_embed has shape (1, 17, 31)"),
    (dict(pos_embed=torch.zeros(1, 1, 32)), "pos_embed has shape (1, 1, 32)"),
    (dict(pos_embed=torch.zeros(1, 16, 32)), "not a square grid"),
    (dict(head__weight=torch.zeros(5)), "'head.weight' has shape (5,)"),
    (dict(blocks__0__mlp__fc1__weight=torch.zeros(64, 31)), "fc1.weight has shape (64, 31)"),
    (dict(blocks__0__mlp__fc1__weight=None), "no transformer blocks"),
    (dict(norm__weight=None), "neither 'norm.weight'"),
    (dict(patch_embed__proj__weight=None), "no 'patch_embed.proj.weight'"),
], ids=["patch-3d", "pos-2d", "pos-width", "pos-no-patches", "pos-not-square", "head-1d", "fc1-width",
        "no-fc1", "no-norm", "no-patch-embed"])
def test_timm_inference_from_odd_shapes(model, changes, words):
    with pytest.raises(ConversionError) as err:
        infer_config(_state(model, **changes), source="ckpt")
    assert words in str(err.value)


def test_timm_block_index_huge(model):
    state = _state(model)
    state["blocks.1000000000.norm1.weight"] = torch.zeros(32)
    start = time.perf_counter()
    with pytest.raises(ConversionError, match="not contiguous"):
        infer_config(state)
    assert time.perf_counter() - start < FAST_S


def test_timm_wrong_shape_elsewhere_is_refused_before_building(capsys, tmp_path, model, monkeypatch):
    state = _state(model, blocks__1__attn__proj__weight=torch.zeros(32, 30))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "c.safetensors")
    monkeypatch.setattr("vitlab.weights.convert.VisionTransformer", None)  # building would crash
    err = cli(capsys, "convert", tmp_path / "c.safetensors", "--from", "timm", "--out", tmp_path / "o",
              "--num-heads", 2)
    assert "blocks.1.attn.proj.weight: file (32, 30) vs config (32, 32)" in err


def test_torchvision_unknown_keys(capsys, tmp_path):
    torch.save({"conv_proj.weight": torch.zeros(8, 3, 4, 4), "encoder.mystery": torch.zeros(1)}, tmp_path / "tv.pth")
    assert "have no mapping" in cli(capsys, "convert", tmp_path / "tv.pth", "--from", "torchvision",
                                    "--out", tmp_path / "o")


@pytest.mark.parametrize("obj, words", [({"a": 1}, "state dict of tensors"), ({}, "state dict of tensors"),
                                        ([torch.zeros(1)], "state dict of tensors"),
                                        ({"a": torch.zeros(2, dtype=torch.int64)}, "non-float")],
                         ids=["non-tensor", "empty", "list", "int-tensor"])
def test_pth_that_is_not_a_float_state_dict(capsys, tmp_path, obj, words):
    torch.save(obj, tmp_path / "x.pth")
    assert words in cli(capsys, "convert", tmp_path / "x.pth", "--from", "timm", "--out", tmp_path / "o")


# ---- files that are not what they claim ---------------------------------------------------------
def test_config_json_that_is_a_directory(saved):
    (saved / "config.json").unlink()
    (saved / "config.json").mkdir()
    with pytest.raises(ModelFileError, match="config.json is a directory"):
        vitlab.load_model(saved)


def test_weights_symlinked_to_dev_zero(saved):
    (saved / "model.safetensors").unlink()
    (saved / "model.safetensors").symlink_to("/dev/zero")
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="not a regular file"):
        vitlab.load_model(saved)
    assert time.perf_counter() - start < FAST_S


def test_weights_that_are_a_fifo_do_not_hang(saved):
    (saved / "model.safetensors").unlink()
    os.mkfifo(saved / "model.safetensors")
    with pytest.raises(ModelFileError, match="not a regular file"):
        vitlab.load_model(saved)


def test_convert_source_that_is_a_fifo(capsys, tmp_path):
    os.mkfifo(tmp_path / "x.pth")
    assert "not a regular file" in cli(capsys, "convert", tmp_path / "x.pth", "--from", "timm",
                                       "--out", tmp_path / "o")


def test_zero_byte_safetensors_source(capsys, tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    assert "empty (0 bytes)" in cli(capsys, "convert", tmp_path / "x.safetensors", "--from", "timm",
                                    "--out", tmp_path / "o")


def test_safetensors_with_a_huge_header_length(saved):
    (saved / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="cannot be read as safetensors"):
        vitlab.load_model(saved)
    assert time.perf_counter() - start < FAST_S


def test_safetensors_header_that_lies_about_a_shape(saved):
    header = json.dumps({"a": {"dtype": "F32", "shape": [10**5, 10**5, 10**5], "data_offsets": [0, 8]}}).encode()
    (saved / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ModelFileError, match="cannot be read as safetensors"):
        vitlab.load_model(saved)


def test_huge_config_json_is_not_read(saved):
    with open(saved / "config.json", "r+b") as f:
        f.truncate(1 << 33)  # sparse: 8 GB on paper, nothing on disk
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match="not a vitlab config"):
        vitlab.load_model(saved)
    assert time.perf_counter() - start < FAST_S


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_never_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": _Boom()}, tmp_path / "evil.pth")
    assert "weights-only" in cli(capsys, "convert", tmp_path / "evil.pth", "--from", "timm", "--out", tmp_path / "o")
    assert not (tmp_path / "pwned_by_pickle").exists()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "vit", "num_hidden_layers": 1,
                                                            "num_attention_heads": 1}))
    torch.save({"x": _Boom()}, tmp_path / "hf" / "pytorch_model.bin")
    cli(capsys, "convert", tmp_path / "hf", "--from", "hf", "--out", tmp_path / "o")
    assert not (tmp_path / "pwned_by_pickle").exists()


# ---- odd arguments ------------------------------------------------------------------------------
def test_load_model_at_an_image_size_the_patch_does_not_divide(saved):
    with pytest.raises(ConfigError, match="img_size=7 is not divisible by patch_size=4"):
        vitlab.load_model(saved, img_size=7)


def test_load_model_override_that_changes_shapes(saved):
    with pytest.raises(ModelFileError, match="does not match"):
        vitlab.load_model(saved, depth=5)


# ---- item 11: files honour the umask ------------------------------------------------------------
@pytest.fixture
def umask():
    def set_mask(mask):
        old.append(os.umask(mask))
    old = []
    yield set_mask
    if old:
        os.umask(old[0])


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_model_files_honour_the_umask(tmp_path, model, umask, mask, mode):
    umask(mask)
    out = vitlab.save_model(model, tmp_path / "m")
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name
    hf = to_hf(model, tmp_path / "hf")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert stat.S_IMODE((hf / name).stat().st_mode) == mode, name


def test_converted_directory_honours_the_umask(tmp_path, ckpt, umask):
    umask(0o022)
    convert(ckpt, "timm", tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "model.safetensors").stat().st_mode) == 0o644


# ---- saving -------------------------------------------------------------------------------------
def test_save_with_bad_extra_changes_nothing(saved):
    before = tree(saved)
    with pytest.raises(ConfigError, match="extra"):
        vitlab.save_model(vitlab.create_model(tiny_config(depth=3)), saved, extra={"x": object()})
    assert tree(saved) == before


def test_save_with_nan_in_extra_is_refused(tmp_path, model):
    with pytest.raises(ConfigError, match="extra"):
        vitlab.save_model(model, tmp_path / "m", extra={"acc": math.nan})


def test_save_to_a_path_that_is_a_file(tmp_path, model):
    (tmp_path / "m").write_text("mine")
    with pytest.raises(ModelFileError, match="not a directory"):
        vitlab.save_model(model, tmp_path / "m")
    assert (tmp_path / "m").read_text() == "mine"


def test_save_unwraps_compile_around_a_ddp_like_wrapper(tmp_path, model):
    class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: the model is `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module
    vitlab.save_model(torch.compile(Wrapper(model)), tmp_path / "a")
    vitlab.save_model(Wrapper(torch.compile(model)), tmp_path / "b")
    for d in ("a", "b"):
        assert set(vitlab.load_model(tmp_path / d).state_dict()) == set(model.state_dict())


# ---- more odd files and arguments ---------------------------------------------------------------


def test_load_model_at_a_huge_image_size_fails_fast(saved):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="img_size=1000000"):
        vitlab.load_model(saved, img_size=10**6)
    assert time.perf_counter() - start < FAST_S


def test_create_model_with_a_huge_depth_fails_fast():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="depth=1000000000"):
        vitlab.create_model("S/16", depth=10**9)
    assert time.perf_counter() - start < FAST_S


def test_weights_with_integer_tensors(saved, model):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["head.bias"] = torch.zeros(5, dtype=torch.int64)
    save_file(state, saved / "model.safetensors")
    with pytest.raises(ModelFileError, match="non-float tensors.*head.bias"):
        vitlab.load_model(saved)


@pytest.mark.parametrize("raw", [b"[" * 100_000, b"\xff\xfe\x00garbage", b'{"format": "vitlab.model/1"'],
                         ids=["deeply-nested", "not-utf8", "truncated"])
def test_config_json_that_is_not_json(saved, raw):
    (saved / "config.json").write_bytes(raw)
    with pytest.raises(ModelFileError, match="config.json is not valid JSON"):
        vitlab.load_model(saved)
