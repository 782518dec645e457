"""Every notebook runs top to bottom in FAST mode, is committed as that run left it, and runs no script in-process.

* Execution: each notebook is executed (an in-memory copy; the file is not touched) in its own folder with
  CVTF_FAST=1, offline, with nbclient, exactly as ``make notebooks`` (tools/run_notebooks.py) does.
* Freshness: ``make notebooks`` saves each notebook with its outputs and a hash of its code cells in the
  metadata. A committed notebook must carry the hash of its current code cells, have every code cell
  executed in order (1, 2, 3 ...) and no error output, so code edited without re-running
  ``make notebooks`` fails here.
* No notebook imports a ``train_*.py`` script: scripts are programs (a notebook runs them as a subprocess
  and reads their metrics.json); what a notebook needs from them lives in the chapter modules.
"""

import ast
import importlib.util
import re
import time
from pathlib import Path

import nbformat
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_tool():
    spec = importlib.util.spec_from_file_location("run_notebooks", REPO_ROOT / "tools" / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_notebooks = _load_tool()
NOTEBOOKS = run_notebooks.find_notebooks(REPO_ROOT)
IDS = [str(p.relative_to(REPO_ROOT)) for p in NOTEBOOKS]
# About 2 minutes each is the aim on a quiet 2-core CPU; the hard stop leaves room for a busy CI machine
# (the chapter-4 notebook took 480-500 s at load 8-13 while other jobs shared the cores).
BUDGET_SECONDS = 600
TRAINING_SCRIPT = re.compile(r"^train_\w*$")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_top_to_bottom(path):
    notebook = nbformat.read(path, as_version=4)  # a copy in memory: outputs are not written back
    start = time.perf_counter()
    run_notebooks.execute(notebook, path.parent, timeout=BUDGET_SECONDS)
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.0f} s")
    assert seconds < BUDGET_SECONDS
    assert not run_notebooks.freshness_problems(run_notebooks.stamp(notebook))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_the_output_of_make_notebooks(path):
    problems = run_notebooks.freshness_problems(nbformat.read(path, as_version=4))
    assert not problems, (f"{path.relative_to(REPO_ROOT)}: " + "; ".join(problems)
                          + ". Run `make notebooks` (or `python tools/run_notebooks.py "
                          f"{path.relative_to(REPO_ROOT)}`) and commit the result.")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_outputs_stay_small(path):
    size = path.stat().st_size
    assert size <= run_notebooks.MAX_NOTEBOOK_BYTES, (
        f"{path.relative_to(REPO_ROOT)} is {size / 1e6:.1f} MB: lower the figures' size or print less")


def training_script_imports(source: str) -> list[str]:
    """Names of ``train_*`` modules that a cell's code imports (``import``, ``from``, importlib, runpy)."""
    # IPython lines (magics, shell escapes) are not Python: blank them so the rest parses.
    lines = ["" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    tree = ast.parse("\n".join(lines))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call):
            function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if function in ("import_module", "__import__", "run_module", "run_path"):
                names = [arg.value for arg in node.args
                         if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        for name in names:
            parts = re.split(r"[./\\]", name.removesuffix(".py"))
            if any(TRAINING_SCRIPT.match(part) for part in parts):
                found.append(name)
    return found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_imports_no_training_script(path):
    notebook = nbformat.read(path, as_version=4)
    imports = [(index, name) for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
               for name in training_script_imports(cell.source)]
    assert not imports, (
        f"{path.relative_to(REPO_ROOT)} imports training scripts {imports} (cell, module): run a script "
        "as a subprocess and read its metrics.json; take helpers from the chapter modules")


def test_training_script_import_check_can_fail():
    """The checker above against hand-written cells: every way of importing a script, and allowed code."""
    caught = [
        "from ch04_classification import train_classifier",
        "import ch05_detection.train_faster_rcnn as script",
        "from ch06_segmentation.train_unet import Config",
        "%matplotlib inline\nfrom ch06_segmentation import losses, train_denoiser",
        "importlib.import_module('ch04_classification.train_classifier')",
        "runpy.run_path('ch05_detection/train_faster_rcnn.py')",
    ]
    for source in caught:
        assert training_script_imports(source), source
    allowed = [
        "from ch05_detection import evaluate\nevaluate.run_detection(model, examples)",
        "subprocess.run([sys.executable, 'ch04_classification/train_classifier.py', '--fast'])",
        "from ch04_classification import trainer, transfer_learning",
        "!python ch06_segmentation/train_unet.py --fast",
    ]
    for source in allowed:
        assert not training_script_imports(source), source


def test_freshness_check_can_fail():
    """A stamped, executed notebook is fresh; editing a code cell, an error or a skipped cell is not."""
    def executed_notebook():
        notebook = nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_markdown_cell("# title"),
            nbformat.v4.new_code_cell("x = 1", execution_count=1),
            nbformat.v4.new_code_cell("", execution_count=None),  # empty cells are not executed
            nbformat.v4.new_code_cell("print(x)", execution_count=2, outputs=[
                nbformat.v4.new_output("stream", name="stdout", text="1\n")]),
        ])
        return run_notebooks.stamp(notebook)

    assert run_notebooks.freshness_problems(executed_notebook()) == []

    never_stamped = executed_notebook()
    del never_stamped.metadata[run_notebooks.METADATA_KEY]
    edited = executed_notebook()
    edited.cells[1].source = "x = 2"
    added = executed_notebook()
    added.cells.append(nbformat.v4.new_code_cell("y = 3"))
    failed = executed_notebook()
    failed.cells[3].outputs = [nbformat.v4.new_output("error", ename="NameError", evalue="x", traceback=[])]
    out_of_order = executed_notebook()
    out_of_order.cells[1].execution_count = 3
    unexecuted = executed_notebook()
    for cell in unexecuted.cells:
        if cell.cell_type == "code":
            cell.execution_count, cell.outputs = None, []
    for notebook in (never_stamped, edited, added, failed, out_of_order, unexecuted):
        assert run_notebooks.freshness_problems(notebook)


def test_shrink_outputs_keeps_what_a_reader_sees():
    """Progress bars end in their last state, TF's C++ start-up lines go, long text and big images shrink."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # incompressible
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    big_png = base64.b64encode(buffer.getvalue()).decode("ascii")
    assert len(buffer.getvalue()) > run_notebooks.MAX_IMAGE_BYTES
    log_line = ("I0000 00:00:1795979790.609600   30458 port.cc:153] oneDNN custom operations are on.\n")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("run()", execution_count=1, outputs=[
        nbformat.v4.new_output("stream", name="stdout", text="$ python train.py\n"),
        nbformat.v4.new_output("stream", name="stdout", text=log_line + "1/8 [==  ]\r8/8 [=====]\n"),
        nbformat.v4.new_output("stream", name="stderr", text=log_line),
        nbformat.v4.new_output("stream", name="stdout", text="".join(f"line {i}\n" for i in range(1000))),
        nbformat.v4.new_output("display_data", data={"image/png": big_png, "text/plain": "<Figure>"}),
    ])])
    outputs = run_notebooks.shrink_outputs(notebook).cells[0].outputs
    assert [o.output_type for o in outputs] == ["stream", "stream", "display_data"]  # stderr: only the log
    assert outputs[0].text == "$ python train.py\n8/8 [=====]\n"
    assert outputs[1].text.startswith("line 0\n") and outputs[1].text.rstrip().endswith("line 999")
    assert "lines cut" in outputs[1].text
    assert outputs[1].text.count("\n") <= run_notebooks.MAX_STREAM_LINES + 2
    png = base64.b64decode(outputs[2].data["image/png"])
    assert len(png) <= run_notebooks.MAX_IMAGE_BYTES
    assert Image.open(io.BytesIO(png)).width < 400


def test_notebooks_are_found():
    """Guards the glob: the suite must not silently run no notebook, nor skip a chapter's."""
    names = {p.name for p in NOTEBOOKS}
    assert {"tf_data_and_augmentation.ipynb", "ch04_classification.ipynb", "ch05_detection.ipynb",
            "ch06_segmentation.ipynb", "one_stage_detectors.ipynb", "rcnn_family.ipynb"} <= names
