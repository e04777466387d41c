"""``cnnlab serve`` under load: concurrent clients on loopback, every answer checked, the
server's memory watched.

    python benchmarks/serve_load.py                          # an untrained tutorial model, 8 x 250
    python benchmarks/serve_load.py runs/my-run --clients 16 --requests 100 --json out.json

Starts ``python -m cnnlab serve RUN --max-upload-mb 1`` on a free loopback port (without RUN,
an untrained tutorial model in a temporary folder: speed and memory do not depend on the
weights) and drives it from ``--clients`` threads, each sending ``--requests`` requests one
after another on a keep-alive connection, a seeded mix of:

    good       an image (CIFAR-10 test JPEGs from ../shared/data if present, and generated
               JPEG/PNG photos up to 1024 x 768): 200, and the top class must be the one
               ``Run.predict`` gives in this process
    oversize   ``--oversize-mb`` of bytes, sent whole with a Content-Length as urllib and
               requests do: 413, read after the whole body was sent
    not-image  text posted as image.jpg: 415

Any other status (a 503 included: the default queue holds more than 8 clients) or a wrong
class is an error, listed and counted in the exit status. The server's resident memory is
read from /proc/PID/status every ``RSS_INTERVAL_S`` seconds: after a warm-up pass (every image
once, from all clients at once), its peak during the load, and its growth from the middle
to the last tenth of the run (a leak grows with requests served).
Latency is per request, from the first byte sent to the last byte of the answer read.
The numbers move with whatever else the machine is doing; run it when it is quiet.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cnnlab.core.hardware import available_cores

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test"
UPLOAD_LIMIT_MB = 1
MIX = {"good": 0.8, "oversize": 0.1, "not-image": 0.1}          # share of each kind of request
EXPECTED_STATUS = {"good": 200, "oversize": 413, "not-image": 415}
RSS_INTERVAL_S = 0.05
SERVER_START_S = 120          # importing torch and FastAPI on a busy machine
REQUEST_TIMEOUT_S = 60
CIFAR_IMAGES = 40
# Generated photos, (width, height): phone-like sizes under the 1 MB limit as JPEG or PNG.
PHOTO_SIZES = [(64, 48), (320, 240), (640, 480), (1024, 768)]


@dataclass
class Good:
    name: str
    data: bytes
    content_type: str
    top: str                  # the class Run.predict gives


@dataclass
class Outcome:
    kind: str
    status: int
    seconds: float
    error: str | None = None


@dataclass
class RssSampler:
    """The resident set size of process ``pid`` in bytes, sampled in a thread."""
    pid: int
    interval: float = RSS_INTERVAL_S
    samples: list[tuple[float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def read(self, key: str = "VmRSS") -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {key} in /proc/{self.pid}/status")

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.read()))
            except (OSError, RuntimeError):
                return                  # the process is gone
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- requests
def multipart(data: bytes, filename: str, content_type: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth picture with some grain: compresses like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [127 + 100 * np.sin(x / (width / rng.uniform(1, 6)) + rng.uniform(0, 6))
                * np.cos(y / (height / rng.uniform(1, 6))) for _ in range(3)]
    img = np.stack(channels, -1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def good_images(run: Any, folder: Path, cifar: Path = SHARED_CIFAR) -> list[Good]:
    """Real and generated images with the top class ``run.predict`` gives each, one at a time
    (batch of one, as the server runs them)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if cifar.is_dir():
        classes = sorted(os.listdir(cifar))
        per_class = max(1, CIFAR_IMAGES // max(1, len(classes)))
        paths += [cifar / c / n for c in classes for n in sorted(os.listdir(cifar / c))[:per_class]]
    for i, (w, h) in enumerate(PHOTO_SIZES):
        for fmt in ("JPEG", "PNG"):
            path = folder / f"photo{i}.{fmt.lower()}"
            buf = io.BytesIO()
            photo(w, h, seed=i).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            if buf.tell() < UPLOAD_LIMIT_MB * 1_000_000 - 1000:      # room for the multipart wrapping
                path.write_bytes(buf.getvalue())
                paths.append(path)
    out = []
    for p in paths:
        top = run.predict([p], top_k=1)[0]["top"][0]["class"]
        kind = "image/png" if p.suffix == ".png" else "image/jpeg"
        out.append(Good(p.name, p.read_bytes(), kind, top))
    return out


def plan(goods: list[Good], count: int, oversize_bytes: int, seed: int) -> list[tuple[str, Any]]:
    """``count`` requests, a seeded mix of ``MIX``: (kind, Good or the bytes to send)."""
    rng = random.Random(seed)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=count)
    oversize = b"\xff\xd8" + b"\0" * (oversize_bytes - 2)
    return [(k, rng.choice(goods) if k == "good" else oversize if k == "oversize" else b"not an image\n" * 8)
            for k in kinds]


def check(kind: str, item: Any, status: int, body: bytes) -> str | None:
    """What is wrong with the answer, or None."""
    if status != EXPECTED_STATUS[kind]:
        return f"{kind}: status {status}, expected {EXPECTED_STATUS[kind]}: {body[:200]!r}"
    try:
        reply = json.loads(body)
    except ValueError:
        return f"{kind}: the answer is not JSON: {body[:200]!r}"
    if kind == "good" and reply["top"][0]["class"] != item.top:
        return f"good {item.name}: top class {reply['top'][0]['class']!r}, Run.predict says {item.top!r}"
    if kind != "good" and not reply.get("detail"):
        return f"{kind}: no detail in {reply}"
    return None


def client(host: str, port: int, requests: list[tuple[str, Any]]) -> list[Outcome]:
    """Send ``requests`` one after another on a keep-alive connection (reopened after a 413,
    which closes it)."""
    conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
    out = []
    try:
        for kind, item in requests:
            if kind == "good":
                body, ctype = multipart(item.data, item.name, item.content_type)
            else:
                body, ctype = multipart(item, "image.jpg", "image/jpeg")
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict?k=1", body=body, headers={"Content-Type": ctype})
                response = conn.getresponse()
                status, answer = response.status, response.read()
            except OSError as e:          # reset, refused, timed out: the kind of failure looked for
                conn.close()
                out.append(Outcome(kind, 0, time.perf_counter() - t0, f"{kind}: {type(e).__name__}: {e}"))
                continue
            out.append(Outcome(kind, status, time.perf_counter() - t0, check(kind, item, status, answer)))
    finally:
        conn.close()
    return out


def run_clients(host: str, port: int, plans: list[list[tuple[str, Any]]]) -> tuple[list[Outcome], float]:
    """One thread per plan, started together; every outcome, and the wall time."""
    results: list[list[Outcome]] = [[] for _ in plans]

    def work(i: int) -> None:
        results[i] = client(host, port, plans[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(plans))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [o for r in results for o in r], time.perf_counter() - t0


def drive(url: str, pid: int, goods: list[Good], *, clients: int, requests: int,
          oversize_bytes: int = 4 * UPLOAD_LIMIT_MB * 1_000_000, seed: int = 0) -> dict[str, Any]:
    """Warm the server at ``url`` (process ``pid``) up, then load it; a summary of the run.

    The warm-up has the same clients share the images once (and one of each refusal each),
    so the server's worker threads and allocator pools exist before the baseline is read."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    refusals = [("oversize", b"\0" * oversize_bytes), ("not-image", b"not an image\n")]
    warm, _ = run_clients(host, int(port), [[("good", g) for g in goods[i::clients]] + refusals
                                            for i in range(clients)])
    plans = [plan(goods, requests, oversize_bytes, seed + i) for i in range(clients)]
    with RssSampler(pid) as rss:
        baseline = rss.read()
        outcomes, wall = run_clients(host, int(port), plans)
    errors = [o.error for o in warm + outcomes if o.error]
    lat = np.array([o.seconds for o in outcomes])
    mem = np.array([b for _, b in rss.samples], dtype=np.float64)
    tenth, half = max(1, len(mem) // 10), len(mem) // 2
    by_kind = {k: {"count": sum(o.kind == k for o in outcomes),
                   "p50_ms": 1000 * float(np.median([o.seconds for o in outcomes if o.kind == k] or [0]))}
               for k in MIX}
    return {
        "clients": clients, "requests_per_client": requests, "requests": len(outcomes),
        "seconds": wall, "requests_per_s": len(outcomes) / wall,
        "p50_ms": 1000 * float(np.percentile(lat, 50)), "p99_ms": 1000 * float(np.percentile(lat, 99)),
        "by_kind": by_kind, "statuses": {str(s): sum(o.status == s for o in outcomes)
                                         for s in sorted({o.status for o in outcomes})},
        "errors": len(errors), "error_examples": errors[:10],
        "rss_baseline_mb": baseline / 1e6, "rss_peak_mb": float(mem.max()) / 1e6,
        # A leak grows with requests served: compare the last tenth of the run with its middle.
        "rss_growth_second_half_mb": float(mem[-tenth:].mean() - mem[max(0, half - tenth):half + 1].mean()) / 1e6,
        "rss_samples": len(mem), "oversize_bytes": oversize_bytes, "images": len(goods),
        "server": _health(url).get("inference", {})}


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/health", timeout=REQUEST_TIMEOUT_S) as r:
        return json.loads(r.read())


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(run), "--port", str(port),
                                 "--max-upload-mb", str(UPLOAD_LIMIT_MB)], stdout=out, stderr=out)
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"cnnlab serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)


def untrained_run(folder: Path) -> Path:
    """A tutorial model with random weights, saved as a run."""
    import torch

    from cnnlab.core.config import Config
    from cnnlab.core.hardware import choose_precision
    from cnnlab.engine.runs import environment, model_card, save_config, save_model
    from cnnlab.models.classifier import build_classifier
    torch.manual_seed(0)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]       # any constants do for random weights
    cfg = Config(model="tutorial")
    model = build_classifier("tutorial", 10, 32, mean, std).eval()
    cpu = torch.device("cpu")
    save_config(folder, cfg, environment(cpu, choose_precision("fp32", cpu)))
    save_model(folder, model, model_card(cfg, [f"class{i}" for i in range(10)], (32, 32, 3), mean, std))
    return folder


def machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {available_cores()} cores available"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", nargs="?", default=None, help="run folder (default: an untrained tutorial model)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=250, help="requests per client")
    ap.add_argument("--oversize-mb", type=float, default=4.0, help="size of the oversize bodies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="FILE", help="also write the summary here")
    args = ap.parse_args(argv)

    from cnnlab.engine.runs import load_run
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        run_dir = Path(args.run) if args.run else untrained_run(Path(tmp) / "run")
        goods = good_images(load_run(run_dir), Path(tmp) / "images")
        port = free_port()
        proc = start_server(run_dir, port, Path(tmp) / "serve.log")
        try:
            summary = drive(f"http://127.0.0.1:{port}", proc.pid, goods, clients=args.clients,
                            requests=args.requests, oversize_bytes=int(args.oversize_mb * 1e6), seed=args.seed)
        finally:
            proc.terminate()
            proc.wait(30)
    summary["machine"] = machine()
    summary["run"] = str(args.run or "untrained tutorial")
    s = summary
    counts = ", ".join(f"{k} {v['count']}" for k, v in s["by_kind"].items())
    medians = ", ".join(f"{k} {v['p50_ms']:.1f} ms" for k, v in s["by_kind"].items())
    print(f"machine: {s['machine']}")
    print(f"{s['clients']} clients x {s['requests_per_client']} requests ({s['images']} images; {counts}; "
          f"oversize bodies {s['oversize_bytes'] / 1e6:g} MB, limit {UPLOAD_LIMIT_MB} MB) against {s['run']}")
    print(f"{s['requests_per_s']:.0f} requests/s over {s['seconds']:.1f} s; latency p50 {s['p50_ms']:.1f} ms, "
          f"p99 {s['p99_ms']:.1f} ms (p50 by kind: {medians})")
    print(f"server memory (RSS): {s['rss_baseline_mb']:.0f} MB after warm-up, peak {s['rss_peak_mb']:.0f} MB, "
          f"{s['rss_growth_second_half_mb']:+.1f} MB over the second half ({s['rss_samples']} samples)")
    g = s["server"]
    print(f"server: {g.get('workers')} workers, at most {g.get('peak_running')} running at once, "
          f"{g.get('refused')} refused busy")
    print(f"statuses {s['statuses']}; wrong answers {s['errors']}")
    for e in s["error_examples"]:
        print("  " + e)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if s["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
