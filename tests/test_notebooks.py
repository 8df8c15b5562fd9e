"""The Colab notebooks (colab/*.ipynb) run top to bottom on the phantom and draw their figures.

They run on their default encoder, the bundled checkpoint (no pretraining here). The phantom is
built once for every notebook, also under pytest-xdist (a file lock shares it between workers);
each notebook runs in a fresh python3 kernel with DATA_DIR and smaller sizes injected after its
"parameters" cell. The Colab install cell is run with a stand-in for Colab and for `!pip`.
"""

import base64
import io
import os
import sys
import types
from pathlib import Path

import nbformat
import numpy as np
import pytest
from filelock import FileLock
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient
from PIL import Image

from unimedi_jax.data import sources
from unimedi_jax.models import bundle

COLAB = Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = ("probing", "slice_selection", "retrieval", "embedding_space")
KERNEL = "python3"  # the kernelspec of the environment running the tests (ipykernel)
CELL_TIMEOUT_S = 300  # every cell takes seconds; a stuck kernel fails the test
ENCODER = "phantom-default"  # the notebooks' default WORKDIR: the bundled checkpoint
# Smaller than the notebooks' defaults (200/100/200); the same for all, so one build serves them.
SPLITS = dict(num_train=48, num_validation=32, num_test=32)  # one eval batch of 32
OVERRIDES = {"embedding_space": dict(NUM_PER_MODALITY=32), "retrieval": dict(TOP_K=4)}
MIN_FIGURE_PX = 300  # every figure is at least this wide and high


def _read(name: str):
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The phantom at the bundled encoder's stored sizes with SPLITS, built once per session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, shared by its xdist workers
    data_dir, done = root / "notebooks_data", root / "notebooks_data.done"
    with FileLock(str(root / "notebooks_data.lock")):
        if not done.exists():
            config = bundle.read_config(ENCODER)
            for modality in ("ct", "xray"):
                sources.open_split("phantom", modality, "test", data_dir=str(data_dir),
                                   stored_size=config.data[modality].stored_size,
                                   options=SPLITS)
            done.touch()
    return data_dir


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
    assert "git+" not in install and "YOUR-ORG" not in install  # no placeholder, no network
    params = next(c.source for c in code if "parameters" in c.metadata.get("tags", []))
    assert f'WORKDIR = "{ENCODER}"' in params and "DATA_DIR =" in params
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= len(code) - 1, "explain each step"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws(name, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits it; the notebook plots inline
    nb = _read(name)
    _inject(nb, dict(DATA_DIR=str(data_dir), PHANTOM_SPLITS=SPLITS, **OVERRIDES.get(name, {})))
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


class _FakeIPython:
    """Records the shell commands (`!...`) a cell runs, {expressions} expanded as IPython does
    (from the calling cell's names)."""

    def __init__(self):
        self.commands = []

    def system(self, command):
        self.commands.append(command.format(**sys._getframe(1).f_globals))


def _run_install_cell(name, monkeypatch, source=""):
    """Runs the notebook's install cell as on Colab; returns the shell commands it ran."""
    code = TransformerManager().transform_cell(next(
        c.source for c in _read(name).cells if c.cell_type == "code"))
    code = code.replace('SOURCE = ""', f"SOURCE = {source!r}", 1)
    shell = _FakeIPython()
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(compile(code, f"{name}.ipynb:install", "exec"), {"get_ipython": lambda: shell})
    return shell.commands


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_colab_install_cell_installs_the_uploaded_source(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Colab's working folder, where uploads land
    with pytest.raises(FileNotFoundError, match=r"no unimedi-jax source in .*upload the "
                                                r"repository folder, or an archive"):
        _run_install_cell(name, monkeypatch)
    with pytest.raises(FileNotFoundError, match=r"no unimedi-jax source in /no/such\.zip"):
        _run_install_cell(name, monkeypatch, source="/no/such.zip")
    (tmp_path / "unimedi-jax").mkdir()
    (tmp_path / "unimedi-jax" / "setup.py").write_text("")
    assert _run_install_cell(name, monkeypatch) == [f'pip install -q "{tmp_path}/unimedi-jax"']
    (tmp_path / "unimedi-jax.zip").write_bytes(b"")
    archive = _run_install_cell(name, monkeypatch, source=str(tmp_path / "unimedi-jax.zip"))
    assert archive == [f'pip install -q "{tmp_path}/unimedi-jax.zip"']
