"""Every command-line script of the repo answers --help (as a new user's first command would) and
refuses an unknown flag with a short message instead of a traceback.

The scripts are found by name (train_*.py, predict.py, run_*.py, score_*.py), so a new script is
covered the day it lands. Run: `python -m pytest -q tests/test_scripts_cli.py`.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATTERNS = ("train_*.py", "predict.py", "run_*.py", "score_*.py")
SCRIPTS = sorted({p for pattern in PATTERNS for p in REPO.glob(f"ch0*/{pattern}")})


def test_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"train_classifier.py", "train_faster_rcnn.py", "train_unet.py", "predict.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(REPO)) for p in SCRIPTS])
def test_help_and_unknown_flag(script):
    result = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage:" in result.stdout and "--help" in result.stdout
    if script.name.startswith("train_"):
        assert "(default:" in result.stdout and "--out" in result.stdout and "--fast" in result.stdout
    wrong = subprocess.run([sys.executable, str(script), "--no-such-flag"], cwd=REPO, capture_output=True,
                           text=True, timeout=300)
    assert wrong.returncode == 2 and "error:" in wrong.stderr
    assert "Traceback" not in wrong.stderr
