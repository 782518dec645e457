"""A run killed at any moment (SIGKILL) and re-run with the same command ends where an uninterrupted
run ends: the same weights, optimizer state and record (common/training.py's checkpoint).

Each script runs in a subprocess in FAST mode, three times: once uninterrupted; once killed with SIGKILL
as soon as its first epoch's checkpoint exists (the kill lands wherever the process is: in the next
epoch, or in the middle of writing); and once more with the same command, which resumes. The final
checkpoints (every model and optimizer variable) must agree to float tolerance.
Run: `python -m pytest -q tests/test_exact_resume.py`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_script(script, args, timeout=600):
    env = dict(os.environ, CVTF_FAST="1", TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def kill_after_first_checkpoint(script, args, out: Path, timeout=600):
    """Start the script, SIGKILL it once a checkpoint with at least one finished epoch exists."""
    env = dict(os.environ, CVTF_FAST="1", TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / script), *args], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoint" / "state.npz"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None:
            if checkpoint.exists():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return False  # finished before the first checkpoint could be seen: nothing was interrupted


def checkpoint_arrays(out: Path):
    with np.load(out / "checkpoint" / "state.npz") as saved:
        arrays = {k: saved[k] for k in sorted(saved.files) if k != "__state__"}  # "index|name" keys
        state = json.loads(bytes(saved["__state__"]).decode())
    return arrays, state


def assert_same_run(reference: Path, resumed: Path, atol=1e-5):
    ref_arrays, ref_state = checkpoint_arrays(reference)
    res_arrays, res_state = checkpoint_arrays(resumed)
    # Compared in order: variable names carry counters (adam_2 / adam_3) that depend on how many
    # optimizers the process made, not on the state.
    assert len(ref_arrays) == len(res_arrays)
    pairs = list(zip(ref_arrays.values(), res_arrays.values()))
    assert all(a.shape == b.shape for a, b in pairs)
    worst = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
                for a, b in pairs)
    assert worst <= atol, f"resumed weights differ from the uninterrupted run's by up to {worst}"
    assert ref_state["stages"].keys() == res_state["stages"].keys()
    for stage in ref_state["stages"]:
        assert ref_state["stages"][stage]["epochs_done"] == res_state["stages"][stage]["epochs_done"]
    assert len(ref_state["history"]) == len(res_state["history"])
    for a, b in zip(ref_state["history"], res_state["history"]):
        assert (a["stage"], a["epoch"]) == (b["stage"], b["epoch"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def exact_resume_check(tmp_path, script, args):
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    first = run_script(script, [*args, "--out", str(reference)])
    assert first.returncode == 0, first.stderr[-3000:]
    interrupted = kill_after_first_checkpoint(script, [*args, "--out", str(killed)], killed)
    assert interrupted, "the run ended before it could be killed; give it more epochs"
    assert not (killed / "metrics.json").exists(), "the kill came after the end: nothing was resumed"
    second = run_script(script, [*args, "--out", str(killed)])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout
    assert_same_run(reference, killed)
    ref_metrics = json.loads((reference / "metrics.json").read_text())
    res_metrics = json.loads((killed / "metrics.json").read_text())
    assert res_metrics["epochs"] == ref_metrics["epochs"]
    assert res_metrics["epochs_this_run"] < ref_metrics["epochs"]  # the resumed run did not start over
    return ref_metrics, res_metrics


@pytest.mark.slow
def test_classifier_resumes_exactly_after_sigkill(tmp_path):
    exact_resume_check(tmp_path, "ch04_classification/train_classifier.py",
                       ["--epochs", "4", "--num-train-examples", "96", "--num-val-examples", "32"])


FASTER_RCNN_ARGS = ["--num-train-examples", "8", "--num-val-examples", "4", "--batch-size", "4",
                    "--eval-every", "0"]


@pytest.mark.slow
def test_faster_rcnn_joint_resumes_exactly_after_sigkill(tmp_path):
    exact_resume_check(tmp_path, "ch05_detection/train_faster_rcnn.py", [*FASTER_RCNN_ARGS, "--epochs", "3"])


@pytest.mark.slow
def test_faster_rcnn_alternating_resumes_exactly_after_sigkill(tmp_path):
    # 4 steps of one epoch each: the kill lands in step 2 or later, so resuming crosses stages.
    ref, resumed = exact_resume_check(tmp_path, "ch05_detection/train_faster_rcnn.py",
                                      [*FASTER_RCNN_ARGS, "--epochs", "4", "--schedule", "alternating"])
    assert ref["epochs"] == 4
