import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import vitlab
from vitlab.cli import build_parser, main
from vitlab.engine.runtime import setup_runtime

from conftest import randomize, tiny_config, write_mnist_like


def run(*args):
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True)


# What each subcommand accepts, written out here rather than read from the parser, so that an
# option that disappears (or a subcommand that loses its table entry) fails a test.
OPTIONS = {
    "attention": ["--out", "--method", "--layer", "--head", "--head-fusion", "--discard-ratio", "--class", "--format",
                  "--alpha", "--batch-size", "--device"],
    "inspect": ["--out", "--images", "--num-images", "--data-dir"],
    "report": ["--out", "--split", "--data-dir", "--limit", "--mistakes", "--device"],
    "bench": ["--set", "--batch", "--precision", "--attn", "--device", "--threads", "--rounds", "--steps", "--warmup",
              "--seed-vit", "--json"],
    "convert": ["--from", "--out", "--force", "--preset", "--num-heads", "--img-size", "--pool"],
    "data": ["--data-dir", "--force", "--quiet"],
    "eval": ["--data", "--data-dir", "--split", "--tta", "--tta-mode", "--batch-size", "--limit", "--device", "--precision", "--out",
             "--json"],
    "models": ["--json"],
    "predict": ["--topk", "--format", "--backend", "--precision"],
    "export": ["--format", "--out", "--dynamic-batch", "--opset", "--int8", "--images"],
    "train": ["--recipe", "--set", "--out", "--resume", "--help-recipe"],
    "serve": ["--host", "--port", "--max-batch", "--max-wait-ms", "--max-queue", "--max-upload-mb", "--timeout",
              "--cors", "--threads", "--precision"],
}


def test_the_subcommand_table():
    assert sorted(build_parser()._subparsers._group_actions[0].choices) == sorted(OPTIONS)


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


def test_top_level_help_and_version(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    listed = out.split("COMMAND", 1)[1]
    for name in OPTIONS:  # each subcommand with the first line of its function's docstring
        assert f"    {name} " in listed or f"    {name}\n" in listed, name  # long names: help on the next line
    assert "Top-k labels for image files or folders" in out
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vitlab {vitlab.__version__}"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_subcommand_help_lists_its_options(name, capsys):
    assert exit_code([name, "--help"]) == 0
    out = capsys.readouterr().out
    for option in OPTIONS[name]:
        assert f" {option}" in out, option
    # and every option that help shows is one the table above knows
    shown = {w.strip("[](),") for w in out.split() if w.lstrip("[(").startswith("--")}
    assert shown - {"--help"} == set(OPTIONS[name])


def test_resume_help_names_every_setting_a_resume_may_change():
    from vitlab.train import RESUMABLE_KEYS, RESUMABLE_SECTIONS
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    help_text = next(a.help for a in train._actions if a.dest == "resume")
    listed = help_text.split("may change only", 1)[1]
    named = {w.strip(",)") for w in listed.split() if "." in w}
    assert named == set(RESUMABLE_KEYS) | {f"{s}.*" for s in RESUMABLE_SECTIONS}


def test_unknown_or_missing_subcommand_is_a_usage_error(capsys):
    assert exit_code(["frobnicate"]) == 2
    out, err = capsys.readouterr()
    assert "invalid choice: 'frobnicate'" in err and out == ""
    assert exit_code([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_models_table_row(capsys):
    assert main(["models", "tiny_patch16"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["name", "img"]
    # timm's vit_tiny_patch16_224 has 5,717,416 parameters
    assert [row.split() for row in rows] == [
        ["vit_tiny_patch16_224", "224", "16", "3", "192", "12", "3", "token", "learn", "5.72"]]


def test_models_lists_presets_with_parameter_counts(capsys):
    assert main(["models", "base_patch16", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vit_base_patch16_224"]["params"] == 86_567_656
    assert "vit_tiny_patch4_32" not in rows


def test_usage_errors_exit_non_zero():
    r = run("convert", "x.pth", "--from", "onnx", "--out", "y")
    assert r.returncode == 2 and "invalid choice: 'onnx'" in r.stderr


def test_data_verify_exits_non_zero_on_a_bad_file(tmp_path):
    import shutil
    from conftest import SHARED
    if not (SHARED / "datasets" / "mnist").is_dir():
        pytest.skip("../shared/datasets not present")
    shutil.copytree(SHARED / "datasets" / "mnist", tmp_path / "mnist")
    ok = run("data", "verify", "mnist", "--data-dir", str(tmp_path))
    assert ok.returncode == 0 and "4 of 4 files verified" in ok.stdout
    f = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-1])
    bad = run("data", "verify", "mnist", "--data-dir", str(tmp_path))
    assert bad.returncode == 1
    assert "BAD train-labels-idx1-ubyte.gz" in bad.stdout and "expected d53e105ee54ea40749a09fcbcd1e9432" in bad.stdout
    assert "3 of 4 files verified" in bad.stdout


def test_data_list_and_unknown_name(tmp_path, monkeypatch):
    r = run("data", "list", "--data-dir", str(tmp_path))
    assert r.returncode == 0 and "cifar100" in r.stdout
    assert f"searched: {tmp_path}, " in r.stdout  # --data-dir first
    r = run("data", "verify", "imagenet", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "unknown dataset 'imagenet'" in r.stderr and "Traceback" not in r.stderr


# ---- vitlab eval on a tiny model and a folder of IDX files ----------------------------------------
@pytest.fixture
def eval_setup(tmp_path):
    """A random 10-class grey 28-px model and an IDX folder with 20 test images."""
    data = tmp_path / "digits"
    write_mnist_like(data, n_train=40, n_test=20, gz=False)
    model = randomize(vitlab.create_model(tiny_config(img_size=28, patch_size=7, in_chans=1, num_classes=10)))
    vitlab.save_model(model, tmp_path / "model")
    # the expected numbers, from the raw bytes: normalised with the model's mean/std (0.5, 0.5)
    raw = np.frombuffer((data / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(20, 1, 28, 28)
    x = (torch.from_numpy(raw.copy()).float() / 255 - 0.5) / 0.5
    y = torch.arange(20) % 10
    rt = setup_runtime("cpu")  # bf16 autocast where this CPU runs bf16 fast, as `vitlab eval` does
    with torch.no_grad(), rt.autocast():
        probs = model.eval()(x).float().softmax(-1)
    want = {"n": 20, "top1": (probs.argmax(-1) == y).float().mean().item(),
            "top5": (probs.topk(5).indices == y[:, None]).any(-1).float().mean().item(), "top5_k": 5,
            "loss": -probs[torch.arange(20), y].log().mean().item()}
    return tmp_path, want


def test_eval_prints_and_writes_the_metrics(eval_setup, capsys):
    tmp_path, want = eval_setup
    args = ["eval", str(tmp_path / "model"), "--data", str(tmp_path / "digits"), "--device", "cpu",
            "--out", str(tmp_path / "ev")]
    assert main(args + ["--json", "--precision", "fp32"]) == 0  # fp32: the eager model's numbers, to rounding
    fp32 = json.loads(capsys.readouterr().out)
    model = vitlab.load_model(tmp_path / "model")
    raw = np.frombuffer((tmp_path / "digits" / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8)
    with torch.no_grad():
        logp = model((torch.from_numpy(raw.reshape(20, 1, 28, 28).copy()).float() / 255 - 0.5) / 0.5).log_softmax(-1)
    assert fp32["precision"] == "fp32" and fp32["device"] == "cpu"
    assert fp32["loss"] == pytest.approx(-logp[torch.arange(20), torch.arange(20) % 10].mean().item(), rel=1e-5)
    assert main(args + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key, value in want.items():
        assert printed[key] == pytest.approx(value, rel=1e-4), key
    assert printed["split"] == "test" and printed["tta"] is None and len(printed["per_class"]) == 10
    assert printed["precision"] == setup_runtime("cpu").precision  # auto: what training would pick here
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == printed
    assert not [p.name for p in (tmp_path / "ev").iterdir() if p.name.startswith(".")]  # no temp files
    assert main(args[:-2] + ["--precision", "fp16"]) == 2  # fp16 is for CUDA: one line
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs a CUDA device" in err
    assert main(args) == 0
    first = capsys.readouterr().out.splitlines()[0].split()
    assert first[:4] == ["digits", "test:", "20", "images"]
    assert first[4::2] == ["top-1", "top-5", "loss", "ECE"]
    shown = dict(zip(("top1", "top5", "loss", "ece"), map(float, first[5::2])))
    for key in ("top1", "top5", "loss"):
        assert shown[key] == pytest.approx(want[key], abs=1.5e-4), key
    assert shown["ece"] == pytest.approx(printed["ece"], abs=1e-4)


def test_eval_top5_is_capped_at_the_class_count(tmp_path, capsys):
    data = tmp_path / "three"
    write_mnist_like(data, n_train=30, n_test=9, gz=False, classes=3)
    vitlab.save_model(vitlab.create_model(tiny_config(img_size=28, patch_size=7, in_chans=1, num_classes=3)),
                      tmp_path / "model")
    assert main(["eval", str(tmp_path / "model"), "--data", str(data), "--device", "cpu"]) == 0
    assert "top-3 1.0000" in capsys.readouterr().out  # every label is among all three classes


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit 0 must be >= 1"),
    (["--data", "DIGITS"], "has 10 classes but the model has 3 outputs"),
])
def test_eval_refuses_with_one_line(eval_setup, capsys, extra, message):
    tmp_path, _ = eval_setup
    vitlab.save_model(vitlab.create_model(tiny_config(img_size=28, patch_size=7, in_chans=1, num_classes=3)),
                      tmp_path / "three")
    extra = [str(tmp_path / "digits") if a == "DIGITS" else a for a in extra]
    assert main(["eval", str(tmp_path / "three"), "--data", str(tmp_path / "digits"), "--device", "cpu", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fold", [True, -1, 1.5, "1", None, 10**30])
def test_eval_of_a_model_with_a_malformed_validation_fold(eval_setup, capsys, fold):
    """A recorded fold that is not a whole number >= 0 is refused in one line, not read as fold 0 (whose
    images a model trained on another fold has partly trained on); a huge one is a data error."""
    tmp_path, _ = eval_setup
    cfg = tmp_path / "model" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["extra"] = {"dataset": {"name": str(tmp_path / "digits"), "val_fold": fold}}
    cfg.write_text(json.dumps(doc))
    rc = main(["eval", str(tmp_path / "model"), "--split", "val", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ("records the validation fold" in err and "config.json" in err) if fold != 10**30 else "fold 1000" in err
    doc["extra"]["dataset"]["val_fold"] = 1  # a good one: fold 1 of the 40 training images' 10% is read
    cfg.write_text(json.dumps(doc))
    assert main(["eval", str(tmp_path / "model"), "--split", "val", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4


def test_warnings_are_one_line_on_stderr(tmp_path):
    """A skipped file is a warning, printed as one line, not Python's file:line + source line."""
    from PIL import Image
    model = vitlab.create_model("vit_micro_patch4_32", num_classes=2, class_names=("a", "b"))
    vitlab.save_model(model, tmp_path / "model")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "data" / "a" / "broken.png").write_bytes(b"not an image")
    proc = run("eval", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--split", "train", "--json")
    assert proc.returncode == 0, proc.stderr
    warning_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warning_lines) == 1, proc.stderr
    assert warning_lines[0].startswith("vitlab eval: warning: ") and "broken.png" in warning_lines[0]


@pytest.mark.parametrize("record", ["cifar10", ["mnist"], {"name": 5}, {"name": "x", "val_size": "abc"}])
def test_eval_of_a_model_with_a_malformed_dataset_record(eval_setup, capsys, record):
    """config.json's extra.dataset is the user's file too: a wrong type is not a traceback."""
    tmp_path, _ = eval_setup
    cfg = tmp_path / "model" / "config.json"
    doc = json.loads(cfg.read_text())
    doc["extra"] = {"dataset": record}
    cfg.write_text(json.dumps(doc))
    rc = main(["eval", str(tmp_path / "model"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "does not record its dataset" in err or "'x'" in err
