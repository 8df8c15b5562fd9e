"""The Colab notebooks (colab/*.ipynb) run top to bottom on the phantom and draw their figures.

One tiny encoder (configs/pretrain.py:test) is pretrained once for every notebook, also under
pytest-xdist (a file lock shares it between workers); each notebook runs in a fresh python3
kernel with WORKDIR, DATA_DIR and smaller sizes injected after its "parameters" cell.
"""

import base64
import io
import os
from pathlib import Path

import nbformat
import numpy as np
import pytest
from filelock import FileLock
from nbclient import NotebookClient
from PIL import Image

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = ("probing", "slice_selection", "retrieval", "embedding_space")
KERNEL = "python3"  # the kernelspec of the environment running the tests (ipykernel)
CELL_TIMEOUT_S = 300  # the pretraining-free cells take seconds; a stuck kernel fails the test
# Smaller than the notebooks' defaults (200/100/200); the same for all, so one build serves them.
SPLITS = dict(num_train=48, num_validation=32, num_test=48)
OVERRIDES = {"embedding_space": dict(NUM_PER_MODALITY=32), "retrieval": dict(TOP_K=4)}
MIN_FIGURE_PX = 300  # every figure is at least this wide and high


def _read(name: str):
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """(workdir, data_dir) of a tiny pretraining run, made once per test session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, shared by its xdist workers
    workdir, data_dir = root / "notebooks_pretrain", root / "notebooks_data"
    done = root / "notebooks_pretrain.done"
    with FileLock(str(root / "notebooks_pretrain.lock")):
        if not done.exists():
            from configs import pretrain
            from unimedi_jax.train import trainer

            config = pretrain.get_config("test")
            config.data.data_dir = str(data_dir)
            trainer.train_and_evaluate(config, str(workdir))
            done.touch()
    return workdir, data_dir


def _inject(nb, params: dict) -> None:
    """Inserts a cell setting `params` right after the notebook's "parameters" cell."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))


def _figures(nb) -> list[np.ndarray]:
    """The PNG outputs of an executed notebook as (H, W, C) arrays."""
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(out.data["image/png"]))))
            for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if "image/png" in out.get("data", {})]


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs not cleared"
    install = code[0].source
    assert '"google.colab" in sys.modules' in install and "pip install" in install
    params = next(c.source for c in code if "parameters" in c.metadata.get("tags", []))
    assert 'WORKDIR = ""' in params and "DATA_DIR =" in params
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) - 1, "explain each step"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws(name, pretrained, tmp_path, monkeypatch):
    workdir, data_dir = pretrained
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits it; the notebook plots inline
    nb = _read(name)
    _inject(nb, dict(WORKDIR=str(workdir), DATA_DIR=str(data_dir), PHANTOM_SPLITS=SPLITS,
                     **OVERRIDES.get(name, {})))
    # Raises CellExecutionError, with the cell and its traceback, when a cell fails.
    NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    figures = _figures(nb)
    assert len(figures) == 1, f"{name} drew {len(figures)} figures, expected 1"
    image = figures[0]
    assert min(image.shape[:2]) >= MIN_FIGURE_PX
    assert image[..., :3].std() > 0, "blank figure"
    if os.environ.get("UNIMEDI_NOTEBOOK_FIGURES"):  # a folder to keep the figures in
        Image.fromarray(image).save(Path(os.environ["UNIMEDI_NOTEBOOK_FIGURES"]) / f"{name}.png")
