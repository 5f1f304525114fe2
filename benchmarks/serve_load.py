"""Load test of `vitlab serve` on loopback: throughput and latency with and without dynamic batching,
and at 2x overload (issue 13).

    python benchmarks/serve_load.py --out benchmarks/results/serve_load.json

For each preset (random weights, 10 classes: speed does not depend on the values), `vitlab serve`
runs as its own process, three times:
- batched:     --max-batch 16 --max-wait-ms 10, with CLIENTS concurrent clients;
- one at a time: --max-batch 1 --max-wait-ms 0, the same clients;
- overload:    batched, with 2 x CLIENTS clients and --max-queue CLIENTS (image requests admitted at
               once, from receiving to answering): about half are refused with 503 before their
               body is read, and nothing else may fail.
Each client is a thread that sends one 400x300 JPEG after another (raw body, keep-alive connection)
for `--seconds`, bounded in count and time; the first `--warmup` seconds are not counted.
Latency is per request, from sending to the full answer. Every status code is counted.
"""
import argparse
import http.client
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLIENTS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, port: int, *flags: str) -> subprocess.Popen:
    log = open(model_dir.with_suffix(f".{port}.log"), "w")  # a pipe nobody reads could stall the server
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "serve", str(model_dir), "--port", str(port), *flags],
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"server exited; see {model_dir.with_suffix(f'.{port}.log')}")
            time.sleep(0.2)
    raise SystemExit("server did not start")


def load(port: int, body: bytes, clients: int, seconds: float, warmup: float) -> dict:
    t0 = time.perf_counter()
    start_count, stop = t0 + warmup, t0 + warmup + seconds
    lock = threading.Lock()
    latencies, codes, errors = [], {}, []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while (now := time.perf_counter()) < stop:
            try:
                conn.request("POST", "/v1/predict?topk=1", body, {"Content-Type": "image/jpeg"})
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            except OSError as e:
                status = f"{type(e).__name__}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            done = time.perf_counter()
            if now >= start_count and done <= stop + 60:
                with lock:
                    codes[str(status)] = codes.get(str(status), 0) + 1
                    if status == 200:
                        latencies.append(done - now)
                    elif status != 503:
                        errors.append(status)
            if status == 503:
                time.sleep(0.05)  # a polite client backs off (the answer says Retry-After: 1)
        conn.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max(time.perf_counter(), stop) - start_count
    lat = sorted(latencies)

    def pct(q: float) -> float | None:
        return round(1e3 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None
    return {"clients": clients, "seconds": round(elapsed, 1), "ok": len(lat),
            "throughput_per_s": round(len(lat) / elapsed, 2), "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99), "mean_ms": round(1e3 * statistics.mean(lat), 1) if lat else None,
            "codes": codes, "errors": len(errors)}


def batch_sizes(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vitlab_batch_size_count"))
    total = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("vitlab_batch_size_sum"))
    return {"forward_passes": int(count), "mean_batch": round(total / count, 2) if count else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="vit_tiny_patch4_32,vit_base_patch16_224")
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import vitlab
    from vitlab.engine.runtime import describe_machine
    from vitlab.weights.modeldir import save_model
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((400, 300)))
                    ).save(buf, "JPEG", quality=90)
    body = buf.getvalue()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            model_dir = Path(tmp) / preset
            save_model(vitlab.create_model(preset, num_classes=10), model_dir)
            modes = [("batched", ["--max-batch", "16", "--max-wait-ms", "10", "--max-queue", "256"], args.clients),
                     ("one at a time", ["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "256"], args.clients),
                     ("2x overload", ["--max-batch", "16", "--max-wait-ms", "10", "--max-queue", str(args.clients)],
                      2 * args.clients)]
            for mode, flags, clients in modes:
                port = free_port()
                proc = start(model_dir, port, *flags, "--timeout", "120")
                try:
                    r = load(port, body, clients, args.seconds, args.warmup)
                    r.update(batch_sizes(port))
                finally:
                    proc.terminate()
                    proc.wait(60)
                r.update(preset=preset, mode=mode, flags=" ".join(flags))
                rows.append(r)
                print(json.dumps(r), flush=True)
    doc = {"machine": describe_machine(), "command": " ".join(sys.argv), "rows": rows,
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    for preset in args.presets.split(","):
        got = {r["mode"]: r for r in rows if r["preset"] == preset}
        if got.get("one at a time", {}).get("throughput_per_s"):
            doc.setdefault("speedup", {})[preset] = round(got["batched"]["throughput_per_s"]
                                                          / got["one at a time"]["throughput_per_s"], 2)
    print(json.dumps(doc.get("speedup")))
    if args.out:
        runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
        args.out.write_text(json.dumps({"runs": runs + [doc]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
