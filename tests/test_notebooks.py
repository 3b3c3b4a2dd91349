"""Every notebook in notebooks/ runs top to bottom."""

import json
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))


def test_there_are_notebooks_and_every_cell_has_an_id():
    """Cell ids (nbformat 4.5): without them nbformat warns on reading, and later versions refuse."""
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())['cells']
        assert all('id' in cell for cell in cells), path.name


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path):
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': str(ROOT)}}).execute()
    errors = [output for cell in notebook.cells if cell.cell_type == 'code'
              for output in cell.get('outputs', []) if output.output_type == 'error']
    assert not errors
