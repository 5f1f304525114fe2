"""Every kind of bad request against a running `vitlab serve`, with the status and message it gets
(issue 13's "a run of every bad request"), as a Markdown table.

    python benchmarks/serve_errors.py runs/c10/model IMAGE.png --out benchmarks/results/serve_errors.md

The server is started on a free loopback port with --max-upload-mb 1 and stopped at the end.
"""
import argparse
import http.client
import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path


def png_header(width: int, height: int) -> bytes:
    """A small PNG that declares width x height: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def cases(image: bytes) -> list[tuple[str, str, str, bytes | None, dict]]:
    png = {"Content-Type": "image/png"}
    return [
        ("a good image", "POST", "/v1/predict?topk=3", image, png),
        ("an empty body", "POST", "/v1/predict", b"", png),
        ("text sent as an image", "POST", "/v1/predict", b"hello, I am text", png),
        ("text/plain", "POST", "/v1/predict", b"hello", {"Content-Type": "text/plain"}),
        ("JSON", "POST", "/v1/predict", b'{"image": 1}', {"Content-Type": "application/json"}),
        ("a decompression bomb (10000x10000 PNG header, 111 bytes)", "POST", "/v1/predict",
         png_header(10000, 10000), png),
        ("a 100000x10 sliver", "POST", "/v1/predict", png_header(100000, 10), png),
        ("an oversize upload (2 MB)", "POST", "/v1/predict", b"\0" * 2_000_000, png),
        ("a truncated image", "POST", "/v1/predict", image[: len(image) // 2], png),
        ("a multipart form without a file", "POST", "/v1/predict",
         b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
         {"Content-Type": "multipart/form-data; boundary=b"}),
        ("a multipart form of 40 parts", "POST", "/v1/predict", b"--b\r\n\r\nx\r\n" * 40 + b"--b--\r\n",
         {"Content-Type": "multipart/form-data; boundary=b"}),
        ("topk=0", "POST", "/v1/predict?topk=0", image, png),
        ("topk=many", "POST", "/v1/predict?topk=many", image, png),
        ("an unknown attention method", "POST", "/v1/attention?method=magic", image, png),
        ("an unknown endpoint", "GET", "/v1/nothing", None, {}),
        ("a path outside the API", "GET", "/../../etc/passwd", None, {}),
        ("GET on /v1/predict", "GET", "/v1/predict", None, {}),
        ("DELETE on /v1/model", "DELETE", "/v1/model", None, {}),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("image")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", args.model, "--port", str(port),
                             "--max-upload-mb", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/healthz")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        lines = [f"`vitlab serve {args.model} --max-upload-mb 1` on 127.0.0.1, then "
                 f"`python benchmarks/serve_errors.py {args.model} {args.image}`:", "",
                 "| request | status | answer |", "|---|---|---|"]
        for what, method, path, body, headers in cases(Path(args.image).read_bytes()):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            data = r.read()
            text = data.decode("utf-8", "replace")
            try:
                shown = json.dumps(json.loads(text), ensure_ascii=False)
            except ValueError:
                shown = text[:200]
            shown = shown.replace("|", "\\|")
            lines.append(f"| {what} (`{method} {path}`) | {r.status} | `{shown[:300]}` |")
        table = "\n".join(lines)
        print(table)
        if args.out:
            args.out.write_text(table + "\n")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
