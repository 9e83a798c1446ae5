"""The notebooks run headless, top to bottom, on a kernel of this venv's Python, and produce their outputs."""

import json
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient
from PIL import Image

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def venv_kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec whose argv is this interpreter (the installed ``python3`` spec runs whatever
    ``python`` is first on PATH, which may not be the venv)."""
    spec = tmp_path / "jupyter" / "kernels" / "sdl-venv"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "sd_lightning venv", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return "sdl-venv"


def run_notebook(name: str, workdir: Path, kernel: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    NotebookClient(notebook, kernel_name=kernel, timeout=900, resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


def _text(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_notebooks_are_clean_in_the_repo():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), f"{path.name} has outputs"


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, venv_kernel):
    notebook = run_notebook("01_quickstart.ipynb", tmp_path / "work", venv_kernel)
    run_dir = tmp_path / "work" / "outputs" / "notebook_quickstart"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "manifest.json").is_file()
    with Image.open(run_dir / "quickstart_grid.png") as grid:
        assert grid.size == (320, 32)
    validation = pd.read_csv(run_dir / "csv" / "metrics.csv")["val/mse"].dropna()
    assert len(validation) == 2  # validations after steps 10 and 20
    text = _text(notebook)
    assert "train / " in text and f"final val/mse {validation.iloc[-1]:.4f}" in text
    assert not (NOTEBOOKS / "outputs").exists()  # nothing written next to the notebooks


@pytest.mark.slow
def test_compare_sweeps_notebook(tmp_path, venv_kernel):
    notebook = run_notebook("02_compare_sweeps.ipynb", tmp_path / "work", venv_kernel)
    report = tmp_path / "work" / "multirun" / "notebook_sweep" / "comparison"
    table = pd.read_csv(report / "comparison.csv")
    assert len(table) == 4 and {"loss", "seed"} <= set(table.columns)
    assert " ± " in (report / "comparison.md").read_text()
    for name in ("validation_curves.png", "final_vs_params.png", "samples.png"):
        assert (report / name).stat().st_size > 1000
    assert "swept keys: ['loss', 'seed']" in _text(notebook)
