"""The example notebook runs top to bottom (small crop, a Noise2Void model trained on it for seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "restore_on_a_cluster.ipynb"
DATA = ROOT.parent / "shared" / "data" / "llsm_cell_raw_skewed.tif"

pytestmark = pytest.mark.slow  # runs the example notebook in a kernel


@pytest.mark.skipif(not DATA.exists(), reason="shared/data/llsm_cell_raw_skewed.tif not available beside the checkout")
def test_example_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("BIGCARE_NB_SMALL", "1")
    monkeypatch.setenv("BIGCARE_NB_WORKDIR", str(tmp_path))
    monkeypatch.delenv("BIGCARE_MODEL", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "dashboard:" in outputs and "restored" in outputs and "trained 1 epochs" in outputs
    assert (tmp_path / "n2v_model" / "best" / "config.json").exists()
    assert (tmp_path / "before_after.png").stat().st_size > 10_000
    assert (tmp_path / "restored.ome.zarr" / "bigcare_summary.json").exists()
