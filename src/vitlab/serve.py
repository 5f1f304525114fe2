"""`vitlab serve`: a JSON HTTP API over a model, with dynamic batching, and a page to try it.

    vitlab serve runs/c10 --port 8000 --max-batch 16 --max-wait-ms 5

Endpoints (FastAPI on uvicorn, the `vitlab[serve]` extra):
- `POST /v1/predict?topk=5`: one image, as the raw body (`image/*` or `application/octet-stream`)
  or as the `file` field of a `multipart/form-data` body -> JSON {label, index, prob, topk: [[class,
  probability], ...], model, latency_ms, batch_size};
- `POST /v1/attention?method=rollout`: the same upload -> a PNG of the map over the image (raw,
  rollout or gradient: vitlab.attention.explain);
- `GET /v1/model`: config, classes, preprocessing, precision, batching and limits; `GET /healthz`;
- `GET /metrics`: Prometheus text (requests by endpoint and status, latency histogram, batch sizes,
  queue depth); `GET /`: the page (no network: everything it needs is in it).

Dynamic batching (`Batcher`): requests wait in one bounded queue; one thread takes the first and
whatever else arrives within `max_wait_ms`, up to `max_batch` images, and runs them as one forward
pass, decoded and normalised exactly as `vitlab predict` does. At most `max_queue` image requests are
admitted at once (being received, decoded, waiting or in the model): past it the answer is 503 with
Retry-After, before the body is read. A request has `timeout_s` in all (receiving, decoding,
waiting): past it, 408 while its body is still arriving, else 504. Uploads are read up to
`max_upload_mb` (413 past it), then decoded with predict's checks (pixel count, aspect ratio: a
decompression bomb is refused from its header), at most as many at once as there are cores. Every
error is JSON {"error": ...} naming the problem, an unexpected one included (500). The server binds to loopback unless told otherwise, never reads
a path from a request, and sends CORS headers only for the origins given with --cors.
"""

import asyncio
import contextlib
import io
import math
import os
import queue
import signal
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.augment import EvalTransform
from .engine.runtime import fit_threads
from .errors import ConfigError
from .limits import usable_cpus
from .predict import INFERENCE_PRECISIONS, check_precision, inference_precision, onnx_precision_message
from .serve_io import ApiError, Metrics, decode_upload

ATTENTION_METHODS = ("rollout", "raw", "gradient")
ENDPOINTS = ("/", "/healthz", "/metrics", "/v1/model", "/v1/predict", "/v1/attention")


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches and what it accepts; checked before the model is loaded."""
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 64
    max_upload_mb: float = 20.0
    timeout_s: float = 30.0
    cors: tuple[str, ...] = ()
    threads: int | None = None
    precision: str = "fp32"  # predictions: "fp32" or "bf16" (autocast; PyTorch models only)

    def __post_init__(self) -> None:
        bad = []
        if self.precision not in INFERENCE_PRECISIONS:
            bad.append(f"--precision {self.precision!r} must be one of {INFERENCE_PRECISIONS}")
        if not 1 <= self.max_batch <= 1024:
            bad.append(f"--max-batch {self.max_batch} must be in [1, 1024]")
        if not (math.isfinite(self.max_wait_ms) and 0 <= self.max_wait_ms <= 10_000):
            bad.append(f"--max-wait-ms {self.max_wait_ms} must be in [0, 10000]")
        if not 1 <= self.max_queue <= 100_000:
            bad.append(f"--max-queue {self.max_queue} must be in [1, 100000]")
        if not (math.isfinite(self.max_upload_mb) and 0 < self.max_upload_mb <= 1024):
            bad.append(f"--max-upload-mb {self.max_upload_mb} must be in (0, 1024]")
        if not (math.isfinite(self.timeout_s) and 0 < self.timeout_s <= 3600):
            bad.append(f"--timeout {self.timeout_s} must be in (0, 3600] seconds")
        if not 0 <= self.port <= 65535:
            bad.append(f"--port {self.port} must be in [0, 65535]")
        if not bad and self.timeout_s * 1000 <= self.max_wait_ms:
            bad.append(f"--timeout {self.timeout_s:g} s must be longer than --max-wait-ms {self.max_wait_ms:g}")
        if self.threads is not None and self.threads < 1:
            bad.append(f"--threads {self.threads} must be >= 1")
        if bad:
            raise ConfigError("; ".join(bad))

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


# ---- dynamic batching -----------------------------------------------------------------------
@dataclass
class Job:
    kind: str  # "predict" or "attention"
    image: np.ndarray  # (C, H, W) uint8, decoded for the model
    future: Future
    options: dict = field(default_factory=dict)


class Overloaded(Exception):
    pass


class Batcher:
    """One thread runs the model: prediction jobs are grouped, up to `max_batch` images arriving
    within `max_wait_ms` of the first; an attention job runs alone. Jobs whose waiter has gone
    (timed out) are dropped as they are taken, so they take no place in a batch."""

    def __init__(self, model, settings: ServeSettings, metrics: Metrics):
        self.model, self.settings, self.metrics = model, settings, metrics
        self.transform = EvalTransform(model.config)
        self.autocast = inference_precision(model, settings.precision)  # predictions only: maps stay fp32
        self.jobs: queue.Queue = queue.Queue()
        self.waiting = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="vitlab-batcher", daemon=True)
        metrics.queue_depth = lambda: self.waiting
        self.thread.start()

    def submit(self, job: Job) -> Future:
        with self.lock:
            if self.waiting >= self.settings.max_queue:
                raise Overloaded
            self.waiting += 1
        self.jobs.put(job)
        return job.future

    def close(self) -> None:
        """Finish every job already queued, then stop."""
        self.jobs.put(None)
        self.thread.join()

    def _take(self, job: Job) -> bool:
        """Out of the queue; False if its request has gone already. A job taken may still be
        cancelled until `_start` marks it running, just before the model sees it."""
        with self.lock:
            self.waiting -= 1
        return not job.future.cancelled()

    @staticmethod
    def _start(jobs: list[Job]) -> list[Job]:
        """The jobs whose requests still wait, now marked running (no longer cancellable)."""
        return [j for j in jobs if j.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        wait = self.settings.max_wait_ms / 1000
        stopping = False
        while not stopping:
            job = self.jobs.get()
            if job is None:
                return
            if not self._take(job):  # its request has gone: it takes no place in a batch
                continue
            batch, alone = [], []
            (batch if job.kind == "predict" else alone).append(job)
            deadline = time.monotonic() + wait
            while len(batch) < self.settings.max_batch and batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                if self._take(nxt):
                    (batch if nxt.kind == "predict" else alone).append(nxt)
            batch = self._start(batch)  # a request may have timed out during the gathering window
            if batch:
                self._predict(batch)
            for j in alone:
                if self._start([j]):
                    self._attention(j)

    def _predict(self, jobs: list[Job]) -> None:
        try:
            x, _ = self.transform(torch.from_numpy(np.stack([j.image for j in jobs])))
            with torch.inference_mode(), self.autocast():
                logits = self.model(x)
            probs = logits.float().softmax(-1).cpu()
        except Exception as e:  # a model failure answers these requests; the server goes on
            for j in jobs:
                j.future.set_exception(e)
            return
        self.metrics.batch(len(jobs))
        for j, p in zip(jobs, probs):
            j.future.set_result((p, len(jobs)))

    def _attention(self, job: Job) -> None:
        try:
            job.future.set_result(attention_png(self.model, self.transform, job.image, **job.options))
        except Exception as e:
            job.future.set_exception(e)


def attention_png(model, transform, image: np.ndarray, method: str = "rollout", alpha: float = 0.5) -> bytes:
    """A PNG of `method`'s map over the image, shown at least 224 px wide."""
    from PIL import Image

    from .attention import explain, overlay
    x, _ = transform(torch.from_numpy(image[None].copy()))  # decoded arrays are read-only views
    maps, _ = explain(model, x, method)
    side = max(224, image.shape[-1])
    mode = "L" if image.shape[0] == 1 else "RGB"
    pic = Image.fromarray(image[0] if mode == "L" else image.transpose(1, 2, 0), mode)
    shown = np.asarray(pic.resize((side, side), Image.BICUBIC))
    shown = shown[None] if shown.ndim == 2 else shown.transpose(2, 0, 1)
    buf = io.BytesIO()
    Image.fromarray(overlay(shown, maps[0].cpu(), alpha=alpha)).save(buf, "PNG")
    return buf.getvalue()


# ---- the app --------------------------------------------------------------------------------
def page_html() -> str:
    return resources.files("vitlab").joinpath("static/index.html").read_text(encoding="utf-8")


def describe(model, backend: str, settings: ServeSettings, source: str) -> dict[str, Any]:
    cfg = model.config
    return {"model": cfg.name or os.path.basename(os.path.normpath(source)), "backend": backend,
            "precision": settings.precision,
            "classes": cfg.label_names,
            "preprocessing": {"img_size": cfg.img_size, "channels": cfg.in_chans, "mean": list(cfg.mean),
                              "std": list(cfg.std), "resize": "centre square, bicubic, to img_size"},
            "config": cfg.to_dict(),
            "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms,
                         "max_queue": settings.max_queue},
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "timeout_s": settings.timeout_s},
            "attention": list(ATTENTION_METHODS) if backend == "torch" else []}


def create_app(model, settings: ServeSettings, backend: str = "torch", source: str = ""):
    """The FastAPI app serving `model` (a VisionTransformer or an exported OnnxModel)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    check_precision(model, settings.precision)  # bf16 for an ONNX model: refused before anything starts

    from PIL import Image  # decode_upload's threads (see folders._open_image): the limits decide, not warnings
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.filterwarnings("ignore", message=r"(Possibly )?[Cc]orrupt EXIF")
    metrics = Metrics()
    info = describe(model, backend, settings, source)
    names = info["classes"]
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["batcher"] = Batcher(model, settings, metrics)
        yield
        await asyncio.to_thread(state["batcher"].close)  # requests in flight are answered first

    app = FastAPI(title="vitlab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    if settings.cors:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors), allow_methods=["GET", "POST"])

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error(e.status, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        if e.status_code == 404:
            return error(404, f"no endpoint {request.url.path!r}; endpoints: {', '.join(ENDPOINTS)}")
        if e.status_code == 405:
            return error(405, f"{request.method} is not allowed on {request.url.path}", dict(e.headers or {}))
        return error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return error(500, f"internal error ({type(e).__name__}: {str(e)[:200]})")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "query")
        return error(400, f"bad parameter {where}: {first.get('msg', 'invalid')}")

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.request(path if path in ENDPOINTS else "other", status, time.perf_counter() - start)

    admitted = [0]  # image requests being received, decoded, waiting or computed
    decoding = asyncio.Semaphore(usable_cpus())

    @contextlib.contextmanager
    def admission():
        if admitted[0] >= settings.max_queue:
            raise ApiError(503, f"busy: {settings.max_queue} image requests are already in progress (--max-queue); "
                                f"retry shortly", {"Retry-After": "1"})
        admitted[0] += 1  # the event loop's thread alone counts: no lock needed
        try:
            yield
        finally:
            admitted[0] -= 1

    async def receive(request: Request) -> bytes:
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(400, f"bad Content-Length {declared[:40]!r}")
            if int(declared) > limit:
                raise ApiError(413, f"upload of {int(declared):,} bytes exceeds the {limit:,}-byte limit "
                                    f"(--max-upload-mb {settings.max_upload_mb:g})")
        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise ApiError(413, f"upload exceeds the {limit:,}-byte limit (--max-upload-mb "
                                        f"{settings.max_upload_mb:g})")
                chunks.append(chunk)
        except ClientDisconnect:
            raise ApiError(400, "the client closed the connection before sending the whole body") from None
        return b"".join(chunks)

    async def read_image(request: Request, deadline: float) -> np.ndarray:
        try:
            body = await asyncio.wait_for(receive(request), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {settings.timeout_s:g} s (--timeout)") from None
        async with decoding:
            ctype = request.headers.get("content-type")
            return await asyncio.to_thread(decode_upload, ctype, body, model.config)

    async def run(job: Job, deadline: float):
        try:
            fut = state["batcher"].submit(job)
        except Overloaded:
            raise ApiError(503, f"busy: {settings.max_queue} images are already waiting; retry shortly",
                           {"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            fut.cancel()
            raise ApiError(504, f"no answer within {settings.timeout_s:g} s (--timeout); the server is "
                                f"overloaded") from None
        except Exception as e:  # the model failed on this batch
            raise ApiError(500, f"the model failed: {type(e).__name__}: {str(e)[:200]}") from None

    @app.post("/v1/predict")
    async def predict(request: Request, topk: int = 5):
        start, deadline = time.perf_counter(), time.monotonic() + settings.timeout_s
        if topk < 1:
            raise ApiError(400, f"topk={topk} must be >= 1")
        with admission():
            image = await read_image(request, deadline)
            probs, batch = await run(Job("predict", image, Future()), deadline)
        values, indices = probs.topk(min(topk, len(probs)))
        pairs = [[names[i], v] for i, v in zip(indices.tolist(), values.tolist())]
        return {"label": pairs[0][0], "index": int(indices[0]), "prob": pairs[0][1], "topk": pairs,
                "model": info["model"], "latency_ms": round((time.perf_counter() - start) * 1e3, 2),
                "batch_size": batch}

    @app.post("/v1/attention")
    async def attention(request: Request, method: str = "rollout"):
        if backend != "torch":
            raise ApiError(501, "attention maps need the PyTorch model: serve the model directory, not the "
                                ".onnx export")
        if method not in ATTENTION_METHODS:
            raise ApiError(400, f"method={method[:40]!r} must be one of {', '.join(ATTENTION_METHODS)}")
        deadline = time.monotonic() + settings.timeout_s
        with admission():
            image = await read_image(request, deadline)
            png = await run(Job("attention", image, Future(), {"method": method}), deadline)
        return Response(png, media_type="image/png")

    @app.get("/v1/model")
    async def model_info():
        return info

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": info["model"]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    page = page_html()

    @app.get("/")
    async def index():
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                                           "style-src 'unsafe-inline'; script-src 'unsafe-inline'"})
    return app


def load_served_model(path: str, threads: int | None = None):
    """(model, backend): a model or run directory on PyTorch, or an exported .onnx on onnxruntime."""
    if Path(path).suffix == ".onnx":
        from .weights.export import OnnxModel
        return OnnxModel(path, threads), "onnxruntime"
    from .cli import _resolve_model_dir
    from .weights.modeldir import load_model
    model = load_model(_resolve_model_dir(path)[0])
    return model.eval(), "torch"


def serve(path: str, settings: ServeSettings) -> None:
    """Load the model, then serve until SIGINT / SIGTERM (uvicorn finishes the requests in flight)."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("vitlab serve needs its extra: pip install 'vitlab[serve]'") from None
    fit_threads(settings.threads)
    if settings.precision != "fp32" and Path(path).suffix == ".onnx":  # before the model is loaded
        raise ConfigError(onnx_precision_message(settings.precision, path))
    model, backend = load_served_model(path, settings.threads)
    app = create_app(model, settings, backend, path)
    print(f"serving {path} ({backend}, {settings.precision}) on http://{settings.host}:{settings.port}/ ; "
          f"batches up to {settings.max_batch} within {settings.max_wait_ms:g} ms", flush=True)
    # uvicorn stops on SIGTERM after answering the requests in flight, then raises the signal again
    # for the handler it found: this one makes that a clean exit (0) instead of death by signal.
    stopped = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                    timeout_graceful_shutdown=math.ceil(settings.timeout_s) + 5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if stopped:
        print("stopped on SIGTERM: every request in flight was answered", flush=True)


__all__ = ["ServeSettings", "create_app", "serve", "Batcher", "attention_png"]
