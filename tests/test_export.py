"""`vitlab export` and `vitlab predict --backend onnxruntime` (issue 12, item 4).

Parity is measured on real image files (decoded and normalised the way `predict` does it) at batch
1 and 32. A failed or refused export must leave the output folder exactly as it was."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab
from conftest import randomize, refusal, tiny_config, write_shapes
from vitlab.cli import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from vitlab.weights import export as ex  # noqa: E402  (after the skips: it is the onnx extra's module)

CLASSES = ("rows", "columns", "dots")
LAYOUTS = {  # timm's layout (class token, learned positions) and vitlab's small-image one with a conv stem
    "token": dict(pool="token", class_token=True, pos_embed="learn"),
    "gap_stem": dict(pool="avg", class_token=False, pos_embed="sincos", conv_stem=(8, 16)),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("shapes"), CLASSES, 12)  # 36 files


def saved_model(path: Path, **kw) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config(num_classes=3, class_names=CLASSES, **kw)
    vitlab.save_model(randomize(vitlab.VisionTransformer(cfg)), path)  # no zero head: logits that differ
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_onnx_export_matches_pytorch_on_real_images_and_predict_agrees(tmp_path, images, capsys, layout):
    model_dir = saved_model(tmp_path / "m", **LAYOUTS[layout])
    out = tmp_path / "m.onnx"
    assert main(["export", str(model_dir), "--out", str(out), "--dynamic-batch", "--images", str(images)]) == 0
    assert "top-1 agreement 100.0% on 32 images" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["class_names"] == list(CLASSES) and side["preprocessing"]["img_size"] == 16
    assert side["input"]["shape"] == ["batch", 3, 16, 16] and side["opset"] == 17
    assert set(side["parity_fp32"]) == {"batch1", "batch32"} and side["parity_fp32"]["batch32"]["images"] == 32
    assert all(p["max_abs_diff"] <= 1e-4 for p in side["parity_fp32"].values())
    # an independent check of the graph on all 36 images at once, against the eager model
    model = vitlab.load_model(model_dir).eval()  # eval: the stem's BatchNorm uses its running statistics
    from vitlab.data.augment import EvalTransform
    from vitlab.data.folders import decode_image
    files = sorted(images.rglob("*.png"))
    x, _ = EvalTransform(model.config)(torch.from_numpy(np.stack([decode_image(f, 16, 3) for f in files])))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"pixels": x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (36, 3) and np.abs(got - want).max() <= 1e-4 and np.abs(want).max() > 0.1
    # predict: same rows from PyTorch and from onnxruntime, in every format
    assert main(["predict", str(model_dir), str(images), "--format", "json", "--topk", "3", "--backend", "torch"]) == 0
    torch_rows = json.loads(capsys.readouterr().out)
    assert main(["predict", str(out), str(images), "--format", "json", "--topk", "3"]) == 0
    ort_rows = json.loads(capsys.readouterr().out)
    assert len(torch_rows) == 36 and [r["file"] for r in ort_rows] == [r["file"] for r in torch_rows]
    for a, b in zip(torch_rows, ort_rows):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert max(abs(s["prob"] - t["prob"]) for s, t in zip(a["top"], b["top"])) < 1e-5


def test_a_fixed_batch_export_still_predicts_any_number_of_images(tmp_path, images, capsys):
    model_dir = saved_model(tmp_path / "m")
    out = tmp_path / "fixed.onnx"
    assert main(["export", str(model_dir), "--out", str(out), "--opset", "14"]) == 0
    capsys.readouterr()
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["input"]["shape"][0] == 1 and set(side["parity_fp32"]) == {"batch1"} and side["opset"] == 14
    assert side["parity_fp32"]["batch1"]["images"] == 32  # random inputs, one at a time
    assert main(["predict", str(out), str(images), "--format", "csv", "--backend", "onnxruntime"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + 36 * 3  # header + top-3 per image
    # the batch-1 graph runs image by image, each image its own answer
    assert main(["predict", str(out), str(images), "--format", "json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert main(["predict", str(model_dir), str(images), "--format", "json", "--backend", "torch"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert len({tuple(t["prob"] for t in r["top"]) for r in got}) > 1
    for a, b in zip(want, got):
        assert a["file"] == b["file"] and [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert max(abs(s["prob"] - t["prob"]) for s, t in zip(a["top"], b["top"])) < 1e-5


def test_int8_is_smaller_and_reports_its_difference(tmp_path, images):
    model_dir = saved_model(tmp_path / "m", embed_dim=128, depth=2, num_heads=4)
    out = tmp_path / "q.onnx"
    assert main(["export", str(model_dir), "--int8", "--out", str(out), "--dynamic-batch", "--images",
                 str(images)]) == 0
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["int8"] is True and side["bytes"] < 0.5 * side["fp32_bytes"]
    assert out.stat().st_size == side["bytes"]
    q = side["parity_int8"]["batch32"]
    assert 0 < q["max_abs_diff"] < 1.0 and 0 <= q["top1_agreement"] <= 1
    assert listing(tmp_path) == ["m", "q.onnx", "q.onnx.json"]  # no temporary file left


def test_torchscript_export_loads_and_matches(tmp_path, images):
    model_dir = saved_model(tmp_path / "m", **LAYOUTS["gap_stem"])
    assert main(["export", str(model_dir), "--format", "torchscript"]) == 0
    out = model_dir / "model.torchscript.pt"
    loaded = torch.jit.load(str(out))
    model = vitlab.load_model(model_dir).eval()
    x = ex.sample_inputs(model.config, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)
    assert json.loads(Path(str(out) + ".json").read_text())["format"] == "torchscript"


@pytest.mark.parametrize("args, message", [
    (["--int8", "--format", "torchscript"], "--int8 is dynamic quantisation of an ONNX graph"),
    (["--opset", "9"], "--opset 9 must be in [14, "),
    (["--opset", "999"], "--opset 999 must be in [14, "),
    (["--out", "{tmp}/x.pt"], "should end in .onnx"),
    (["--out", "{tmp}/nowhere/x.onnx"], "does not exist"),
    (["--out", "{tmp}/taken.onnx"], "exists; vitlab export never writes over a file"),
    (["--out", "{tmp}/side.onnx"], "exists; vitlab export never writes over a file"),
    (["--out", "{tmp}/dangling.onnx"], "exists; vitlab export never writes over a file"),
])
def test_bad_exports_are_one_line_errors_that_write_nothing(tmp_path, capsys, args, message):
    model_dir = saved_model(tmp_path / "m")
    (tmp_path / "taken.onnx").write_bytes(b"mine")
    (tmp_path / "side.onnx.json").write_text("mine")
    (tmp_path / "dangling.onnx").symlink_to(tmp_path / "nowhere.onnx")
    before = listing(tmp_path), listing(model_dir)
    code = main(["export", str(model_dir), *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (listing(tmp_path), listing(model_dir)) == before
    assert (tmp_path / "taken.onnx").read_bytes() == b"mine"


def test_an_export_that_fails_its_parity_check_leaves_no_file(tmp_path, monkeypatch, capsys):
    model_dir = saved_model(tmp_path / "m")
    real = ex.ort_session

    class Off:  # onnxruntime's answers, slightly wrong
        def __init__(self, s):
            self.s = s

        def run(self, names, feeds):
            return [self.s.run(names, feeds)[0] + 1e-3]
    monkeypatch.setattr(ex, "ort_session", lambda path, threads=None: Off(real(path, threads)))
    before = listing(model_dir)
    assert main(["export", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert re.search(r"differ from PyTorch's by 0\.00(1|099)", err) and "nothing was written" in err
    assert listing(model_dir) == before  # no model.onnx, no sidecar, no temporary file


def test_predict_on_a_model_directory_runs_onnxruntime_through_a_cached_export(tmp_path, images, capsys,
                                                                              monkeypatch):
    import vitlab.weights.export as ex
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    model_dir = saved_model(tmp_path / "m")
    before = listing(model_dir)
    made = []
    real_export = ex.export_model
    monkeypatch.setattr(ex, "export_model", lambda *a, **k: made.append(1) or real_export(*a, **k))
    (tmp_path / "text.png").write_text("not an image")  # nothing to predict: one line, and no export for it
    assert main(["predict", str(model_dir), str(tmp_path / "text.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no image to predict" in err and made == []
    assert main(["predict", str(model_dir), str(images), "--format", "json", "--topk", "3"]) == 0  # auto
    auto_rows = json.loads(capsys.readouterr().out)
    assert made == [1] and len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
    assert listing(model_dir) == before  # nothing written beside the model
    assert main(["predict", str(model_dir), str(images), "--format", "json", "--topk", "3",
                 "--backend", "onnxruntime"]) == 0
    assert json.loads(capsys.readouterr().out) == auto_rows and made == [1]  # the cached export, reused
    assert main(["predict", str(model_dir), str(images), "--format", "json", "--topk", "3", "--backend", "torch"]) == 0
    torch_rows = json.loads(capsys.readouterr().out)
    for a, b in zip(torch_rows, auto_rows):
        assert [t["label"] for t in a["top"]] == [t["label"] for t in b["top"]]
        assert max(abs(s["prob"] - t["prob"]) for s, t in zip(a["top"], b["top"])) < 1e-5
    # new weights, a new export
    os.utime(model_dir / "model.safetensors", ns=(1, 1))
    assert main(["predict", str(model_dir), str(images), "--topk", "1"]) == 0
    assert made == [1, 1]


def test_predict_backend_mistakes(tmp_path, images, capsys):
    model_dir = saved_model(tmp_path / "m")
    assert main(["export", str(model_dir)]) == 0
    capsys.readouterr()
    assert main(["predict", str(model_dir / "model.onnx"), str(images), "--backend", "torch"]) == 2
    assert "is an ONNX file: use --backend onnxruntime" in capsys.readouterr().err
    Path(str(model_dir / "model.onnx") + ".json").unlink()
    assert main(["predict", str(model_dir / "model.onnx"), str(images)]) == 2
    assert "no sidecar model.onnx.json" in capsys.readouterr().err


def test_predict_in_bf16_runs_pytorch_under_autocast(tmp_path, images, capsys, monkeypatch):
    from vitlab.errors import ConfigError
    from vitlab.predict import predict
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path / "cache"))
    model_dir = saved_model(tmp_path / "m")
    assert main(["predict", str(model_dir), str(images), "--format", "json", "--topk", "3", "--backend", "torch"]) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert main(["predict", str(model_dir), str(images), "--format", "json", "--topk", "3",
                 "--precision", "bf16"]) == 0  # backend auto: PyTorch, since onnxruntime runs an fp32 export
    bf16 = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "cache").exists()  # no export made for a bf16 run
    diffs = []
    for a, b in zip(fp32, bf16):
        assert a["file"] == b["file"]
        mine = {t["label"]: t["prob"] for t in b["top"]}
        diffs += [abs(t["prob"] - mine[t["label"]]) for t in a["top"] if t["label"] in mine]
    assert len(diffs) >= 2 * len(fp32)
    assert max(diffs) < 0.03  # bf16 rounding, not another model
    assert max(diffs) > 1e-5  # ... but bf16 really ran: fp32 reruns agree to ~1e-7
    model = vitlab.load_model(model_dir)
    rows, _ = predict(model, [str(images)], topk=3, precision="bf16")  # the library gives the CLI's answers
    assert [[t["prob"] for t in r["top"]] for r in rows] == [[t["prob"] for t in r["top"]] for r in bf16]
    with pytest.raises(ConfigError, match=r"precision 'fp16' must be one of \('fp32', 'bf16'\)"):
        predict(model, [str(images)], precision="fp16")
    assert main(["export", str(model_dir)]) == 0
    capsys.readouterr()
    with pytest.raises(ConfigError, match="an exported OnnxModel runs in the precision it was exported in"):
        predict(ex.OnnxModel(model_dir / "model.onnx"), [str(images)], precision="bf16")
    for target, bad, message in (
            (model_dir, ["--backend", "onnxruntime"], "--precision bf16 runs the model on PyTorch, --backend "
                                                      "onnxruntime on an fp32 export: use --backend torch or auto"),
            (model_dir / "model.onnx", [], f"{model_dir / 'model.onnx'} is an ONNX export, which runs in the "
                                           f"precision it was exported in")):
        refusal(main(["predict", str(target), str(images), "--precision", "bf16", *bad]), capsys.readouterr().err,
                message)


def test_bf16_without_bf16_units_warns_once_and_still_answers(tmp_path, images, capsys, monkeypatch):
    import vitlab.engine.runtime as runtime
    monkeypatch.setattr(runtime, "fast_bf16_available", lambda device_type: False)  # as on an AVX2-only CPU
    model_dir = saved_model(tmp_path / "m")
    with pytest.warns(UserWarning, match="this cpu has no bf16 units: bf16 is emulated and slower") as record:
        assert main(["predict", str(model_dir), str(images), "--precision", "bf16", "--format", "json"]) == 0
    assert sum("no bf16 units" in str(w.message) for w in record) == 1  # once (the CLI prints it as one line)
    assert len(json.loads(capsys.readouterr().out)) == 36  # and every image still answered
