"""The top-level API: ``import cnnlab`` stays cheap; ``cnnlab.train`` resolves, validates and
writes a run folder as ``cnnlab train`` does; a ``Run`` answers evaluate, predict, report,
plot and explain, shows itself as an HTML card, and its pictures are ``Figure``s."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

import cnnlab
from cnnlab.core.config import Config
from cnnlab.core.errors import CnnlabError
from cnnlab.engine.callbacks import ProgressBar


def fresh_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_cnnlab_loads_no_torch_and_the_api_loads_on_first_use():
    out = fresh_python("import sys, cnnlab; "
                       "print('torch' in sys.modules, callable(cnnlab.train), 'torch' in sys.modules)")
    assert out.split() == ["False", "True", "True"]


def test_models_is_the_subpackage_and_called_lists_the_zoo_in_either_import_order():
    out = fresh_python("import cnnlab.models.registry as r, cnnlab; rows = cnnlab.models(); "
                       "print(len(rows), rows[0]['name'] == r.list_models()[0], cnnlab.models.registry is r)")
    assert out.split()[1:] == ["True", "True"] and int(out.split()[0]) > 5
    rows = cnnlab.models()
    assert {"name", "family", "year", "paper"} <= set(rows[0]) and "tutorial" in {r["name"] for r in rows}
    assert cnnlab.models is sys.modules["cnnlab.models"]   # the package itself, callable


def test_summary_is_the_keras_style_table():
    text = cnnlab.summary("tutorial")
    assert "Total params: 122,570" in text and "(None, 32, 30, 30)" in text


@pytest.mark.parametrize("keys, message", [
    ({"lrr": 0.1}, "cnnlab.train(): unknown config key 'lrr'; did you mean 'lr'?"),
    ({"lr": "fast"}, "cnnlab.train(): lr must be a number; got 'fast'"),
    ({"recipe": "speed7"}, "unknown recipe 'speed7'"),
    ({"nproc": 2}, "nproc 2 needs the command line"),
    ({"config": Config(), "recipe": "lesson"}, "or a Config, not both"),
])
def test_bad_keys_are_one_line_errors_before_any_folder(keys, message, tmp_path):
    with pytest.raises(CnnlabError) as e:
        cnnlab.train(data=str(tmp_path), out=tmp_path / "run", **keys)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def run(tiny_cifar, tmp_path_factory):
    """One quiet epoch on the tiny folder, through the API (Path values and all)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNLAB_DATA", str(tmp_path_factory.mktemp("cache")))
        return cnnlab.train(data=tiny_cifar, model="tutorial", epochs=1, batch_size=50, threads=1,
                            out=tmp_path_factory.mktemp("api") / "run", quiet=True)


def test_train_writes_the_command_lines_run_folder_and_report(run):
    names = {p.name for p in run.path.iterdir()}
    assert {"config.json", "model.safetensors", "history.json", "metrics.json", "report.html", "plots"} <= names
    assert run.config.batch_size == 50 and run.config.model == "tutorial"
    assert set(run.history) >= {"loss", "accuracy", "val_loss", "val_accuracy"} and len(run.history["loss"]) == 1
    assert run.accuracy == run.metrics["test_accuracy"] and run.class_names[0] == "airplane"
    again = cnnlab.load(run.path)
    assert isinstance(again, cnnlab.Run) and again.history == run.history


@pytest.mark.slow
def test_quiet_prints_nothing_and_progress_prints_epoch_lines_without_a_bar_off_a_terminal(tiny_cifar, tmp_path,
                                                                                            capsys):
    cnnlab.train(data=str(tiny_cifar), epochs=1, batch_size=100, threads=1, out=tmp_path / "quiet", quiet=True)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    cnnlab.train(data=str(tiny_cifar), epochs=1, batch_size=100, threads=1, out=tmp_path / "loud")
    out = capsys.readouterr()
    assert "epoch 1/1  loss" in out.out and "test accuracy" in out.out
    assert "batch/s" not in out.err       # tqdm's bar is for terminals (and notebooks)


def assert_same_answers(got: list[dict], want: list[dict]) -> None:
    """The same classes in the same order, and the same probabilities to float32 rounding: oneDNN
    blocks its products by batch size, so an image alone and in a batch of 3 sum them in other
    orders (1.5e-8 apart measured on an AMD Zen 5 with AVX-512; two of its sample images differ by 0.019
    or more in some class, even under this barely trained model)."""
    assert [[c["class"] for c in r["top"]] for r in got] == [[c["class"] for c in r["top"]] for r in want]
    assert [r["file"] for r in got] == [r["file"] for r in want]
    for r, w in zip(got, want):
        assert [c["probability"] for c in r["top"]] == pytest.approx([c["probability"] for c in w["top"]],
                                                                     rel=0, abs=1e-6)


def test_predict_takes_files_one_array_a_batch_or_a_list(run, tiny_cifar):
    images = run.evaluation["sample_images"][:3]                  # uint8 (3, 32, 32, 3)
    batch = run.predict(images, top_k=2)
    assert len(batch) == 3 and len(batch[0]["top"]) == 2
    assert_same_answers(run.predict(images[0], top_k=2), batch[:1])
    assert_same_answers(run.predict(list(images), top_k=2), batch)
    big = np.repeat(np.repeat(images[0], 2, 0), 2, 1)               # 64x64: resized as files are
    assert len(run.predict(big)) == 1
    file = next((tiny_cifar / "test" / "cat").iterdir())
    assert run.predict(file, top_k=1)[0]["file"] == str(file)
    with pytest.raises(CnnlabError, match="no-such.jpg"):
        run.predict(["no-such.jpg"])


def test_evaluate_scores_the_test_split_as_training_did(run):
    result = run.evaluate(device="cpu")
    assert result["test_accuracy"] == pytest.approx(run.accuracy, abs=1e-6)
    assert set(result["per_class_accuracy"]) == set(run.class_names)


def test_report_and_plots_are_the_report_pictures_as_figures(run):
    report = run.report()
    assert report.path == run.path / "report.html" and report.path.is_file()
    assert "accuracy" in report.plots and report.findings and "<li>" in report._repr_html_()
    for name in ("accuracy", "confusion_matrix", "mistakes"):
        fig = run.plot(name)
        assert isinstance(fig, Figure)
        w, h = fig.get_size_inches() * fig.dpi
        png = report.plots[name].read_bytes()
        assert (round(w), round(h)) == (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big"))
    with pytest.raises(CnnlabError, match="the plots are accuracy, loss"):
        run.plot("curves")


def test_explain_draws_gradcam_for_an_array_or_a_file(run, tiny_cifar, tmp_path):
    image = run.evaluation["sample_images"][0]
    e = run.explain(image, out=tmp_path)
    assert e.folder == tmp_path / "array" and e.predicted["class"] in run.class_names
    assert e._repr_png_().startswith(b"\x89PNG") and isinstance(e.figure("feature_maps"), Figure)
    file = next((tiny_cifar / "test" / "dog").iterdir())
    e = run.explain(file, out=tmp_path, top_k=3)
    assert e.folder == tmp_path / file.stem and len(e.top) == 3 and e.summary["image"] == str(file)
    with pytest.raises(CnnlabError, match="one image"):
        run.explain(run.evaluation["sample_images"][:2])


def test_a_run_shows_itself_as_a_card(run):
    card = run._repr_html_()
    assert "tutorial" in card and "test accuracy" in card and 'src="data:image/png;base64,' in card
    assert "<script" not in card and len(card) < 60_000
    assert repr(run).startswith(f"Run('{run.path}': tutorial")


def test_show_samples_is_a_figure_and_figures_show_inline_in_ipython(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNLAB_DATA", str(tmp_path))
    from IPython.core.interactiveshell import InteractiveShell
    shell = InteractiveShell.instance()   # what get_ipython() returns inside a notebook
    try:
        fig = cnnlab.show_samples(tiny_cifar, per_class=2)
        data, _ = shell.display_formatter.format(fig)
        assert data["image/png"][:4] == b"\x89PNG"
    finally:
        InteractiveShell.clear_instance()


class _State:
    epoch, step_in_epoch = 0, 0
    history = {"loss": [1.0], "accuracy": [0.5], "val_loss": [None], "val_accuracy": [None], "lr": [0.1],
               "seconds": [1.0]}


class _Trainer:
    state = _State()


class _Bar:
    """What ProgressBar asks of tqdm's notebook widget."""

    def __init__(self, total, **kwargs):
        self.total, self.n, self.made, self.resets, self.closed = total, 0, 1, 0, False

    def reset(self, total):
        self.total, self.n, self.resets = total, 0, self.resets + 1

    def set_description(self, desc, refresh=True):
        self.desc = desc

    def set_postfix(self, **kwargs):
        pass

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_in_a_notebook_one_bar_serves_every_epoch(monkeypatch, capsys):
    import cnnlab.engine.callbacks as callbacks
    made: list[_Bar] = []
    monkeypatch.setattr(callbacks, "auto_tqdm", lambda **kw: made.append(_Bar(**kw)) or made[-1])
    bar, trainer = ProgressBar(3, notebook=True), _Trainer()
    for epoch in range(3):
        trainer.state.epoch = epoch
        bar.on_epoch_begin(trainer, 10)
        trainer.state.step_in_epoch = 7
        bar.on_log(trainer, {"loss": 1.0, "accuracy": 0.5, "img_s": 100.0})
        trainer.state.epoch, trainer.state.step_in_epoch = epoch + 1, 0
        bar.on_epoch_end(trainer, {"images": 100})
        assert made[0].n == 10        # filled at the epoch's end, not left at the last log
    bar.on_train_end(trainer, {})
    assert len(made) == 1 and made[0].resets == 2 and made[0].closed
    assert capsys.readouterr().out.count("loss 1.0000") == 3


def test_train_leaves_threads_and_the_global_random_state_as_it_found_them(tmp_path):
    """A library is a guest: the thread count and torch's global random state come back as they
    were, after a run that changed both (its own threads, its seeded initialisation)."""
    import torch
    from PIL import Image
    for split, n in (("train", 6), ("test", 2)):
        for c, level in (("a", 30), ("b", 220)):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((16, 16, 3), level + i, np.uint8)).save(tmp_path / "data" / split / c / f"{i}.png")
    before_threads = torch.get_num_threads()
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    cnnlab.train(data=tmp_path / "data", model="tutorial", epochs=1, batch_size=4, threads=1 if before_threads > 1 else 2,
                 out=tmp_path / "run", quiet=True)
    assert torch.get_num_threads() == before_threads
    assert torch.equal(torch.rand(3), expected)
