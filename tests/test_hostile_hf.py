"""Malformed Hugging Face folders (issue 8 items 3 and 10): configs that are not JSON or hold odd
values, sizes the weights do not confirm, sharded weights whose index points outside the folder or at
tensors no shard holds, odd preprocessor configs and labels: each either works or is one clear error
naming the file and field, and no index entry can make vitlab read a file outside the folder."""
import json
import time

import pytest
import torch
from safetensors.torch import save_file

from vitlab.errors import ConversionError
from vitlab.weights.hf import from_hf

from weights_fixtures import FAST_S, cli, edit_json


def test_hf_num_hidden_layers_huge_fails_fast(capsys, hf_dir, tmp_path):
    edit_json(hf_dir / "config.json", num_hidden_layers=10**9)
    start = time.perf_counter()
    err = cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "out")
    assert time.perf_counter() - start < FAST_S
    assert "num_hidden_layers=1000000000" in err and "2 layers" in err


def test_hf_config_not_json(capsys, hf_dir, tmp_path):
    (hf_dir / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "o")


def test_hf_config_a_list(capsys, hf_dir, tmp_path):
    (hf_dir / "config.json").write_text("[1, 2]")
    assert "must hold a JSON object, not a list" in cli(capsys, "convert", hf_dir, "--from", "hf",
                                                        "--out", tmp_path / "o")


@pytest.mark.parametrize("value, words", [(None, "num_hidden_layers is missing"),
                                          ("2", "num_hidden_layers is '2'"),
                                          (True, "num_hidden_layers is True"),
                                          (-1, "num_hidden_layers is -1"),
                                          (3, "num_hidden_layers=3 but the weights hold 2")])
def test_hf_num_hidden_layers_bad(capsys, hf_dir, tmp_path, value, words):
    doc = json.loads((hf_dir / "config.json").read_text())
    if value is None:
        del doc["num_hidden_layers"]
    else:
        doc["num_hidden_layers"] = value
    (hf_dir / "config.json").write_text(json.dumps(doc))
    assert words in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "o")


@pytest.mark.parametrize("field, value", [("layer_norm_eps", "abc"), ("layer_norm_eps", float("nan")),
                                          ("hidden_size", 64), ("image_size", [16, 32]),
                                          ("num_attention_heads", "2")])
def test_hf_other_config_fields_bad(capsys, hf_dir, tmp_path, field, value):
    edit_json(hf_dir / "config.json", **{field: value})
    assert field in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "o")


@pytest.fixture
def sharded(hf_dir):
    """The HF folder with its weights split into two shards and an index."""
    from safetensors.torch import load_file
    state = load_file(hf_dir / "model.safetensors")
    (hf_dir / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, part in halves.items():
        save_file({k: state[k] for k in part}, hf_dir / shard)
        weight_map.update({k: shard for k in part})
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf_dir


def test_hf_sharded_works(sharded, model, tmp_path):
    cfg, state = from_hf(sharded)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_hf_index_not_json(capsys, sharded, tmp_path):
    (sharded / "model.safetensors.index.json").write_text("{")
    assert "index.json is not valid JSON" in cli(capsys, "convert", sharded, "--from", "hf", "--out", tmp_path / "o")


def test_hf_index_without_weight_map(capsys, sharded, tmp_path):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert "no 'weight_map'" in cli(capsys, "convert", sharded, "--from", "hf", "--out", tmp_path / "o")


@pytest.mark.parametrize("shard", ["../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", 5])
def test_hf_index_shard_outside_the_folder_is_refused(capsys, sharded, tmp_path, shard, monkeypatch):
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = shard
    index.write_text(json.dumps(doc))
    read = []
    monkeypatch.setattr("vitlab.weights.hf.read_state_dict", lambda f: read.append(f) or {})
    err = cli(capsys, "convert", sharded, "--from", "hf", "--out", tmp_path / "o")
    assert "refusing" in err or "not a file name" in err
    assert read == []  # refused before any shard is opened


def test_hf_index_shard_symlinked_outside_is_refused(capsys, sharded, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (sharded / "sub").symlink_to(outside)
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"][next(iter(doc["weight_map"]))] = "sub/x.safetensors"
    index.write_text(json.dumps(doc))
    assert "resolves outside" in cli(capsys, "convert", sharded, "--from", "hf", "--out", tmp_path / "o")


def test_hf_index_lists_a_tensor_no_shard_holds(capsys, sharded, tmp_path):
    index = sharded / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["vit.extra.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    assert "no shard holds" in cli(capsys, "convert", sharded, "--from", "hf", "--out", tmp_path / "o")


def test_hf_preprocessor_not_json(capsys, hf_dir, tmp_path):
    (hf_dir / "preprocessor_config.json").write_text("nope")
    assert "preprocessor_config.json is not valid JSON" in cli(capsys, "convert", hf_dir, "--from", "hf",
                                                               "--out", tmp_path / "o")


@pytest.mark.parametrize("mean", ["abc", [0.5, 0.5], [0.5, None, 0.5], [0.5, float("nan"), 0.5]])
def test_hf_preprocessor_bad_mean(capsys, hf_dir, tmp_path, mean):
    edit_json(hf_dir / "preprocessor_config.json", image_mean=mean)
    assert "image_mean" in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "o")


def test_hf_preprocessor_single_number_mean_applies_to_every_channel(hf_dir):
    edit_json(hf_dir / "preprocessor_config.json", image_mean=0.25, image_std=0.5)
    cfg, _ = from_hf(hf_dir)
    assert cfg.mean == (0.25,) * 3 and cfg.std == (0.5,) * 3


def test_hf_id2label_non_string_values(capsys, hf_dir, tmp_path):
    edit_json(hf_dir / "config.json", id2label={str(i): i for i in range(5)})
    assert "id2label values must be strings" in cli(capsys, "convert", hf_dir, "--from", "hf",
                                                    "--out", tmp_path / "o")


def test_hf_id2label_a_list(capsys, hf_dir, tmp_path):
    edit_json(hf_dir / "config.json", id2label=["a", "b", "c", "d", "e"])
    assert "id2label must be an object" in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "o")


def test_hf_missing_value_projection(hf_dir):
    from safetensors.torch import load_file
    state = load_file(hf_dir / "model.safetensors")
    del state["vit.encoder.layer.1.attention.attention.value.weight"]
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(ConversionError, match="layer 1 .*not all of query, key, value"):
        from_hf(hf_dir)


def test_hf_config_json_that_is_a_directory(capsys, hf_dir, tmp_path):
    (hf_dir / "config.json").unlink()
    (hf_dir / "config.json").mkdir()
    assert "config.json is a directory" in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "o")


def test_hf_weights_symlinked_to_dev_zero(capsys, hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "model.safetensors").symlink_to("/dev/zero")
    assert "not a regular file" in cli(capsys, "convert", hf_dir, "--from", "hf", "--out", tmp_path / "o")
