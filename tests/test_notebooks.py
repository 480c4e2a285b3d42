"""Every notebook runs top to bottom on CPU with short settings (FINETUNE_NOTEBOOK_QUICK=1), so none can rot.

They use the real all-MiniLM-L6-v2 and the FAQ from the dev extra; about 3 minutes together.
"""

import json
from pathlib import Path

import pytest
from conftest import score_on_run_split

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", ["adapter", "qlora", "compare"])
def test_notebook_runs_top_to_bottom(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("FINETUNE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("FINETUNE_NOTEBOOK_OUTPUT", str(tmp_path / "runs"))
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()

    runs = [p for p in (tmp_path / "runs").iterdir() if (p / "metrics.json").is_file()]
    assert runs, "the notebook wrote no finished run"
    for run_dir in runs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        # the tuned row is the model the notebook ships, scored again by plain sentence-transformers
        shipped = score_on_run_split(run_dir, run_dir / "model")
        assert metrics["tuned"]["ndcg@10"] == pytest.approx(shipped["ndcg@10"], abs=1e-4)
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    if name == "compare":
        assert len(runs) == 3 and (tmp_path / "runs" / "compare" / "comparison.png").is_file()
        assert any("image/png" in o.get("data", {}) for o in outputs)
    elif name == "adapter":
        assert any("image/png" in o.get("data", {}) for o in outputs)  # the inline training curve
