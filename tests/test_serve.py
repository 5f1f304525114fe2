"""`vitlab serve` over real HTTP on a free loopback port: answers equal `vitlab predict`'s, alone and
batched; every bad request gets a 4xx JSON error naming it; a full queue answers 503 + Retry-After, a
slow answer 504; metrics; SIGTERM finishes the request in flight; the page in headless Chromium."""
import http.client
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

import vitlab  # noqa: E402
from vitlab.predict import predict  # noqa: E402
from vitlab.serve import ServeSettings, create_app  # noqa: E402
from vitlab.weights.modeldir import save_model  # noqa: E402

from conftest import randomize, tiny_config  # noqa: E402

CLASSES = ("ant", "bee", "cat", "dog", "emu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = randomize(vitlab.VisionTransformer(tiny_config(class_names=CLASSES, conv_stem=(8,))), seed=3)
    path = tmp_path_factory.mktemp("m") / "model"
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    out = []
    for i in range(24):
        h, w = rng.integers(20, 60, 2)
        p = root / f"{i:02d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


class Server:
    """The app on uvicorn in a thread, on a loopback port the OS chose."""

    def __init__(self, model, **settings):
        self.settings = ServeSettings(**settings)
        app = create_app(model, self.settings, getattr(model, "backend", "torch"), "test-model")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                chunked: bool = False):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, dict(resp.getheaders()), data

    def post_image(self, path: Path, query: str = "", multipart: bool = False):
        data = path.read_bytes()
        if multipart:
            boundary = "vitlabtestboundary"
            body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
                    f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
            headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        else:
            body, headers = data, {"Content-Type": "image/png" if path.suffix == ".png" else "image/jpeg"}
        status, h, out = self.request("POST", "/v1/predict" + query, body, headers)
        return status, h, json.loads(out)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(vitlab.load_model(model_dir).eval(), max_batch=8, max_wait_ms=30, max_upload_mb=0.25)
    yield s
    s.close()


def test_jobs_whose_request_has_gone_take_no_place_in_a_batch():
    from concurrent.futures import Future
    from vitlab.serve import Batcher, Job
    from vitlab.serve_io import Metrics
    model = vitlab.create_model(tiny_config()).eval()
    sizes = []
    forward = model.forward
    model.forward = lambda x: sizes.append(len(x)) or forward(x)
    batcher = Batcher(model, ServeSettings(max_batch=4, max_wait_ms=2000, max_queue=8), Metrics())
    image = np.zeros((3, 16, 16), np.uint8)
    gone = [Future() for _ in range(2)]
    for f in gone:
        f.cancel()  # as the server does when a request times out
    live = [Future() for _ in range(4)]
    for f in gone + live:
        batcher.submit(Job("predict", image, f))
    assert all(f.result(timeout=30)[1] == 4 for f in live)
    batcher.close()
    assert sizes == [4] and batcher.waiting == 0  # one full batch of the four live jobs


def expected(model_dir, files, topk=3):
    rows, failed = predict(vitlab.load_model(model_dir), [str(f) for f in files], topk=topk)
    assert not failed
    return {Path(r["file"]).name: r["top"] for r in rows}


def same_answer(got: dict, want: list[dict]) -> None:
    assert got["label"] == want[0]["label"] and got["index"] == want[0]["index"]
    assert [name for name, _ in got["topk"]] == [t["label"] for t in want]
    np.testing.assert_allclose([p for _, p in got["topk"]], [t["prob"] for t in want], rtol=0, atol=1e-6)


def test_one_image_raw_or_multipart_answers_as_predict(server, model_dir, images):
    want = expected(model_dir, images[:2])
    for f in images[:2]:
        for multipart in (False, True):
            status, _, got = server.post_image(f, "?topk=3", multipart)
            assert status == 200, got
            same_answer(got, want[f.name])
            assert got["model"] and got["latency_ms"] > 0 and got["batch_size"] >= 1


def test_concurrent_requests_are_batched_and_answer_as_predict(server, model_dir, images):
    want = expected(model_dir, images)
    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(lambda f: server.post_image(f, "?topk=3"), images))
    assert all(status == 200 for status, _, _ in answers)
    for f, (_, _, got) in zip(images, answers):
        same_answer(got, want[f.name])
    assert max(got["batch_size"] for _, _, got in answers) > 1  # grouped into shared forward passes
    status, _, text = server.request("GET", "/metrics")
    metrics = text.decode()
    assert status == 200 and 'vitlab_requests_total{endpoint="/v1/predict",status="200"}' in metrics
    assert 'vitlab_batch_size_bucket{le="1"}' in metrics and "vitlab_batch_size_count" in metrics
    assert 'vitlab_request_latency_seconds_bucket{endpoint="/v1/predict",le="+Inf"}' in metrics
    assert "vitlab_queue_depth 0" in metrics


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds one tiny compressed row: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


BAD = [
    ("empty body", "POST", "/v1/predict", b"", {"Content-Type": "image/png"}, 400, "empty body"),
    ("text as an image", "POST", "/v1/predict", b"hello, I am text", {"Content-Type": "image/png"}, 400,
     "not a usable image: not an image file"),
    ("text/plain", "POST", "/v1/predict", b"hello", {"Content-Type": "text/plain"}, 415,
     "unsupported content type 'text/plain'"),
    ("JSON", "POST", "/v1/predict", b'{"image": 1}', {"Content-Type": "application/json"}, 415,
     "unsupported content type 'application/json'"),
    ("decompression bomb", "POST", "/v1/predict", _png_header(10000, 10000), {"Content-Type": "image/png"}, 413,
     "image of 10000x10000 = 100,000,000 pixels exceeds the 64,000,000-pixel limit"),
    ("huge bomb", "POST", "/v1/predict", _png_header(30000, 30000), {"Content-Type": "image/png"}, 413,
     "could be decompression bomb"),
    ("sliver", "POST", "/v1/predict", _png_header(100000, 10), {"Content-Type": "image/png"}, 413,
     "beyond the 50:1 limit"),
    ("oversize upload", "POST", "/v1/predict", b"\0" * 300_000, {"Content-Type": "image/png"}, 413,
     "upload of 300,000 bytes exceeds the 262,144-byte limit"),
    ("multipart without a file", "POST", "/v1/predict", b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1"
     b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 400, "the multipart form has no file"),
    ("too many parts", "POST", "/v1/predict", b"--b\r\n\r\nx\r\n" * 40 + b"--b--\r\n",
     {"Content-Type": "multipart/form-data; boundary=b"}, 400, "the multipart form has more than 16 parts"),
    ("nested parts", "POST", "/v1/predict", b"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\n" +
     b"--c\r\n" * 5000 + b"\r\n--b--\r\n", {"Content-Type": "multipart/form-data; boundary=b"}, 400,
     "the multipart form has no file"),
    ("no boundary", "POST", "/v1/predict", b"x", {"Content-Type": "multipart/form-data"}, 400,
     "without a boundary parameter"),
    ("topk 0", "POST", "/v1/predict?topk=0", None, {"Content-Type": "image/png"}, 400, "topk=0 must be >= 1"),
    ("topk text", "POST", "/v1/predict?topk=many", None, {"Content-Type": "image/png"}, 400, "bad parameter topk"),
    ("unknown method", "POST", "/v1/attention?method=magic", None, {"Content-Type": "image/png"}, 400,
     "method='magic' must be one of rollout, raw, gradient"),
    ("unknown endpoint", "GET", "/v1/nothing", None, {}, 404, "no endpoint '/v1/nothing'"),
    ("a server path", "GET", "/../../etc/passwd", None, {}, 404, "no endpoint"),
    ("wrong method", "GET", "/v1/predict", None, {}, 405, "GET is not allowed on /v1/predict"),
    ("wrong method 2", "DELETE", "/v1/model", None, {}, 405, "DELETE is not allowed on /v1/model"),
]


@pytest.mark.parametrize("what, method, path, body, headers, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_json_error_naming_the_problem(server, images, what, method, path, body, headers,
                                                              status, message):
    if body is None and method == "POST":
        body = images[1].read_bytes()
    got, h, data = server.request(method, path, body, headers)
    assert got == status, data
    assert h.get("content-type", "").startswith("application/json")
    assert message in json.loads(data)["error"]


def test_a_truncated_image_and_an_oversize_chunked_upload(server, images):
    data = images[1].read_bytes()
    status, _, out = server.request("POST", "/v1/predict", data[: len(data) // 2], {"Content-Type": "image/png"})
    assert status == 400 and "not a usable image" in json.loads(out)["error"]
    chunks = (b"\0" * 65536 for _ in range(6))  # no Content-Length: counted as it arrives
    status, _, out = server.request("POST", "/v1/predict", chunks, {"Content-Type": "image/png"}, chunked=True)
    assert status == 413 and "upload exceeds the 262,144-byte limit" in json.loads(out)["error"]
    status, _, _ = server.post_image(images[0])  # and the server goes on
    assert status == 200


def test_model_health_attention_and_no_cors_by_default(server, images):
    status, _, data = server.request("GET", "/v1/model")
    info = json.loads(data)
    assert status == 200 and info["classes"] == list(CLASSES) and info["preprocessing"]["img_size"] == 16
    assert info["batching"]["max_batch"] == 8 and info["backend"] == "torch"
    status, _, data = server.request("GET", "/healthz")
    assert status == 200 and json.loads(data)["status"] == "ok"
    for method in ("rollout", "raw", "gradient"):
        status, h, png = server.request("POST", f"/v1/attention?method={method}", images[1].read_bytes(),
                                        {"Content-Type": "image/png", "Origin": "http://evil.example"})
        assert status == 200 and h["content-type"] == "image/png" and png.startswith(b"\x89PNG")
        assert Image.open(io.BytesIO(png)).size == (224, 224)
        assert "access-control-allow-origin" not in {k.lower() for k in h}
    status, _, page = server.request("GET", "/")
    assert status == 200 and b"<title>vitlab" in page
    assert b"http://" not in page and b"https://" not in page  # nothing fetched from elsewhere


class SlowModel:
    """A stand-in model whose forward pass takes `seconds`."""

    def __init__(self, model, seconds: float):
        self.model, self.seconds, self.config = model, seconds, model.config

    def __call__(self, x):
        time.sleep(self.seconds)
        return self.model(x)


def test_a_full_queue_answers_503_with_retry_after_and_a_slow_answer_504(model_dir, images):
    model = vitlab.load_model(model_dir).eval()
    s = Server(SlowModel(model, 0.4), max_batch=1, max_wait_ms=0, max_queue=2, timeout_s=5)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda f: s.post_image(f), images[:8]))
        codes = sorted(status for status, _, _ in answers)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        busy = next((h, body) for status, h, body in answers if status == 503)
        assert busy[0]["retry-after"] == "1" and "busy: 2 image requests are already in progress" in busy[1]["error"]
    finally:
        s.close()
    s = Server(SlowModel(model, 1.0), max_batch=1, max_wait_ms=0, timeout_s=0.3)
    try:
        status, _, body = s.post_image(images[0])
        assert status == 504 and "no answer within 0.3 s" in body["error"]
    finally:
        s.close()


class BrokenModel(SlowModel):
    def __call__(self, x):
        raise RuntimeError("weights on fire")


def test_a_failing_model_a_stalled_body_are_json_errors_and_counted(model_dir, images):
    s = Server(BrokenModel(vitlab.load_model(model_dir).eval(), 0), timeout_s=1.0, max_wait_ms=0)
    try:
        status, _, body = s.post_image(images[0])
        assert status == 500 and body["error"] == "the model failed: RuntimeError: weights on fire"
        # a client that announces 1000 bytes and sends 10: 408 when the request's time is up
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"\0" * 10)
        answer = ""
        while not answer.rstrip().endswith("}"):  # the JSON body may come in a later packet
            chunk = sock.recv(65536).decode("latin-1")
            if not chunk:
                break
            answer += chunk
        sock.close()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer, answer
        _, _, text = s.request("GET", "/metrics")
        assert 'vitlab_requests_total{endpoint="/v1/predict",status="500"} 1' in text.decode()
        assert 'vitlab_requests_total{endpoint="/v1/predict",status="408"} 1' in text.decode()
    finally:
        s.close()


def test_cors_only_for_the_origins_given(model_dir):
    s = Server(vitlab.load_model(model_dir).eval(), cors=("http://app.example",))
    try:
        _, h, _ = s.request("GET", "/v1/model", headers={"Origin": "http://app.example"})
        assert h.get("access-control-allow-origin") == "http://app.example"
        _, h, _ = s.request("GET", "/v1/model", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in h
    finally:
        s.close()


def test_an_onnx_export_is_served_alike(model_dir, images, tmp_path):
    pytest.importorskip("onnxruntime")
    from vitlab.weights.export import OnnxModel, export_model
    export_model(vitlab.load_model(model_dir), tmp_path / "m.onnx", "onnx", dynamic_batch=True)
    onnx = OnnxModel(tmp_path / "m.onnx")
    onnx.backend = "onnxruntime"
    s = Server(onnx, max_batch=4, max_wait_ms=20)
    try:
        want = expected(model_dir, images[:4])
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda f: s.post_image(f, "?topk=3"), images[:4]))
        for f, (status, _, got) in zip(images[:4], answers):
            assert status == 200
            assert got["label"] == want[f.name][0]["label"]
            np.testing.assert_allclose([p for _, p in got["topk"]], [t["prob"] for t in want[f.name]], atol=1e-5)
        status, _, body = s.request("POST", "/v1/attention", images[0].read_bytes(), {"Content-Type": "image/png"})
        assert status == 501 and "attention maps need the PyTorch model" in json.loads(body)["error"]
    finally:
        s.close()
    from vitlab.errors import ConfigError
    with pytest.raises(ConfigError, match="precision bf16 runs a PyTorch model; an exported OnnxModel runs in"):
        create_app(onnx, ServeSettings(precision="bf16"), "onnxruntime")


def test_bf16_predictions_answer_as_predict_in_bf16(model_dir, images):
    from vitlab.errors import ConfigError
    with pytest.raises(ConfigError, match=r"--precision 'fp16' must be one of \('fp32', 'bf16'\)"):
        ServeSettings(precision="fp16")
    model = vitlab.load_model(model_dir).eval()
    want = {f.name: predict(model, [str(f)], topk=3, precision="bf16")[0][0]["top"] for f in images[:4]}
    fp32 = expected(model_dir, images[:4])
    s = Server(model, max_batch=1, max_wait_ms=0, precision="bf16")  # one image a pass, as predict above
    try:
        status, _, info = s.request("GET", "/v1/model")
        assert status == 200 and json.loads(info)["precision"] == "bf16"
        moved = 0.0
        for f in images[:4]:
            status, _, got = s.post_image(f, "?topk=3")
            assert status == 200, got
            probs = dict(got["topk"])
            same_answer(got, want[f.name])  # as predict in bf16 ...
            moved = max(moved, *(abs(probs.get(t["label"], 0) - t["prob"]) for t in fp32[f.name]))
        assert moved > 1e-5  # ... and not fp32's answers
        status, _, body = s.request("POST", "/v1/attention", images[0].read_bytes(), {"Content-Type": "image/jpeg"})
        assert status == 200 and body[:4] == b"\x89PNG"  # maps still work (in fp32)
    finally:
        s.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_the_request_in_flight(model_dir, images):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", str(model_dir), "--port", str(port),
                             "--max-wait-ms", "1500"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
                time.sleep(0.1)
        result = {}

        def call():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/predict", images[0].read_bytes(), {"Content-Type": "image/jpeg"})
            resp = conn.getresponse()
            result["status"], result["body"] = resp.status, json.loads(resp.read())
        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)  # the request now waits in the batcher (1.5 s for company)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result.get("status") == 200, result
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_cli_checks_settings_and_binds_to_loopback(model_dir, capsys):
    from vitlab.cli import build_parser, main
    args = build_parser().parse_args(["serve", str(model_dir)])
    assert args.host == "127.0.0.1" and args.cors == []
    assert main(["serve", str(model_dir), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch 0 must be in [1, 1024]" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", str(model_dir.parent / "nothing")]) == 2
    assert main(["serve", str(model_dir), "--timeout", "0.01", "--max-wait-ms", "50"]) == 2
    assert "--timeout 0.01 s must be longer than --max-wait-ms 50" in capsys.readouterr().err
    assert main(["serve", str(model_dir / "model.onnx"), "--precision", "bf16"]) == 2  # refused before loading
    assert "runs a PyTorch model" in capsys.readouterr().err


def _driver():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_the_page_classifies_an_upload_in_headless_chromium(server, model_dir, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver = _driver()
    try:
        driver.get(f"http://127.0.0.1:{server.port}/")
        WebDriverWait(driver, 20).until(lambda d: "classes" in d.find_element(By.ID, "about").text)
        driver.find_element(By.ID, "file").send_keys(str(images[3]))
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "top1").text not in ("–", "…", ""))
        top1 = driver.find_element(By.ID, "top1").text
        want = expected(model_dir, [images[3]])[images[3].name][0]["label"]
        assert top1.startswith(want + " ("), (top1, want)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#bars li")) == 5
        WebDriverWait(driver, 30).until(lambda d: (d.find_element(By.ID, "attn").get_attribute("src") or "").startswith("blob:"))
        shot = Path(os.environ.get("VITLAB_SCREENSHOT_DIR", tmp_path)) / "serve_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 1000
        # a file that is not an image: the page says so
        bad = tmp_path / "notes.png"
        bad.write_text("not an image")
        driver.find_element(By.ID, "file").send_keys(str(bad))
        WebDriverWait(driver, 20).until(lambda d: "Could not classify it" in d.find_element(By.ID, "error").text)
        assert "not a usable image" in driver.find_element(By.ID, "error").text
    finally:
        driver.quit()
