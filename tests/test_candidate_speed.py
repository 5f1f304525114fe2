"""benchmarks/candidate_speed.py: each candidate's model and batch, the ratio to the recipe, the record.
The training step is replaced by one that sleeps for a time set by the model and batch, so the
arithmetic is checked in a second without timing anything real."""
import json
import time
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def speed(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import candidate_speed
    built = {}

    def fake_step(model, precision, device):
        cfg = model.config
        built[len(built)] = cfg
        per_image = 0.0002 * (3 if cfg.conv_stem == (8, 16) else 1)  # the "full" candidate: 3x slower here

        def step(x, y):
            assert x.shape[1:] == (cfg.in_chans, cfg.img_size, cfg.img_size) and y.shape == x.shape[:1]
            time.sleep(per_image * x.shape[0])
        return step
    monkeypatch.setattr(candidate_speed, "make_train_step", fake_step)
    return candidate_speed, built


def write_spec(tmp_path, candidates):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"recipe": "cifar10", "common": ["train.epochs=2"], "candidates": candidates}))
    return spec


def test_candidates_are_the_recipe_plus_their_overrides_timed_against_it(speed, tmp_path):
    mod, built = speed
    spec = write_spec(tmp_path, {"full": ["model.conv_stem=[8,16]", "model.stem_full_res=1"],
                                 "small_batch": ["train.batch_size=64"], "unused": ["model.depth=2"]})
    rec = mod.measure(spec, ["full", "small_batch"], "fp32", rounds=3, steps=1)
    c = rec["candidates"]
    assert list(c) == ["recipe", "full", "small_batch"]  # "unused" was not asked for
    from vitlab.engine.args import load_run_config
    shipped = tuple(load_run_config("cifar10").model.conv_stem)  # read, not hard-coded: recipes change
    assert (8, 16) != shipped and [cfg.conv_stem for cfg in built.values()] == [shipped, (8, 16), shipped]
    assert built[1].stem_strides == (1, 2) and built[1].stem_full_res == 1
    assert (c["recipe"]["batch"], c["full"]["batch"], c["small_batch"]["batch"]) == (256, 256, 64)
    assert c["recipe"]["vs_recipe"] == 1.0
    assert c["full"]["vs_recipe"] == pytest.approx(1 / 3, rel=0.25)  # images/s, not time per step
    assert c["small_batch"]["vs_recipe"] == pytest.approx(1.0, rel=0.25)  # per image, whatever the batch
    assert rec["machine"]["cpu"] and rec["precision"] == "fp32"
    assert rec["kernel_caps"] == {}  # no ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA set here


def test_kernel_caps_in_the_environment_are_recorded(speed, tmp_path, monkeypatch):
    mod, _ = speed
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    rec = mod.measure(write_spec(tmp_path, {"a": ["model.depth=2"]}), ["a"], "fp32", rounds=1, steps=1)
    assert rec["kernel_caps"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_an_unknown_candidate_is_named_and_nothing_is_written(speed, tmp_path, monkeypatch):
    mod, _ = speed
    spec = write_spec(tmp_path, {"full": ["model.stem_full_res=1"]})
    out = tmp_path / "speed.json"
    monkeypatch.setattr("sys.argv", ["candidate_speed.py", str(spec), "--only", "full,nope", "--out", str(out)])
    with pytest.raises(SystemExit, match=r"no candidate\(s\) \['nope'\]"):
        mod.main()
    assert not out.exists()


def test_results_accumulate(speed, tmp_path, monkeypatch, capsys):
    mod, _ = speed
    spec = write_spec(tmp_path, {"full": ["model.conv_stem=[8]", "model.stem_full_res=1"]})
    out = tmp_path / "speed.json"
    for _ in range(2):
        monkeypatch.setattr("sys.argv", ["candidate_speed.py", str(spec), "--only", "full", "--rounds", "1",
                                         "--steps", "1", "--precision", "fp32", "--out", str(out)])
        mod.main()
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and all(set(r["candidates"]) == {"recipe", "full"} for r in runs)
    assert "x the recipe" in capsys.readouterr().out
