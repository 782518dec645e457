"""Execute the repo's notebooks top to bottom in FAST mode and save them with their outputs.

This is ``make notebooks``. Each notebook runs the way a reader runs it: in its own folder, with
``CVTF_FAST=1`` (small sizes, same code paths), offline (any download attempt goes to a closed local
port and fails at once), through nbclient as ``jupyter nbconvert --execute`` does and as
``tests/test_notebooks.py`` does. The executed notebook is written back in place, so the committed
notebook shows its pictures and tables on the web without anyone running it.

Outputs are kept small: figures at 72 dpi (a matplotlibrc for the run), progress-bar carriage returns
collapsed, very long text cut in the middle, big images stored with 256 colours (scaled down only
when that is not enough). The notebook's metadata gets
``"cvtf": {"code_sha256": ...}``, a hash of its code cells at the moment they were executed; the test
suite recomputes it, so a notebook whose code was edited without re-running ``make notebooks`` fails.

Usage, from the repo root::

    python tools/run_notebooks.py                      # every notebook of the repo
    python tools/run_notebooks.py notebooks/x.ipynb    # only these
    python tools/run_notebooks.py --check              # only report stale notebooks (no execution)
    python tools/run_notebooks.py --stale              # execute only the stale ones

A notebook that fails is reported (cell and error) and left unchanged on disk; the exit status is 1.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat

REPO_ROOT = Path(__file__).resolve().parents[1]
METADATA_KEY = "cvtf"
TIMEOUT_SECONDS = 300  # per cell; the aim is about 2 minutes for a whole notebook
MAX_STREAM_LINES = 120  # longer text outputs keep their first and last lines
MAX_STREAM_CHARS = 20_000
FIGURE_DPI = 72
QUANTIZE_ABOVE_BYTES = 50_000  # PNGs above this get a 256-colour palette
MAX_IMAGE_BYTES = 150_000  # PNGs still above this are scaled down
MAX_NOTEBOOK_BYTES = 2_000_000  # a notebook above this is reported as too big
SKIPPED_PARTS = {".venv", ".ipynb_checkpoints", "runs", "node_modules", "build", "dist"}
# TensorFlow's C++ logging before absl is initialised ignores TF_CPP_MIN_LOG_LEVEL: "I0000 00:00:17... 123
# port.cc:153] oneDNN custom operations are on ...", "E0000 ... cuda_platform.cc:52] failed call to cuInit".
NATIVE_LOG_LINE = re.compile(r"^(?:[IWEF]\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w.]+:\d+\] |"
                             r"WARNING: All log messages before absl::InitializeLog\(\) is called)")
# Where a download would go: a closed port on this machine, so it fails at once instead of hanging.
OFFLINE_PROXY = "http://127.0.0.1:9"


def find_notebooks(root: Path = REPO_ROOT) -> list[Path]:
    """Every ``*.ipynb`` under ``root``, except in virtual environments, run folders and checkpoints."""
    return sorted(p for p in Path(root).glob("**/*.ipynb")
                  if not SKIPPED_PARTS.intersection(p.relative_to(root).parts))


def notebook_environment() -> dict:
    """Environment variables of a notebook run: FAST mode, quiet TensorFlow, inline figures, offline."""
    return {
        "CVTF_FAST": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYTHONHASHSEED": "0",
        "HTTP_PROXY": OFFLINE_PROXY, "HTTPS_PROXY": OFFLINE_PROXY,
        "http_proxy": OFFLINE_PROXY, "https_proxy": OFFLINE_PROXY,
        "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1",
        "HF_HUB_OFFLINE": "1",
    }


@contextlib.contextmanager
def patched_environment(values: dict):
    """Set environment variables for the block (the kernel inherits them), then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def code_sources(notebook) -> list[str]:
    """The source of every code cell, in order."""
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def code_hash(notebook) -> str:
    """sha256 of the notebook's code cells (their order and exact text)."""
    return hashlib.sha256(json.dumps(code_sources(notebook)).encode("utf-8")).hexdigest()


def execute(notebook, folder: Path, timeout: int = TIMEOUT_SECONDS):
    """Run every cell of ``notebook`` (in place) with ``folder`` as working directory; returns it.

    Raises nbclient's ``CellExecutionError`` on the first failing cell.
    """
    import tempfile

    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory(prefix="cvtf_matplotlibrc_") as rc_folder:
        # Inline figures at a modest resolution (matplotlib's default is 100 dpi).
        Path(rc_folder, "matplotlibrc").write_text(f"figure.dpi: {FIGURE_DPI}\n")
        with patched_environment({**notebook_environment(), "MATPLOTLIBRC": rc_folder}):
            NotebookClient(notebook, timeout=timeout, kernel_name="python3", record_timing=False,
                           resources={"metadata": {"path": str(folder)}}).execute()
    return notebook


def _collapse_carriage_returns(text: str) -> str:
    """What a terminal shows: on each line, only the text after its last carriage return (and no backspaces)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.replace("\b", "").split("\n"))


def _cut_middle(text: str) -> str:
    lines = text.split("\n")
    if len(lines) <= MAX_STREAM_LINES and len(text) <= MAX_STREAM_CHARS:
        return text
    keep = MAX_STREAM_LINES // 2
    head, tail = lines[:keep], lines[-keep:] if len(lines) > keep else []
    cut = len(lines) - len(head) - len(tail)
    text = "\n".join(head + [f"... [{cut} lines cut by tools/run_notebooks.py] ..."] + tail)
    if len(text) > MAX_STREAM_CHARS:
        half = MAX_STREAM_CHARS // 2
        text = text[:half] + "\n... [output cut by tools/run_notebooks.py] ...\n" + text[-half:]
    return text


def _smaller_png(data: str) -> str:
    """A base64 PNG made smaller when it is big: 256 colours (a palette PNG), then, only if that is not
    enough, scaled down until it is under MAX_IMAGE_BYTES. Small PNGs are returned unchanged."""
    raw = base64.b64decode(data)
    if len(raw) <= QUANTIZE_ABOVE_BYTES:
        return data
    from PIL import Image

    image = Image.open(io.BytesIO(raw)).convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    for _ in range(6):
        buffer = io.BytesIO()
        image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_IMAGE_BYTES:
            break
        image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)), Image.LANCZOS)
    if buffer.tell() >= len(raw):
        return data
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _without_native_log_lines(text: str) -> str:
    """Drop TensorFlow's C++ start-up log lines (timestamped, machine-specific, not part of the lesson)."""
    return "".join(line for line in text.splitlines(keepends=True)
                   if not NATIVE_LOG_LINE.match(line.rsplit("\r", 1)[-1]))


def _coalesce_streams(outputs: list) -> list:
    """Merge consecutive outputs of the same stream (a script's output arrives line by line)."""
    merged = []
    for output in outputs:
        if (output.get("output_type") == "stream" and merged
                and merged[-1].get("output_type") == "stream" and merged[-1]["name"] == output["name"]):
            merged[-1]["text"] += output["text"]
        else:
            merged.append(output)
    return merged


def shrink_outputs(notebook):
    """Keep committed outputs small and stable.

    Streams: consecutive pieces merged, TensorFlow's C++ start-up log lines dropped, progress bars
    collapsed to their last state, long text cut in the middle. Big PNGs in 256 colours (smaller if needed).
    """
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in _coalesce_streams(cell.get("outputs", [])):
            if output.get("output_type") == "stream":
                text = _collapse_carriage_returns(_without_native_log_lines(output["text"]))
                if not text.strip():
                    continue
                output["text"] = _cut_middle(text)
            data = output.get("data", {})
            if "image/png" in data:
                data["image/png"] = _smaller_png(data["image/png"])
            if "text/plain" in data and isinstance(data["text/plain"], str):
                data["text/plain"] = _cut_middle(data["text/plain"])
            outputs.append(output)
        cell.outputs = outputs
    return notebook


def stamp(notebook):
    """Record in the metadata which code was executed (checked by tests/test_notebooks.py)."""
    notebook.metadata[METADATA_KEY] = {
        "code_sha256": code_hash(notebook),
        "executed_by": "make notebooks (tools/run_notebooks.py), CVTF_FAST=1",
    }
    return notebook


def freshness_problems(notebook) -> list[str]:
    """Why a committed notebook is not the output of ``make notebooks`` on its current code ([] = fresh).

    Fresh means: stamped by this tool with the hash of exactly the current code cells; every non-empty
    code cell executed, in order, counting 1, 2, 3 ...; no error output.
    """
    problems = []
    stamped = notebook.metadata.get(METADATA_KEY, {}).get("code_sha256")
    if stamped is None:
        problems.append("never executed by `make notebooks` (no metadata.cvtf.code_sha256)")
    elif stamped != code_hash(notebook):
        problems.append("its code cells changed since `make notebooks` last executed it")
    expected = 1
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        if cell.get("execution_count") != expected:
            problems.append(f"code cell {index} has execution count {cell.get('execution_count')}, "
                            f"expected {expected} (not executed top to bottom in one run)")
            break
        expected += 1
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"code cell {index} has an error output: {output.get('ename')}: "
                                f"{output.get('evalue')}")
    return problems


def run_one(path: Path) -> bool:
    """Execute, shrink, stamp and save one notebook; False (file untouched) if a cell fails."""
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    try:
        execute(notebook, path.parent)
    except CellExecutionError as error:
        summary = str(error).strip().splitlines()
        print(f"FAILED {path.relative_to(REPO_ROOT)} after {time.perf_counter() - start:.0f} s: "
              + "\n  ".join(summary[-12:]), flush=True)
        return False
    except Exception as error:  # a timeout or a dead kernel
        print(f"FAILED {path.relative_to(REPO_ROOT)} after {time.perf_counter() - start:.0f} s: "
              f"{type(error).__name__}: {error}", flush=True)
        return False
    seconds = time.perf_counter() - start
    stamp(shrink_outputs(notebook))
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    size = path.stat().st_size
    note = "  (over 2 MB: shrink its outputs)" if size > MAX_NOTEBOOK_BYTES else ""
    print(f"ok     {path.relative_to(REPO_ROOT)}: {seconds:.0f} s, {size / 1e6:.2f} MB{note}", flush=True)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to run (default: every notebook of the repo)")
    parser.add_argument("--check", action="store_true",
                        help="only list notebooks that are not fresh; execute nothing")
    parser.add_argument("--stale", action="store_true",
                        help="execute only the notebooks that are not fresh (see --check)")
    args = parser.parse_args(argv)
    paths = [p.resolve() for p in args.notebooks] or find_notebooks()
    for path in paths:
        if not path.is_file() or path.suffix != ".ipynb":
            parser.error(f"not a notebook file: {path}")
    if args.check:
        stale = {p: freshness_problems(nbformat.read(p, as_version=4)) for p in paths}
        for path, problems in stale.items():
            print(f"{'stale ' if problems else 'fresh '} {path.relative_to(REPO_ROOT)}"
                  + "".join(f"\n    {problem}" for problem in problems))
        return 1 if any(stale.values()) else 0
    if args.stale:
        paths = [p for p in paths if freshness_problems(nbformat.read(p, as_version=4))]
    print(f"executing {len(paths)} notebook(s) in FAST mode (CVTF_FAST=1), offline", flush=True)
    failed = [p for p in paths if not run_one(p)]
    if failed:
        print("failed: " + ", ".join(str(p.relative_to(REPO_ROOT)) for p in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
