"""The repo's promises to a new user: quick start, pinned requirements, CI entry."""

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_two_commands():
    text = (REPO_ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    commands = [line.strip() for line in first_block.splitlines() if line.strip() and not line.startswith("#")]
    assert commands == ["make demo", "make test"]
    assert "pip install -r requirements.txt" in text and "python -m pytest" in text


def test_requirements_are_pinned_and_explained():
    lines = [l for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[-1].split("#")[0].strip() == "-e ."
    for line in lines[:-1]:
        spec, _, comment = line.partition("#")
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[0-9][^\s]*", spec.strip()), line
        assert comment.strip(), f"say why: {line}"
    names = {l.split("==")[0].strip().lower() for l in lines[:-1]}
    for needed in ["tensorflow", "keras", "tensorflow-datasets", "numpy", "matplotlib",
                   "opencv-contrib-python-headless", "pycocotools", "scikit-learn", "pytest"]:
        assert needed in names


def test_ci_runs_make_test():
    script = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in script
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "pytest" in makefile and "requirements.txt" in makefile


def test_packages_import_from_anywhere(tmp_path):
    import subprocess
    import sys

    code = "import common, ch04_classification, ch05_detection, ch06_segmentation; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_no_file_cites_a_document_outside_the_repo():
    """The repo documents itself (docs/design.md); a reader of a clone has nothing else."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.split()
    outside = ("DESIGN.md", "STYLE.md", "../shared")
    offenders = [name for name in files if name.endswith((".py", ".md", ".ipynb", ".toml", ".txt"))
                 and any(word in (REPO_ROOT / name).read_text(errors="ignore") for word in outside)
                 and name != "tests/test_repo.py"]
    assert not offenders, offenders
    assert (REPO_ROOT / "docs" / "design.md").is_file()


def test_readme_tables_are_generated_from_the_record(tmp_path):
    """README.md's generated tables equal what tools/results_tables.py renders from
    docs/results.json, and a changed number would show."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("results_tables", REPO_ROOT / "tools" / "results_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    readme = (REPO_ROOT / "README.md").read_text()
    runs = tables.load_runs()
    assert tables.render(readme, runs) == readme, "run python tools/results_tables.py --write"
    changed = json.loads(json.dumps(runs))
    changed["train_faster_rcnn"]["val_map50"] = 0.123
    assert "0.123" in tables.render(readme, changed) and tables.render(readme, changed) != readme
    # --record copies a run's metrics into the record (here into a copy of it).
    run_dir, record_path = tmp_path / "run", tmp_path / "results.json"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"val_map50": 0.5, "parameters": 7, "other": 1,
                                                          "val_iou_star": 0.25}))
    record_path.write_text(json.dumps({"runs": {}}))
    entry = tables.record(run_dir, "train_detector_ssd", "1.0", path=record_path)
    assert entry["val_map50"] == 0.5 and "other" not in entry and entry["stale"] is False
    assert entry["val_iou_star"] == 0.25  # per-class keys come along
    assert json.loads(record_path.read_text())["runs"]["train_detector_ssd"]["parameters"] == 7
    assert "command" not in entry
    # A re-record keeps the entry's command line unless given a new one.
    entry = tables.record(run_dir, "train_detector_ssd", "1.0", path=record_path, command="python a.py")
    assert tables.record(run_dir, "train_detector_ssd", "2.0", path=record_path)["command"] == "python a.py"
