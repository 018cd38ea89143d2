"""Every notebook in nbs/ executes top to bottom without error."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NBS = sorted((Path(__file__).parent.parent / "nbs").glob("*.ipynb"))


@pytest.mark.parametrize("path", NBS, ids=[p.name for p in NBS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPLAB_RUNS", str(tmp_path))  # notebooks write their logs here
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
