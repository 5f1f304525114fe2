import json
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab import ModelFileError
from vitlab.weights.modeldir import read_state_dict

from conftest import randomize, refusal, tiny_config


@pytest.mark.parametrize("layout", [{}, dict(class_token=False, pool="avg", pos_embed="sincos", in_chans=1),
                                    dict(init_values=0.1, class_names=tuple("abcde"))])
def test_round_trip_rebuilds_the_exact_model(tmp_path, layout, rng_input):
    model = randomize(vitlab.create_model(tiny_config(drop_path_rate=0.1, **layout))).eval()
    out = vitlab.save_model(model, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    same = vitlab.load_model(out).eval()
    assert same.config == model.config
    x = rng_input(model.config)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


def test_readme_example(tmp_path):
    model = vitlab.create_model("vit_small_patch16_224", num_classes=10)
    vitlab.save_model(model, tmp_path / "small")
    same = vitlab.load_model(tmp_path / "small")
    assert same.config.num_classes == 10 and same.config.embed_dim == 384
    want, got = model.state_dict(), same.state_dict()
    assert list(got) == list(want)  # the same keys, in the same order
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_load_at_another_resolution(tmp_path):
    model = randomize(vitlab.create_model(tiny_config())).eval()
    vitlab.save_model(model, tmp_path / "m")
    big = vitlab.load_model(tmp_path / "m", img_size=32).eval()
    assert big.config.img_size == 32 and big.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.isfinite(big(torch.randn(2, 3, 32, 32))).all()
    # only the patch positions are resampled: every other tensor, the class token's position included
    want, got = model.state_dict(), big.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert k == "pos_embed" or torch.equal(got[k], want[k]), k
    assert torch.equal(got["pos_embed"][:, 0], want["pos_embed"][:, 0])
    # a 4x4 grid resampled to 8x8: the mean of the patch positions is kept (up to interpolation)
    torch.testing.assert_close(got["pos_embed"][:, 1:].mean(1), want["pos_embed"][:, 1:].mean(1), atol=0.01, rtol=0)
    # at the original size the resampled model is the original
    same = vitlab.load_model(tmp_path / "m", img_size=16).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


def test_save_unwraps_compiled_models(tmp_path):
    model = vitlab.create_model(tiny_config())
    vitlab.save_model(torch.compile(model), tmp_path / "m")  # compiled lazily: no compile cost here
    keys = set(vitlab.load_model(tmp_path / "m").state_dict())
    assert keys == set(model.state_dict()) and not any("_orig_mod" in k for k in keys)


@pytest.fixture
def saved(tmp_path):
    return vitlab.save_model(vitlab.create_model(tiny_config()), tmp_path / "m")


def test_missing_files(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="model.safetensors is missing"):
        vitlab.load_model(saved)
    (saved / "config.json").unlink()
    with pytest.raises(ModelFileError, match="config.json is missing"):
        vitlab.load_model(saved)
    with pytest.raises(ModelFileError, match="not a model directory"):
        vitlab.load_model(saved / "nope")


def test_truncated_weights(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="model.safetensors cannot be read as safetensors.*truncated"):
        vitlab.load_model(saved)
    f.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        vitlab.load_model(saved)


def test_truncated_or_foreign_config(saved):
    f = saved / "config.json"
    text = f.read_text()
    f.write_text(text[: len(text) // 2])
    with pytest.raises(ModelFileError, match="config.json is not valid JSON"):
        vitlab.load_model(saved)
    f.write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelFileError, match="not a vitlab model config"):
        vitlab.load_model(saved)
    doc = json.loads(text)
    doc["config"]["num_heads"] = 3
    f.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="invalid config.*embed_dim=32 is not divisible by num_heads=3"):
        vitlab.load_model(saved)


def test_weights_that_do_not_match_the_config(saved):
    f = saved / "config.json"
    doc = json.loads(f.read_text())
    doc["config"]["depth"] = 3
    f.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=r"does not match the config: missing .*blocks\.2\."):
        vitlab.load_model(saved)
    doc["config"].update(depth=2, embed_dim=64)
    f.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match="shape mismatch"):
        vitlab.load_model(saved)


def rewrite_weights(f, change=None, keep_id=True):
    """Rewrite a model.safetensors with `change` applied to its tensors, keeping its save id or not."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(f, "pt") as h:
        metadata = h.metadata()
    state = load_file(f)
    if change:
        change(state)
    save_file(state, f, metadata=metadata if keep_id else {"format": "pt"})


def test_non_finite_weights_are_refused_by_name(saved, capsys):
    from vitlab.cli import main
    f = saved / "model.safetensors"
    assert vitlab.load_model(saved).training is False  # loaded for inference; fine-tuning calls .train()

    def poison(state):
        state["blocks.1.mlp.fc1.weight"][3, 5] = float("nan")
        state["head.bias"][0] = float("inf")
    rewrite_weights(f, poison)  # the same save id: only the values differ
    with pytest.raises(ModelFileError, match=r"NaN or infinite values in 2 tensor\(s\): .*blocks\.1\.mlp\.fc1\.weight"):
        vitlab.load_model(saved)
    # the CLI: one line, and nothing written
    refusal(main(["export", str(saved), "--format", "torchscript"]), capsys.readouterr().err,
            "NaN or infinite values in 2 tensor(s)")
    assert sorted(p.name for p in saved.iterdir()) == ["config.json", "model.safetensors"]


class _Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned_by_pickle",))


def test_loading_never_unpickles_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": _Boom()}, evil)
    with pytest.raises(ModelFileError, match="evil.pth cannot be read as a weights-only"):
        read_state_dict(evil)
    assert not (tmp_path / "pwned_by_pickle").exists()
    raw = tmp_path / "raw.bin"
    raw.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ModelFileError, match="raw.bin cannot be read as a weights-only") as e:
        read_state_dict(raw)
    assert not (tmp_path / "pwned_by_pickle").exists()
    # torch's own message advises retrying with weights_only=False, which would run the pickle
    assert "weights_only=False" not in str(e.value) and "could run code" in str(e.value)


def test_a_failed_save_keeps_the_previous_model(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    model = vitlab.create_model(tiny_config(depth=3))

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("vitlab.weights.modeldir.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        vitlab.save_model(model, saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before  # no temp files left either
    assert vitlab.load_model(saved).config.depth == 2


def test_weights_and_config_from_different_saves_are_refused(saved, tmp_path, monkeypatch, capsys):
    import shutil
    from vitlab.cli import main
    from vitlab.weights.pretrained import read_pretrained
    # a save stopped between its two files: new weights (same shapes) beside the old config
    renamed = tiny_config(class_names=tuple("vwxyz"))
    monkeypatch.setattr("vitlab.weights.modeldir.atomic_write_text",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        vitlab.save_model(vitlab.create_model(renamed), saved)
    monkeypatch.undo()
    with pytest.raises(ModelFileError, match=r"not written by the same save.*Save the model again.*\"save\": null"):
        vitlab.load_model(saved)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "a.png")
    refusal(main(["predict", str(saved), str(tmp_path / "a.png")]), capsys.readouterr().err,  # the CLI: one line
            "not written by the same save")
    with pytest.raises(ModelFileError, match="not written by the same save"):  # and so does fine-tuning from it
        read_pretrained(str(saved))
    # "save": null in config.json: the user vouches for the pair
    doc = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**doc, "save": None}))
    assert vitlab.load_model(saved).config.class_names is None  # the old config, the new weights
    # a config copied in from another model of the same shapes
    other = vitlab.save_model(vitlab.create_model(renamed), tmp_path / "other")
    vitlab.save_model(vitlab.create_model(tiny_config()), saved)
    assert vitlab.load_model(saved).config.class_names is None  # a whole save pairs up again
    shutil.copy(other / "config.json", saved / "config.json")
    with pytest.raises(ModelFileError, match=r"\(save [0-9a-f]{32}\) and .*\(save [0-9a-f]{32}\) were not"):
        vitlab.load_model(saved)
    # an id-less config (from before the ids) beside weights from a newer save: refused too
    doc = json.loads((saved / "config.json").read_text())
    del doc["save"]
    (saved / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match=r"\(save [0-9a-f]{32}\) and .*\(no save id\) were not"):
        vitlab.load_model(saved)
    # weights rewritten by another tool (no id) beside a config with one: refused
    rewrite_weights(other / "model.safetensors", keep_id=False)
    with pytest.raises(ModelFileError, match=r"\(no save id\) and .*\(save [0-9a-f]{32}\) were not"):
        vitlab.load_model(other)
    # a directory from before the ids: neither file has one, and it loads
    rewrite_weights(saved / "model.safetensors", keep_id=False)
    assert vitlab.load_model(saved).config.class_names == tuple("vwxyz")
    # a "save" that is no id: one line naming it
    for bad in (12, "x" * 500, ["a"]):
        (saved / "config.json").write_text(json.dumps({**doc, "save": bad}))
        with pytest.raises(ModelFileError, match=r"'save' must be a save id \(32 hex digits\) or null, got"):
            vitlab.load_model(saved)


def test_safetensors_header_is_plain(saved):
    """The weights file is a standard safetensors file that any reader can open."""
    raw = (saved / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header["__metadata__"]
    assert meta["format"] == "pt" and set(meta) == {"format", "vitlab_save"}  # the save id, nothing else
    assert meta["vitlab_save"] == json.loads((saved / "config.json").read_text())["save"]
    assert "blocks.1.attn.qkv.weight" in header
