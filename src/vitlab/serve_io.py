"""What `vitlab serve` reads and writes besides the model: uploads in (a raw body or one field of a
multipart form, decoded as `vitlab predict` decodes a file), Prometheus metrics out, and the error
every refusal becomes (ApiError -> a JSON {"error": ...} with its status)."""

import re
import threading

import numpy as np

from .data.folders import decode_image
from .errors import ImageError, ImageTooLargeError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ApiError(Exception):
    """A request the server answers with `status` and {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# ---- metrics --------------------------------------------------------------------------------
class Metrics:
    """Counters and histograms in the Prometheus text format (version 0.0.4)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list] = {}  # endpoint -> [bucket counts..., sum, count]
        self.batches = [0] * len(BATCH_BUCKETS) + [0, 0]
        self.queue_depth = lambda: 0

    @staticmethod
    def _observe(hist: list, buckets: tuple, value: float) -> None:
        for i, b in enumerate(buckets):
            if value <= b:
                hist[i] += 1
        hist[-2] += value
        hist[-1] += 1

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            hist = self.latency.setdefault(endpoint, [0] * len(LATENCY_BUCKETS) + [0.0, 0])
            self._observe(hist, LATENCY_BUCKETS, seconds)

    def batch(self, size: int) -> None:
        with self.lock:
            self._observe(self.batches, BATCH_BUCKETS, size)

    def render(self) -> str:
        def hist_lines(name: str, labels: str, hist: list, buckets: tuple) -> list[str]:
            sep = "," if labels else ""
            out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {n}' for b, n in zip(buckets, hist)]
            out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {hist[-1]}')
            out.append(f"{name}_sum{{{labels}}} {hist[-2]:.6f}" if labels else f"{name}_sum {hist[-2]:.6f}")
            out.append(f"{name}_count{{{labels}}} {hist[-1]}" if labels else f"{name}_count {hist[-1]}")
            return out
        with self.lock:
            lines = ["# HELP vitlab_requests_total HTTP requests by endpoint and status code.",
                     "# TYPE vitlab_requests_total counter"]
            lines += [f'vitlab_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP vitlab_request_latency_seconds Time from a request's arrival to its answer.",
                      "# TYPE vitlab_request_latency_seconds histogram"]
            for e, hist in sorted(self.latency.items()):
                lines += hist_lines("vitlab_request_latency_seconds", f'endpoint="{e}"', hist, LATENCY_BUCKETS)
            lines += ["# HELP vitlab_batch_size Images per forward pass.", "# TYPE vitlab_batch_size histogram"]
            lines += hist_lines("vitlab_batch_size", "", self.batches, BATCH_BUCKETS)
            lines += ["# HELP vitlab_queue_depth Images waiting for the model.", "# TYPE vitlab_queue_depth gauge",
                      f"vitlab_queue_depth {self.queue_depth()}"]
        return "\n".join(lines) + "\n"


# ---- reading an upload ----------------------------------------------------------------------
MAX_PARTS = 16  # a form with more parts than this is refused unparsed


def _disposition(headers: bytes) -> dict[str, str]:
    """name= and filename= of a part's Content-Disposition header (quoted or not)."""
    for line in headers.split(b"\r\n"):
        key, _, value = line.decode("latin-1").partition(":")
        if key.strip().lower() == "content-disposition":
            return {k.lower(): v for k, v in re.findall(r';\s*([A-Za-z*]+)="?([^";]*)"?', value)}
    return {}


def upload_bytes(content_type: str | None, body: bytes) -> tuple[bytes, str]:
    """(the image file's bytes, its name) from a request body: raw, or the `file` field (else the
    first part with a filename) of a multipart form, split at its top level only (no nesting, at most
    MAX_PARTS parts). ApiError for anything else."""
    if not body:
        raise ApiError(400, "empty body: send an image file (raw bytes, or the `file` field of a multipart form)")
    full = (content_type or "").strip()
    ctype = full.split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        found = re.search(r'boundary="?([^";]{1,200})"?', full)
        if not found:
            raise ApiError(400, "multipart/form-data without a boundary parameter")
        delimiter = b"--" + found.group(1).encode("latin-1", "replace")
        pieces = body.split(delimiter, MAX_PARTS + 2)
        if len(pieces) > MAX_PARTS + 2:
            raise ApiError(400, f"the multipart form has more than {MAX_PARTS} parts")
        parts = []
        for piece in pieces[1:]:
            if piece.startswith(b"--"):  # the closing delimiter
                break
            head, sep, data = piece.removeprefix(b"\r\n").partition(b"\r\n\r\n")
            if sep:
                parts.append((_disposition(head), data.removesuffix(b"\r\n")))
        if not parts:
            raise ApiError(400, "malformed multipart body: no parts found (is the boundary right?)")
        files = [p for p in parts if p[0].get("name") == "file"] or [p for p in parts if "filename" in p[0]]
        if not files:
            raise ApiError(400, "the multipart form has no file: send the image as the field `file`")
        info, data = files[0]
        if not data:
            raise ApiError(400, "the multipart form's file is empty (0 bytes)")
        name = info.get("filename") or "upload"
        return data, "".join(c if c.isprintable() else "?" for c in name)[:200]
    if ctype.startswith("image/") or ctype in ("application/octet-stream", ""):
        return body, "upload"
    raise ApiError(415, f"unsupported content type {ctype!r}: send the image as image/*, "
                        f"application/octet-stream or the `file` field of multipart/form-data")


def decode_upload(content_type: str | None, body: bytes, cfg) -> np.ndarray:
    """The upload decoded as `vitlab predict` decodes a file; ApiError naming the problem."""
    data, name = upload_bytes(content_type, body)
    try:
        return decode_image(name, cfg.img_size, cfg.in_chans, data=data)
    except ImageTooLargeError as e:
        raise ApiError(413, f"image refused: {e.reason}") from None
    except ImageError as e:
        raise ApiError(400, f"not a usable image: {e.reason}") from None


__all__ = ["ApiError", "Metrics", "upload_bytes", "decode_upload", "MAX_PARTS"]
