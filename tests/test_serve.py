"""apps/serve: the web app on a real server (`python -m cnnlab serve` on a free loopback port, as a
user would start it): predictions, upload limits, a busy server, Grad-CAM and a real browser."""
from __future__ import annotations

import http.client
import io
import json
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from conftest import POSTSCRIPT, load_benchmark, poison
from conftest import cifar_test_images as _cifar_test_images

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 90          # importing torch + FastAPI on a busy 2-core machine
UPLOAD_LIMIT_MB = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _open(request: str | urllib.request.Request) -> tuple[int, bytes, dict]:
    """Status, body and headers, for error statuses too."""
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def _get(url: str) -> tuple[int, bytes, dict]:
    return _open(url)


def _post_raw(url: str, data: bytes, filename: str = "image.jpg", content_type: str = "image/jpeg",
              field: str = "file") -> tuple[int, bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return _open(req)


def _post_file(url: str, data: bytes, filename: str = "image.jpg", content_type: str = "image/jpeg",
               field: str = "file") -> tuple[int, dict]:
    status, body, _ = _post_raw(url, data, filename, content_type, field)
    return status, json.loads(body)


def _raw_status(port: int, request: bytes, body_chunks=()) -> tuple[int, bytes]:
    """Send a hand-made request, then body chunks until the server answers; return its reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        for chunk in body_chunks:
            if select.select([s], [], [], 0)[0]:
                break                   # the server has answered: stop sending
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        reply = b""
        try:
            while part := s.recv(65536):
                reply += part
        except ConnectionResetError:
            pass                        # closed with our unread upload in its buffer
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply.split(b" ", 2)[1]), reply


@contextmanager
def _in_process(app) -> Iterator[str]:
    """``app`` served by uvicorn in a thread of this process (so tests can patch it); its base URL."""
    import uvicorn
    port = _free_port()
    userver = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=userver.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not userver.started:
            assert time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        userver.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def server_process(trained_run):
    """The server's base URL and its process."""
    port = _free_port()
    log = trained_run.path.parent / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cnnlab", "serve", str(trained_run.path), "--port",
                                 str(port), "--max-upload-mb", str(UPLOAD_LIMIT_MB)], stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            try:
                if _get(base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"cnnlab serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def server(server_process):
    return server_process[0]


def test_server_health_and_self_contained_page(server, trained_run):
    status, body, _ = _get(server + "/health")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok"
    assert info["model"]["class_names"] == trained_run.class_names
    assert info["max_upload_bytes"] == UPLOAD_LIMIT_MB * 1_000_000
    status, page, headers = _get(server + "/")
    assert status == 200 and b"<html" in page
    assert "default-src 'self'" in headers.get("content-security-policy", "")
    for asset in ("/", "/static/app.js", "/static/style.css"):
        text = _get(server + asset)[1].decode()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text   # no network


def test_server_predicts_a_good_image_like_pytorch(server, trained_run, tiny_cifar):
    path = _cifar_test_images(tiny_cifar, per_class=1)[0][3]
    status, reply = _post_file(server + "/predict?k=3", path.read_bytes(), path.name)
    assert status == 200, reply
    assert len(reply["top"]) == 3 and reply["file"] == path.name
    expected = trained_run.predict([path], top_k=3)[0]["top"]
    assert [t["class"] for t in reply["top"]] == [t["class"] for t in expected]
    assert reply["top"][0]["probability"] == pytest.approx(expected[0]["probability"], abs=1e-5)   # float32 rounding
    status, reply = _post_file(server + "/predict", path.read_bytes(), path.name)
    assert status == 200 and len(reply["top"]) == 5     # default k


def test_server_refuses_oversize_before_reading_the_body(server):
    port = int(server.rsplit(":", 1)[1])
    declared = 50 * UPLOAD_LIMIT_MB * 1_000_000
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    t0 = time.monotonic()
    status, reply = _raw_status(port, head)            # not one byte of the body is sent
    assert status == 413 and b"upload too large" in reply
    assert time.monotonic() - t0 < 10


def test_server_refuses_oversize_chunked_upload_while_streaming(server):
    port = int(server.rsplit(":", 1)[1])
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    part = b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
    piece = b"\xff" * 65536
    chunks = [b"%x\r\n%s\r\n" % (len(part), part)] + [b"%x\r\n%s\r\n" % (len(piece), piece)] * 40
    status, reply = _raw_status(port, head, chunks)    # 2.6 MB, never finished
    assert status == 413 and b"upload too large" in reply


def test_server_413_reaches_clients_that_send_the_whole_body(server):
    """urllib sends all 64 MB before it reads a byte: the server reads and drops them, so the
    413 arrives instead of "connection reset by peer" (which closing at once gave)."""
    huge = b"\xff\xd8" + b"\0" * (64 * 1_000_000)
    status, reply = _post_file(server + "/predict", huge, "huge.jpg")
    assert status == 413 and "the limit is 1,000,000 bytes (1 MB)" in reply["detail"]

    # The same for a chunked body with no length, sent to its end by http.client.
    host, port = server.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        pieces = [b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n',
                  *[b"\xff" * 65536] * 80, b"\r\n--x--\r\n"]
        conn.request("POST", "/predict", body=iter(pieces), encode_chunked=True,
                     headers={"Content-Type": "multipart/form-data; boundary=x"})
        response = conn.getresponse()
        assert response.status == 413 and b"sent more than 1,000,000 bytes" in response.read()
        assert response.getheader("content-security-policy")          # the middleware's answers too
    finally:
        conn.close()
    assert _get(server + "/health")[0] == 200                         # and the server carries on


def test_server_under_concurrent_load(server_process, trained_run, tiny_cifar, tmp_path):
    """benchmarks/serve_load.py, small: 4 clients x 20 requests of good images, 4 MB bodies and
    text, every answer checked against Run.predict, the server's memory read from /proc."""
    base, proc = server_process
    bench = load_benchmark("serve_load")
    goods = bench.good_images(trained_run, tmp_path / "images", cifar=tiny_cifar / "test")
    assert len(goods) >= 40 and {g.content_type for g in goods} == {"image/jpeg", "image/png"}
    result = bench.drive(base, proc.pid, goods, clients=4, requests=20, seed=1)
    assert result["errors"] == 0, result["error_examples"]
    assert result["requests"] == 80 and set(result["statuses"]) == {"200", "413", "415"}
    assert result["server"]["peak_running"] <= result["server"]["workers"] and result["server"]["refused"] == 0
    # Sixteen 4 MB bodies went through; none stayed (or was ever held whole).
    assert result["rss_peak_mb"] - result["rss_baseline_mb"] < 40, result


def test_busy_server_runs_at_most_its_workers_and_answers_503_beyond_the_queue(trained_run, tiny_cifar):
    """One worker and one waiting place: a third request at once gets 503 and Retry-After,
    the first two finish; the model never runs twice at a time."""
    from cnnlab.apps.serve import create_app
    app = create_app(trained_run.path, UPLOAD_LIMIT_MB * 1_000_000, workers=1, max_waiting=1)
    gate, predictor = app.state.gate, app.state.predictor
    release, running, seen = threading.Event(), [0], [0]
    real = predictor.classify

    def slow_classify(*args):
        running[0] += 1
        seen[0] = max(seen[0], running[0])
        try:
            release.wait(30)
            return real(*args)
        finally:
            running[0] -= 1

    predictor.classify = slow_classify
    image = _cifar_test_images(tiny_cifar, per_class=1)[0][0].read_bytes()
    with _in_process(app) as base:
        try:
            answers: list = [None, None]

            def post(i: int) -> None:
                answers[i] = _post_file(base + "/predict", image)

            first = threading.Thread(target=post, args=(0,))
            second = threading.Thread(target=post, args=(1,))
            first.start()
            _wait_for(lambda: gate.running == 1)
            second.start()
            _wait_for(lambda: gate.waiting == 1)
            status, body, headers = _post_raw(base + "/predict", image)
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(body)["detail"].startswith("server busy: 1 request(s) running the model and 1 waiting")
            release.set()
            first.join(30)
            second.join(30)
            assert [a[0] for a in answers] == [200, 200]
            assert seen[0] == 1 and gate.peak_running == 1 and gate.refused == 1
            assert json.loads(_get(base + "/health")[1])["inference"] == {
                "workers": 1, "max_waiting": 1, "running": 0, "waiting": 0, "peak_running": 1, "refused": 1}

        finally:
            release.set()   # a failed assertion must not leave the two requests waiting

def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


def test_server_wrong_type_corrupt_bomb_and_missing_field(server, tiny_cifar, tmp_path):
    status, reply = _post_file(server + "/predict", b"%PDF-1.4 definitely not an image", "doc.pdf",
                               "application/pdf")
    assert status == 415 and "doc.pdf is not an image" in reply["detail"]

    good = _cifar_test_images(tiny_cifar, per_class=1)[0][0].read_bytes()
    status, reply = _post_file(server + "/predict", good[: len(good) // 3], "cut.jpg")
    assert status == 422 and "cut.jpg could not be decoded" in reply["detail"]

    bomb = io.BytesIO()
    Image.new("1", (10_000, 5_000)).save(bomb, "PNG")    # 50 M pixels in a few kB
    status, reply = _post_file(server + "/predict", bomb.getvalue(), "bomb.png", "image/png")
    assert len(bomb.getvalue()) < UPLOAD_LIMIT_MB * 1_000_000
    assert status == 413 and "decompression bomb" in reply["detail"]

    status, _ = _post_file(server + "/predict", good, field="image")
    assert status == 422



def test_decoder_exceptions_and_other_formats_are_a_4xx_not_a_500(trained_run, monkeypatch):
    """Issue 38 findings 1 and 4 through the server: PostScript is refused unread (415), and
    whatever a decoder raises on a crafted file is a one-line 422, never a 500."""
    from PIL import PngImagePlugin

    from cnnlab.apps.serve import create_app
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with _in_process(create_app(trained_run.path)) as base:
        status, reply = _post_file(base + "/predict", POSTSCRIPT, "photo.jpg")
        assert status == 415 and "photo.jpg is not an image cnnlab reads" in reply["detail"]
        assert "its bytes are EPS" in reply["detail"]
        for error in (NotImplementedError, AttributeError):
            def broken(self, error=error):
                raise error("crafted")
            monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", broken)
            status, reply = _post_file(base + "/predict", png.getvalue(), "mutated.png", "image/png")
            assert status == 422 and "\n" not in reply["detail"], reply
            assert reply["detail"].startswith(f"mutated.png could not be decoded (not a readable image: the "
                                              f"decoder failed ({error.__name__}: crafted)")


def test_nan_outputs_are_an_error_not_nan_percentages(trained_run, tiny_cifar, tmp_path):
    """Issue 38 finding 2: a model whose outputs are nan (its std buffer zeroed: the weights
    themselves are finite, so it loads) answers with the reason, never "cat nan%"."""
    from cnnlab.apps.serve import create_app
    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    poison(run / "model.safetensors", "std", 0.0)
    image = _cifar_test_images(tiny_cifar, per_class=1)[0][0].read_bytes()
    with _in_process(create_app(run)) as base:
        status, reply = _post_file(base + "/predict", image)
    assert status == 500 and reply["detail"].startswith("run: the model's outputs are nan or inf for 1 of 1 image")

def test_server_gradcam_returns_a_png(server, trained_run, tiny_cifar):
    path = _cifar_test_images(tiny_cifar, per_class=1)[0][3]
    status, body, headers = _post_raw(server + "/gradcam", path.read_bytes(), path.name)
    assert status == 200 and headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(body)) as im:
        h, w = trained_run.input_size
        assert im.format == "PNG" and im.mode == "RGB" and im.width >= 128 and im.width * h == im.height * w
    other = trained_run.class_names[-1]
    status, body, _ = _post_raw(server + f"/gradcam?class={other}", path.read_bytes(), path.name)
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"

    status, reply = _post_file(server + "/gradcam", b"%PDF-1.4 not an image", "doc.pdf", "application/pdf")
    assert status == 415 and "doc.pdf is not an image" in reply["detail"]
    status, reply = _post_file(server + "/gradcam?class=no-such-class", path.read_bytes(), path.name)
    assert status == 422 and reply["detail"].startswith("class 'no-such-class' is not one of the run's classes")


def test_browser_uploads_an_image_and_sees_the_prediction(server, trained_run, tiny_cifar, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium to run the browser test")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    path = _cifar_test_images(tiny_cifar, per_class=1)[0][5]
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    too_big = tmp_path / "big.png"
    too_big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * UPLOAD_LIMIT_MB * 500_000))
    console_errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.on("console", lambda m: m.type == "error" and console_errors.append(m.text))
            page.goto(server + "/")
            sync_api.expect(page.locator("#model-info")).to_contain_text("tutorial", timeout=20_000)
            page.set_input_files("#file", str(path))
            rows = page.locator("#results .result")
            sync_api.expect(rows).to_have_count(5, timeout=20_000)
            expected = trained_run.predict([path], top_k=1)[0]["top"][0]["class"]
            assert rows.first.locator(".label").inner_text() == expected
            assert page.locator("#preview").get_attribute("src").startswith("blob:")
            heat = page.locator("#gradcam")                   # the Grad-CAM under the bars
            sync_api.expect(heat).to_be_visible(timeout=20_000)
            page.wait_for_function("document.getElementById('gradcam').complete", timeout=20_000)
            assert heat.evaluate("img => img.naturalWidth") > 0
            assert heat.get_attribute("src").startswith("blob:")

            page.set_input_files("#file", str(not_image))
            sync_api.expect(page.locator("#error")).to_contain_text("not an image", timeout=20_000)
            sync_api.expect(page.locator("#top-panel")).to_be_hidden()     # no stale answer shown

            # Over the limit: refused by the page, with the limit in words, and never sent.
            posts: list[str] = []
            page.on("request", lambda r: r.method == "POST" and posts.append(r.url))
            page.set_input_files("#file", str(too_big))
            sync_api.expect(page.locator("#error")).to_contain_text(
                "big.png is 1.5 MB, over this server's upload limit of 1 MB", timeout=20_000)
            sync_api.expect(page.locator("#limits")).to_contain_text("up to 1 MB")
            assert posts == []
        finally:
            browser.close()
    # A refused upload logs its 415 as a failed resource; anything else is a page bug.
    assert not [e for e in console_errors if "415" not in e], console_errors
