"""A small web app around a trained run: a page to try images, and a JSON API.

    GET  /          the page (static/index.html + app.js + style.css, nothing from the network)
    GET  /health    {"status": "ok", "model": {...}, "max_upload_bytes": ..., "max_pixels": ...}
    POST /predict   multipart field ``file``; query ``k`` (default 5) -> {"top": [...], ...}
    POST /gradcam   multipart field ``file``; query ``class`` (default: the top class) -> image/png,
                    the image with its Grad-CAM overlaid (same upload rules and errors as /predict;
                    422 for an unknown class)

Upload rules (FastAPI has no per-file cap of its own):

    413  request body over ``max_bytes``: refused from its Content-Length header before any
         of the body is used; a chunked body without a length is counted as it streams and
         refused as soon as it passes the limit. The limit covers the whole multipart body.
    413  an image whose header declares more than ``max_pixels`` pixels (a decompression
         bomb): refused before its pixels are decoded. 413 rather than 422 because the
         content, once decoded, is what is too large.
    415  bytes in which Pillow recognises no image format (text, PDF, HTML named .jpg, ...)
    422  an image format that is recognised but whose data is truncated or corrupt, an empty
         file, or a missing ``file`` field
    503  the server is busy: ``workers`` requests are running the model and ``max_waiting``
         more are queued behind them; sent at once with ``Retry-After: 1``.

A refused body is still read, and thrown away: most clients (Python's urllib and requests,
curl without ``Expect``) send the whole body before reading the answer, and a server that
closes with their bytes unread makes the kernel reset the connection, so the client sees
"connection reset by peer" instead of the 413. The answer goes out at once (a client that
reads while sending has it immediately); the connection is closed once the body has ended,
after ``DRAIN_MAX_BYTES``, or when the client has sent nothing for ``DRAIN_IDLE_S`` seconds.
A body declared larger than ``DRAIN_MAX_BYTES`` is not waited for.

Load: at most ``workers`` requests (default: one per core) decode their image and run the
model at once, each in a worker thread, so the server keeps answering /health meanwhile;
up to ``max_waiting`` more wait in the event loop, holding only their upload (so memory is
bounded by about ``max_waiting x max_bytes`` plus ``workers`` decoded images); beyond that a
request gets 503 rather than queueing without bound. ``benchmarks/serve_load.py`` measures it.

Errors are JSON ``{"detail": "message"}``.
"""
from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool

from cnnlab.core.errors import CnnlabError
from cnnlab.core.hardware import available_cores
from cnnlab.data.images import MAX_PIXELS, ImageError, open_image
from cnnlab.engine.inference import logits_for, top_classes
from cnnlab.engine.runs import Run, load_run

# Default upload limit in bytes (10 MB): above any photo a phone takes, far below memory trouble.
DEFAULT_MAX_BYTES = 10_000_000
# Requests that may wait for a model slot beyond those running (each holds its upload, at
# most max_bytes: 160 MB at the default limit); the next gets 503 + Retry-After.
DEFAULT_MAX_WAITING = 16
DEFAULT_TOP_K = 5
MAX_TOP_K = 1000
STATIC = "static"
# The page loads only its own files; images are previewed from blob: URLs.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
# ImageError.kind (cnnlab.data.images) -> HTTP status
STATUS_FOR_KIND = {"not-image": 415, "too-large": 413, "damaged": 422, "empty-file": 422}
MESSAGES = {
    415: "{name} is not an image cnnlab reads ({reason}).",
    413: "{name} is refused as a possible decompression bomb: {reason}.",
    422: "{name} could not be decoded ({reason}); it may be truncated or corrupt.",
}


# ----------------------------------------------------------------------------- upload limit
# Reading a refused body to its end, bounded (nginx's lingering close does the same, for 30 s
# at most and 5 s without data). At loopback speed the bound takes well under a second to read.
DRAIN_MAX_BYTES = 256_000_000
DRAIN_IDLE_S = 2.0
DRAIN_TOTAL_S = 30.0


class UploadTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit. An HTTPException, so
    FastAPI's body parsing passes it on as a 413 instead of turning it into a 400."""

    def __init__(self, detail: str):
        super().__init__(413, detail, headers={"connection": "close"})


async def drain(receive, limit: int = DRAIN_MAX_BYTES) -> bool:
    """Read and discard the rest of a request body: at most ``limit`` bytes, ``DRAIN_TOTAL_S``
    seconds, and ``DRAIN_IDLE_S`` seconds without data. True when the body ended."""
    seen = 0
    with anyio.move_on_after(DRAIN_TOTAL_S):
        while seen <= limit:
            with anyio.move_on_after(DRAIN_IDLE_S) as idle:
                message = await receive()
            if idle.cancelled_caught or message["type"] != "http.request":
                return False            # the client went quiet, or away
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
    return False


class UploadLimit:
    """ASGI middleware: 413 for request bodies over ``max_bytes``, readable by any client.

    A declared Content-Length over the limit is answered at once, without passing the request
    on; otherwise ``receive`` counts the bytes and raises once the limit is passed. Whenever a
    response ends before the client has sent its whole body (these 413s, or any early answer),
    the rest of the body is drained (see the module docstring) before the connection closes.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        length = None
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _send_json(send, 400, f"Content-Length {declared[:40]!r} is not a number")
                return
            if length > self.max_bytes:
                drained = length <= DRAIN_MAX_BYTES
                await _send_json(send, 413, self._message(f"declares {length:,} bytes"),
                                 then=(lambda: drain(receive, length)) if drained else None)
                return
        received = 0
        body_done = not (length or b"transfer-encoding" in headers)   # nothing (more) to come
        started = False

        async def counted_receive():
            nonlocal received, body_done
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise UploadTooLarge(self._message(f"sent more than {self.max_bytes:,} bytes"))
            else:
                body_done = True        # disconnected: nothing to drain
            return message

        async def finishing_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            if message["type"] == "http.response.body" and not message.get("more_body", False) \
                    and not body_done:
                # The answer is complete but the client is still sending: let it finish first.
                await send({**message, "more_body": True})
                await drain(receive, DRAIN_MAX_BYTES - received)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        try:
            await self.app(scope, counted_receive, finishing_send)
        except UploadTooLarge as e:
            if started:
                raise
            await _send_json(send, 413, e.detail, then=lambda: drain(receive, DRAIN_MAX_BYTES - received))

    def _message(self, what: str) -> str:
        return (f"upload too large: the request {what}, the limit is {self.max_bytes:,} bytes "
                f"({self.max_bytes / 1e6:g} MB); resize or compress the image, or start the "
                f"server with a larger --max-upload-mb")


class SecurityHeaders:
    """ASGI middleware: add ``SECURITY_HEADERS`` to every response that lacks them."""

    def __init__(self, app):
        self.app = app
        self.extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *((k, v) for k, v in self.extra if k not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _send_json(send, status: int, detail: str, then=None) -> None:
    """Send ``{"detail": detail}`` and close the connection; with ``then``, the whole answer is
    sent first, then ``await then()`` (draining the body) runs before the response ends."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": then is not None})
    if then is not None:
        await then()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# ----------------------------------------------------------------------------- inference
class Predictor:
    """The run's model on the CPU, and what the page and /health show about it."""

    def __init__(self, run_path: str | Path, max_pixels: int):
        self.run = load_run(run_path)
        self.model = self.run.model("cpu")      # load now: a broken run fails at start, not per request
        self.max_pixels = max_pixels
        # Grad-CAM hooks the model and switches its mode: it gets its own copy of the run (loaded
        # on first use) and one request at a time, so concurrent /predict calls are undisturbed.
        self._cam_lock = threading.Lock()
        self._cam_run: Run | None = None

    def info(self) -> dict[str, Any]:
        run, card = self.run, self.run.card
        test = (self.run.metrics or {}).get("test_accuracy")
        return {"run": self.run.path.name, "arch": card.get("arch"), "num_classes": len(run.class_names),
                "class_names": run.class_names, "input_size": list(run.input_size),
                "in_channels": run.in_channels, "test_accuracy": test}

    def classify(self, data: bytes, k: int, filename: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        img, x = self._decode(data, filename)
        try:
            logits = logits_for(self.run, x[None])
        except CnnlabError as e:   # nan or inf out of the model: the model's fault, not the upload's
            raise HTTPException(500, str(e)) from None
        top = top_classes(self.run.class_names, logits, k)[0]
        return {"file": filename, "width": img.width, "height": img.height, "top": top,
                "seconds": round(time.perf_counter() - t0, 4)}

    def gradcam_png(self, data: bytes, class_name: str | None, filename: str | None) -> bytes:
        from cnnlab.apps.explain import class_index, gradcam_overlay_png
        try:
            k = None if class_name is None else class_index(self.run.class_names, class_name, "class")
        except CnnlabError as e:
            raise HTTPException(422, str(e)) from None
        x = self._decode(data, filename)[1]     # small: the full-size decode is freed here
        with self._cam_lock:
            self._cam_run = self._cam_run or load_run(self.run.path)
            return gradcam_overlay_png(self._cam_run, x, k)

    def _decode(self, data: bytes, filename: str | None) -> tuple[Image.Image, Any]:
        """The upload as an image and as a uint8 (H, W, C) array at the model's input size;
        HTTPException 413/415/422 when it is not an acceptable image."""
        name = filename or "uploaded image"
        try:
            img = open_image(data, max_pixels=self.max_pixels)
        except ImageError as e:
            status = STATUS_FOR_KIND.get(e.kind, 422)
            raise HTTPException(status, MESSAGES.get(status, MESSAGES[422]).format(name=name, reason=e.reason)) from None
        x = self.run.image_array(img)
        return img, x if x.flags.writeable else x.copy()     # torch warns on read-only arrays


T = TypeVar("T")


class InferenceGate:
    """At most ``workers`` calls run at once, each in a worker thread; up to ``max_waiting``
    more wait for a turn in the event loop (no thread each); one more is refused with 503.

    A decoded upload can take ``max_pixels`` x 4 bytes and the model's activations come on
    top: the bound keeps a burst from exhausting memory or thrashing the cores, and the 503
    keeps the queue (each request holding its upload) from growing without limit.
    """

    def __init__(self, workers: int, max_waiting: int):
        if workers < 1 or max_waiting < 0:
            raise CnnlabError(f"the server needs at least 1 worker and 0 or more waiting places; "
                              f"got workers={workers}, max_waiting={max_waiting}")
        self.workers, self.max_waiting = workers, max_waiting
        self._slots = anyio.Semaphore(workers)
        self.running = self.waiting = self.peak_running = self.refused = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.running + self.waiting >= self.workers + self.max_waiting:
            self.refused += 1
            raise HTTPException(503, f"server busy: {self.running} request(s) running the model and "
                                     f"{self.waiting} waiting (at most {self.workers} + "
                                     f"{self.max_waiting}); retry in a moment",
                                headers={"retry-after": "1"})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self.running -= 1
            self._slots.release()

    def info(self) -> dict[str, int]:
        return {"workers": self.workers, "max_waiting": self.max_waiting, "running": self.running,
                "waiting": self.waiting, "peak_running": self.peak_running, "refused": self.refused}


# ----------------------------------------------------------------------------- app
def _static_dir() -> Path:
    return Path(str(resources.files("cnnlab.apps.serve") / STATIC))


def create_app(run_path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES, *, max_pixels: int = MAX_PIXELS,
               workers: int | None = None, max_waiting: int = DEFAULT_MAX_WAITING):
    """The FastAPI app for ``run_path``; ``max_bytes`` caps each request body; ``workers``
    (default: one per core) requests run the model at once and ``max_waiting`` more may wait."""
    if max_bytes < 1:
        raise CnnlabError(f"the upload limit must be at least 1 byte, got {max_bytes}")
    gate = InferenceGate(workers or available_cores(), max_waiting)
    predictor = Predictor(run_path, max_pixels)
    static = _static_dir()
    page = (static / "index.html").read_text(encoding="utf-8")

    app = FastAPI(title="cnnlab", summary=f"image classifier: {predictor.run.path.name}",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.predictor, app.state.max_bytes, app.state.gate = predictor, max_bytes, gate

    # Pure ASGI middlewares (BaseHTTPMiddleware would wrap the limit's error in an
    # ExceptionGroup, which FastAPI turns into a 400). The last added is the outermost: the
    # security headers go on every answer, the limit's own 413s too.
    app.add_middleware(UploadLimit, max_bytes=max_bytes)
    app.add_middleware(SecurityHeaders)
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": predictor.info(), "max_upload_bytes": max_bytes,
                "max_pixels": max_pixels, "inference": gate.info()}

    async def read_upload(file: UploadFile) -> bytes:
        data = await file.read()
        if not data:
            raise HTTPException(422, f"{file.filename or 'upload'}: empty file (0 bytes)")
        return data

    @app.post("/predict")
    async def predict(file: UploadFile = File(..., description="the image"),
                      k: int = Query(DEFAULT_TOP_K, ge=1, le=MAX_TOP_K, description="classes to return")):
        data = await read_upload(file)
        return await gate.run(predictor.classify, data, k, file.filename)

    @app.post("/gradcam", response_class=Response)
    async def gradcam(file: UploadFile = File(..., description="the image"),
                      class_name: str | None = Query(None, alias="class", max_length=200,
                                                     description="class to explain (default: the top one)")):
        data = await read_upload(file)
        png = await gate.run(predictor.gradcam_png, data, class_name, file.filename)
        return Response(png, media_type="image/png")

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(run_path: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
          max_bytes: int = DEFAULT_MAX_BYTES, workers: int | None = None,
          max_waiting: int = DEFAULT_MAX_WAITING, log_level: str = "info") -> None:
    """Run the app under uvicorn until interrupted."""
    import uvicorn
    if not 0 <= port <= 65535:
        raise CnnlabError(f"--port must be between 0 and 65535, got {port}")
    app = create_app(run_path, max_bytes, workers=workers, max_waiting=max_waiting)
    if not is_loopback(host):
        print(f"cnnlab: warning: listening on {host}, reachable from other machines; the server has "
              f"no authentication (use the default 127.0.0.1 to keep it local)", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"cnnlab: serving {run_path} at http://{shown}:{port}/ (Ctrl-C to stop)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False,
                timeout_keep_alive=5)
