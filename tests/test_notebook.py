"""docs/lesson.ipynb: stored without outputs, and run top to bottom by a real Jupyter kernel
(nbclient + ipykernel) on a small CIFAR-10 subset, as a learner would run it."""
from __future__ import annotations

import base64
import json
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "lesson.ipynb"
PARAMETERS = ("CNNLAB_LESSON_DATA", "CNNLAB_LESSON_TRAIN_SIZE", "CNNLAB_LESSON_EPOCHS")
# ~1,000 images and 2 epochs: about a minute on 2 CPU cores (the lesson's own check, not its accuracy).
TRAIN_PER_CLASS, TEST_PER_CLASS, TRAIN_SIZE, EPOCHS = 120, 20, 1000, 2
KERNEL = "cnnlab-test"   # a kernel spec naming this interpreter, whatever else Jupyter has installed
PNG = b"\x89PNG\r\n\x1a\n"


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_notebook_is_stored_clean_with_its_parameters_first():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    stale = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not stale, (f"{NOTEBOOK.name} was saved with outputs in cells {stale}: clear them "
                       f"(Jupyter: Edit > Clear Outputs of All Cells, then save)")
    first = nb.cells[0]
    assert first.cell_type == "code" and all(p in first.source for p in PARAMETERS)


def kernel_spec(folder: Path) -> Path:
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cnnlab tests", "language": "python"}))
    return folder


def cell(nb, text: str):
    """The code cell whose source contains ``text``."""
    found = [c for c in code_cells(nb) if text in c.source]
    assert len(found) == 1, f"{len(found)} cells contain {text!r}"
    return found[0]


def stdout(c) -> str:
    return "".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def pngs(c) -> list[bytes]:
    return [base64.b64decode(o.data["image/png"]) for o in c.outputs if "image/png" in o.get("data", {})]


@pytest.mark.slow
def test_the_lesson_runs_top_to_bottom_in_a_kernel(make_subset, tmp_path, monkeypatch):
    data = make_subset({"train": TRAIN_PER_CLASS, "test": TEST_PER_CLASS}, name="cifar-subset")
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_spec(tmp_path / "jupyter")))
    monkeypatch.setenv("CNNLAB_LESSON_DATA", str(data))
    monkeypatch.setenv("CNNLAB_LESSON_TRAIN_SIZE", str(TRAIN_SIZE))
    monkeypatch.setenv("CNNLAB_LESSON_EPOCHS", str(EPOCHS))
    work = tmp_path / "elsewhere"      # any working folder: the runs land in it
    work.mkdir()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    start = time.monotonic()
    nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, startup_timeout=120,
                            resources={"metadata": {"path": str(work)}}).execute()   # raises on a failing cell
    seconds = time.monotonic() - start
    print(f"docs/lesson.ipynb ran in {seconds:.0f} s")

    outputs = [(i, o) for i, c in enumerate(code_cells(nb)) for o in c.outputs]
    assert not [o for _, o in outputs if o.output_type == "error"]
    noise = [(i, o.text) for i, o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not noise, f"the notebook printed warnings or errors: {noise}"

    # Every picture it draws is inline, as a PNG.
    for source in ("cnnlab.show_samples(DATA)", 'run.plot("accuracy")', 'run.plot("loss")',
                   'run.plot("confusion_matrix")', 'run.plot("mistakes")', 'run.plot("gradcam_mistakes")',
                   "explanation = run.explain(image)", 'explanation.figure("feature_maps")'):
        drawn = pngs(cell(nb, source))
        assert len(drawn) == 1 and drawn[0].startswith(PNG) and len(drawn[0]) > 2000, source

    # Training: one progress widget for the whole run (not one per epoch), a line per epoch,
    # then the run's card with its accuracy and the curve inline.
    fit = cell(nb, "run = cnnlab.train(")
    widgets = [o for o in fit.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widgets) == 1
    assert len(re.findall(r"^epoch \d/2  loss", stdout(fit), re.M)) == EPOCHS
    assert "1,000 train" not in stdout(fit) and "900 train / 100 val" in stdout(fit)   # TRAIN_SIZE, 10% held out
    card = fit.outputs[-1].data["text/html"]
    assert "test accuracy" in card and 'src="data:image/png;base64,' in card

    # The history it prints, in Keras's shape: a list per key, one number per epoch.
    history = stdout(cell(nb, "again = cnnlab.load(run.path)"))
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        values = re.search(rf"^{key}\s+\[([^\]]*)\]", history, re.M)
        assert values and len(values.group(1).split(",")) == EPOCHS, history
    assert "test accuracy" in stdout(cell(nb, "result = run.evaluate()"))
    assert "Report" in cell(nb, "report = run.report()").outputs[-1].data["text/html"]
    assert "replaced the head" in stdout(cell(nb, "init_from=run.path"))

    runs = list((work / "runs").glob("lesson-*"))
    assert len(runs) == 1
    assert {p.name for p in runs[0].iterdir()} == {"tutorial", "speed70", "cats-and-dogs"}
    assert all((p / "report.html").is_file() for p in runs[0].iterdir())
