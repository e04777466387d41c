"""models/weights.py: published weights by name: the registry, downloads checked against a real
local HTTP server, the cache, `cnnlab weights fetch` and `import`, and requests refused."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import torch

from cnnlab.cli import main
from cnnlab.core.errors import CnnlabError
from cnnlab.data.download import Checksum
from cnnlab.engine.runs import RECORD, load_run, pretrained_folder
from cnnlab.models import weights as weights_mod
from cnnlab.models.registry import create_model
from cnnlab.models.weights import (
    Download,
    Preprocessing,
    WeightsInfo,
    class_names,
    find_weights,
    list_weights,
    weights_dir,
)


# ----------------------------------------------------------------------------- a local server
class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``/cut/NAME`` promises NAME's length and sends half of it."""
    requests: list[str]

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/cut/"):
            body = (Path(self.directory) / self.path[5:]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(folder served, base URL, the paths requested) of an HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_Handler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}/", requests
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _tiny_weights_file(folder: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision-style ``.pth`` state dict of resnet20 for ImageNet's 1,000 classes."""
    torch.manual_seed(seed)
    state = create_model("resnet20", num_classes=1000, input_size=32).state_dict()
    path = folder / "resnet20-tiny.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def published(server, monkeypatch):
    """A weights entry served by the local server: (entry, its served file, requests)."""
    served, base, requests = server
    path, _ = _tiny_weights_file(served)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    info = WeightsInfo("resnet20", "test_in1k", Download(base + path.name, Checksum("sha256", digest)),
                       Preprocessing(32, 36), license="test", top1=None, default=True)
    registry = weights_mod._registry()
    monkeypatch.setitem(registry, info.name, info)
    return info, path, requests


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ----------------------------------------------------------------------------- registry
def test_every_entry_names_a_model_its_preprocessing_and_imagenet_classes():
    rows = list_weights()
    assert {w.arch for w in rows} >= {"mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                                      "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                                      "regnet_y_400mf", "convnext_tiny", "resnet18", "resnet34", "resnet50"}
    for arch in {w.arch for w in rows}:
        assert sum(w.default for w in rows if w.arch == arch) == 1, arch
    for w in rows:
        pre = w.preprocessing
        assert pre.size <= pre.resize and len(pre.mean) == len(pre.std) == 3, w.name
        assert w.license and (w.top1 is None or 50 < w.top1 < 100), w.name
    names = class_names("imagenet-1k")
    assert len(names) == len(set(names)) == 1000
    assert names[0] == "tench" and names[281] == "tabby" and names[999] == "toilet tissue"


def test_weights_by_model_and_by_tag(published):
    info, _, _ = published
    assert find_weights("resnet50").tag == "imagenet1k_v2"
    assert find_weights("resnet50", "imagenet1k_v1").tag == "imagenet1k_v1"
    assert find_weights("resnet50", "resnet50.imagenet1k_v1").tag == "imagenet1k_v1"
    with pytest.raises(CnnlabError, match=r"resnet50 has no weights 'imagenet1k_v9': choose one of "
                                          r"imagenet1k_v2, imagenet1k_v1"):
        find_weights("resnet50", "imagenet1k_v9")
    with pytest.raises(CnnlabError, match=r"tutorial has no published weights.*drop --pretrained.*efficientnet_lite0"):
        find_weights("tutorial")
    with pytest.raises(CnnlabError, match="unknown model 'resnet5'"):
        find_weights("resnet5")


def test_cnnlab_resnets_take_torchvisions_imagenet_weights_exactly():
    """torchvision's ResNet-50 and cnnlab's, given the same weights under the entry's name
    mapping, compute the same logits."""
    from torchvision.models import resnet50
    torch.manual_seed(0)
    theirs = resnet50().eval()
    for m in theirs.modules():   # non-trivial batch-norm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = create_model("resnet50", num_classes=1000, input_size=224).eval()
    ours.load_state_dict(find_weights("resnet50").rename(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- downloads and the cache
def test_download_is_checked_converted_and_cached_once(published):
    info, path, requests = published
    folder = pretrained_folder(info)
    assert folder == weights_dir() / info.name
    assert requests == ["/" + path.name]
    # Kept as safetensors; the downloaded pickle is gone.
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.json", "model.safetensors", RECORD]
    assert not any((weights_dir() / "downloads").iterdir())
    run = load_run(info.name)
    assert run.class_names == class_names("imagenet-1k")
    assert run.card["center_crop"] == pytest.approx(32 / 36) and run.card["weights"] == info.name
    _, state = _tiny_weights_file(path.parent)   # the same seed: the weights that were served
    torch.testing.assert_close(run.model().net.state_dict()["fc.1.weight"], state["fc.1.weight"])
    # Used again: nothing is fetched.
    assert load_run("resnet20").path == folder and pretrained_folder(info) == folder
    assert requests == ["/" + path.name]


def test_wrong_hash_is_refused_and_nothing_is_kept(published, monkeypatch):
    info, path, _ = published
    path.write_bytes(path.read_bytes() + b"tampered")
    with pytest.raises(CnnlabError, match=r"wrong SHA-256 .* was deleted.*cnnlab weights import"):
        pretrained_folder(info)
    assert _leftovers(weights_dir()) in ([], ["downloads"])


def test_cut_short_download_is_refused_and_nothing_is_kept(published, monkeypatch):
    info, path, _ = published
    base = info.source.url.rsplit("/", 1)[0]
    cut = WeightsInfo(info.arch, info.tag, Download(f"{base}/cut/{path.name}", info.source.checksum),
                      info.preprocessing, info.license, None, default=True)
    monkeypatch.setitem(weights_mod._registry(), info.name, cut)
    with pytest.raises(CnnlabError, match=r"download of resnet20-tiny.pth failed .*cnnlab weights import FILE"):
        pretrained_folder(cut)
    assert _leftovers(weights_dir()) in ([], ["downloads"])


def test_no_network_says_where_to_fetch_from_and_how_to_import(published, monkeypatch, capsys):
    info, path, _ = published
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    offline = WeightsInfo(info.arch, info.tag, Download(f"http://127.0.0.1:{port}/{path.name}", info.source.checksum),
                          info.preprocessing, info.license, None, default=True)
    monkeypatch.setitem(weights_mod._registry(), info.name, offline)
    assert main(["weights", "fetch", "resnet20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"from http://127.0.0.1:{port}/{path.name}" in err[0]
    assert "cnnlab weights import FILE" in err[0] and "Connection refused" in err[0]
    assert _leftovers(weights_dir()) in ([], ["downloads"])
    # Fetched by hand elsewhere, then imported: the cache has it, and no network is needed.
    assert main(["weights", "import", str(path)]) == 0
    assert "is resnet20.test_in1k" in capsys.readouterr().out
    assert load_run("resnet20").card["weights"] == info.name


def test_import_refuses_a_file_that_matches_no_published_hash(tmp_path, capsys):
    stranger = tmp_path / "mystery.pth"
    stranger.write_bytes(os.urandom(1000))
    assert main(["weights", "import", str(stranger)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matches no weights cnnlab knows" in err[0] and "--init-from" in err[0]
    assert _leftovers(weights_dir()) == []


def test_a_cached_model_that_changed_on_disk_is_refused(published):
    info, _, _ = published
    folder = pretrained_folder(info)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CnnlabError, match=rf"changed on disk.*delete {folder}.*cnnlab weights fetch {info.name}"):
        load_run(info.name)


def test_a_name_that_is_neither_a_folder_nor_weights_says_so(capsys):
    assert main(["predict", "efficientnet_lit0", "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert "neither a run folder" in err and "did you mean efficientnet_lite0" in err


@pytest.mark.parametrize("flags,message", [
    (["--model", "tutorial", "--pretrained"], "tutorial has no published weights"),
    (["--model", "resnet50", "--weights", "imagenet1k_v9"], "resnet50 has no weights 'imagenet1k_v9': choose one of"),
    (["--model", "efficientnet_lite0", "--pretrained", "--image-size", "12"],
     "efficientnet_lite0 needs images of at least 17x17 pixels; got 12x12"),
    (["--model", "resnet18", "--pretrained", "--init-from", "x.safetensors"], "give one"),
])
def test_bad_pretrained_requests_are_one_line_and_leave_nothing(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() and _leftovers(weights_dir()) == []
