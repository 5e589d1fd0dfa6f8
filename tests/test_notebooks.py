"""The notebooks: stored without outputs, parameterised by run_dir (papermill), and each executes
headless against the quick runs, reading only the tables."""

import ast
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["grid", "pbt", "scaling", "pbt_vs_grid", "compare"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean_with_a_parameters_cell(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assigned = {
        t.id
        for node in ast.parse(tagged[0].source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
    }
    assert "run_dir" in assigned


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_headless(name, request, tmp_path):
    import papermill

    runs = {
        "grid": {"run_dir": "quick_grid"},
        "pbt": {"run_dir": "quick_pbt"},
        "scaling": {"run_dir": "quick_scaling"},
        "pbt_vs_grid": {"run_dir": "quick_grid", "pbt_run_dir": "quick_pbt"},
        "compare": {"run_dir": "quick_compare"},
    }[name]
    parameters = {key: str(request.getfixturevalue(fixture)) for key, fixture in runs.items()}
    out = tmp_path / f"{name}.ipynb"
    # The kernel is this environment's Python (ipykernel's python3 spec resolves to sys.executable).
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(out),
        parameters=parameters,
        kernel_name="python3",
        progress_bar=False,
        cwd=str(tmp_path),
    )
    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # its figures were drawn
