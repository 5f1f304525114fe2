"""vitlab.report: one self-contained HTML page per run. A tiny run trains in seconds on a folder
whose class names need escaping; the page is checked for every section, nothing external, escaped
names, decodable images, numbers that agree with `evaluate`, and (where Chromium is installed) a
real render on a phone-sized and a desktop-sized window."""
import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitlab.data.augment import EvalTransform
from vitlab.data.loader import BatchLoader
from vitlab.engine.args import load_run_config
from vitlab.engine.runtime import setup_runtime
from vitlab.errors import ConfigError, RunDirError
from vitlab.evaluate import evaluate
from vitlab.report import SECTIONS, mistake_cards, predict_split, split_metrics, write_report
from vitlab.train import train

from conftest import write_shapes
from vitlab.weights.modeldir import load_model, recorded_dataset

CLASSES = ("<script>", "a&b", "dots")  # folder names are untrusted text
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run on 16-px stripe / dot patterns (as tests/test_train.py's `shapes`)."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    write_shapes(root, CLASSES, 30)
    sets = {"data.name": str(root), "model.preset": "vit_micro_patch4_32", "model.img_size": 16,
            "model.depth": 2, "model.embed_dim": 32, "model.num_heads": 2, "train.batch_size": 16,
            "train.epochs": 3, "optim.lr": 0.005, "augment.flip": False, "runtime.progress": False,
            "runtime.precision": "fp32", "train.log_every": 2, "augment.crop_pad": 0,
            "train.resolution_schedule": "null"}
    out = tmp_path_factory.mktemp("runs") / "run"
    train(load_run_config("cifar10", [f"{k}={v}" for k, v in sets.items()]), out)
    return out


def data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in DATA_URI.findall(page)]


def test_report_has_every_section_inline_and_escaped(run, tmp_path):
    path = write_report(run, tmp_path / "r.html", mistakes=4)
    page = path.read_text()
    for sid in SECTIONS:
        assert page.count(f'<section id="{sid}">') == 1, sid
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "http://" not in page and "https://" not in page
    assert 'src="/' not in page and "url(" not in page and "<link" not in page.lower()
    assert len(re.findall(r'src="', page)) == len(DATA_URI.findall(page))  # every src is a PNG data URI
    assert "<script" not in page.lower()  # no JavaScript, and the class named <script> is text
    assert "&lt;script&gt;" in page and "a&amp;b" in page
    images = data_uris(page)
    # 3 curves, confusion, reliability, 3 inspect views, and every mistake card (image + overlay)
    assert len(images) >= 8
    for data in images:
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.format == "PNG" and min(im.size) > 10
    assert "Not evaluated" not in page and "unavailable" not in page
    for sid in ("curves", "per-class", "confusion", "calibration", "inspect"):
        body = page.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert 'src="data:image/png' in body or sid == "per-class", sid


def test_report_numbers_agree_with_evaluate(run):
    model = load_model(run / "model")
    data = recorded_dataset(run / "model", model, "test")
    rt = setup_runtime("cpu", "fp32")
    preds = predict_split(model, data, rt, batch_size=7)  # batches of unequal size
    m = split_metrics(preds, data.labels, len(data.classes))
    ref = evaluate(model, BatchLoader(data, 5, False, EvalTransform(model.config)), len(data.classes), rt)
    assert m["n"] == ref["n"] == len(data)
    assert m["top1"] == pytest.approx(ref["top1"], abs=1e-12)
    assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert m["confusion"] == ref["confusion"]
    assert m["per_class"] == pytest.approx(ref["per_class"])
    rel = m["reliability"]
    assert rel["ece"] == pytest.approx(ref["ece"], abs=1e-6) and sum(rel["count"]) == len(data)
    page = write_report(run, run / "again.html", mistakes=0, device="cpu", precision="fp32").read_text()
    assert f"top-1 <b>{100 * ref['top1']:.2f}%</b>" in page and f"ECE {100 * ref['ece']:.2f}%" in page


def test_mistakes_are_the_most_confident_wrong_predictions(run):
    model = load_model(run / "model")
    data = recorded_dataset(run / "model", model, "test")
    n = len(data)
    y = data.labels
    wrong_pred = (y + 1) % 3
    # hand-made predictions: images 0, 2, 4, ... wrong, with confidence rising with the index
    pred = torch.where(torch.arange(n) % 2 == 0, wrong_pred, y)
    conf = torch.linspace(0.4, 0.9, n)
    out = {"conf": conf, "pred": pred, "p_true": torch.full((n,), 0.1)}
    cards, why = mistake_cards(model, data, out, 3, setup_runtime("cpu", "fp32"))
    assert why == ""
    wrong = [i for i in range(n) if i % 2 == 0]
    assert [c["index"] for c in cards] == sorted(wrong, reverse=True)[:3]
    for c in cards:
        assert c["true"] == data.classes[int(y[c["index"]])] and c["pred"] == data.classes[int(wrong_pred[c["index"]])]
        assert c["conf"] == pytest.approx(float(conf[c["index"]]))
        for key in ("image", "overlay"):
            with Image.open(io.BytesIO(c[key])) as im:
                assert im.format == "PNG" and im.size[0] >= 112  # enlarged from 16 px
        assert c["image"] != c["overlay"]


def test_missing_dataset_or_model_still_writes_the_page(run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "*.html"))
    doc = json.loads((moved / "model" / "config.json").read_text())
    doc["extra"]["dataset"]["name"] = str(tmp_path / "nowhere")
    (moved / "model" / "config.json").write_text(json.dumps(doc))
    page = write_report(moved).read_text()  # default path: RUN/report.html
    assert (moved / "report.html").is_file()
    for sid in ("per-class", "confusion", "calibration", "mistakes"):
        body = page.split(f'<section id="{sid}">')[1].split("</section>")[0]
        assert "Not evaluated" in body and "nowhere" in body, sid
    inspect = page.split('<section id="inspect">')[1].split("</section>")[0]
    assert "noise" in inspect and 'src="data:image/png' in inspect  # the model is still inspected

    shutil.rmtree(moved / "model")
    page = write_report(moved, tmp_path / "nomodel.html").read_text()
    assert all(f'<section id="{sid}">' in page for sid in SECTIONS)
    assert page.count("does not exist yet") == 5  # four evaluation sections and inspect
    assert 'src="data:image/png' in page.split('<section id="curves">')[1].split("</section>")[0]


def test_bad_arguments_are_one_line_errors(run, tmp_path):
    with pytest.raises(RunDirError, match="not a directory"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="not a vitlab run directory"):
        write_report(tmp_path / "empty")
    with pytest.raises(ConfigError, match="'dev'"):
        write_report(run, tmp_path / "x.html", split="dev")
    with pytest.raises(ConfigError, match="limit 0"):
        write_report(run, tmp_path / "x.html", limit=0)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render(browser: str, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--no-first-run", "--disable-extensions", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_headless_chromium(run, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("no `chromium` or `chromium-browser` on PATH (Debian: apt-get install chromium; "
                    ".ci/run installs it when it can)")
    path = write_report(run, tmp_path / "report.html", limit=30, mistakes=4)
    url = path.resolve().as_uri()
    dom = _render(browser, ["--dump-dom", url])
    assert dom.returncode == 0, dom.stderr[-2000:]
    for sid in SECTIONS:
        assert f'id="{sid}"' in dom.stdout, sid
    assert len(re.findall(r"<img ", dom.stdout)) >= 8
    for name, size in (("phone", "390,844"), ("desktop", "1280,900")):
        shot = tmp_path / f"{name}.png"
        r = _render(browser, [f"--screenshot={shot}", f"--window-size={size}", url])
        assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
        with Image.open(shot) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.shape[:2] == tuple(int(v) for v in reversed(size.split(",")))
        assert pixels.std() > 5 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, name  # not blank


def test_report_command_replaces_only_its_own_page(run, tmp_path, capsys):
    from vitlab.cli import main
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(out), "--limit", "30", "--mistakes", "2"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    first = out.read_text()
    assert main(["report", str(run), "--out", str(out), "--limit", "30", "--mistakes", "2"]) == 0  # its own page
    assert out.read_text() != first or "vitlab report" in first
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    assert main(["report", str(run), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "exists and is not a vitlab report" in err and "Traceback" not in err
    assert mine.read_text() == "<html>my notes</html>"
    assert main(["report", str(tmp_path / "missing")]) == 2
