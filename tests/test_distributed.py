"""Training beyond one device with tf.distribute, tested on a CPU split into logical devices.

- 2 replicas (MirroredStrategy over 2 logical CPU devices, `--cpu-replicas 2`) and 1 replica with the
  same global batch end one epoch of SGD with the same weights: the harness builds the model inside the
  strategy, Keras divides the loss by the replicas and sums the gradients, and synchronized batch
  normalisation gives every replica the statistics of the whole batch. As a negative control the same
  run with per-replica batch normalisation ends elsewhere, so the comparison can tell.
- `multi_worker_mirrored` is refused with the reason: Keras 3.15's fit does not run under
  MultiWorkerMirroredStrategy (keras-team/keras#20585; tried with two worker processes on localhost).
Logical devices must be configured before TensorFlow starts, so every run is a subprocess.
Run: `python -m pytest -q tests/test_distributed.py`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CLASSIFIER = REPO / "ch04_classification" / "train_classifier.py"
# SGD, no augmentation, constant learning rate: the update is a plain function of the gradient. The
# rate is small enough for training to be stable: with 0.05 the 4 steps are chaotic, and float
# rounding differences of 1e-7 in the all-reduced statistics grow to 1e-2 (measured).
SGD_ARGS = ["--fast", "--epochs", "1", "--num-train-examples", "64", "--num-val-examples", "16",
            "--batch-size", "16", "--optimizer", "sgd", "--learning-rate", "0.005", "--schedule", "constant",
            "--warmup-epochs", "0", "--no-augment"]


def _env(**extra):
    return dict(os.environ, CVTF_FAST="1", TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg", **extra)


def _run(args, **env):
    result = subprocess.run([sys.executable, str(CLASSIFIER), *args], cwd=REPO, env=_env(**env),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _model_weights(out: Path):
    with np.load(out / "checkpoint" / "state.npz") as saved:
        keys = sorted(k for k in saved.files if k != "__state__" and k.split("|", 1)[1].startswith("model/"))
        return [saved[k] for k in keys if "seed_generator" not in k]


def _largest_difference(a, b):
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))


@pytest.mark.slow
def test_two_cpu_replicas_train_like_one(tmp_path):
    one, two, two_local_bn = tmp_path / "one", tmp_path / "two", tmp_path / "two_local_bn"
    _run([*SGD_ARGS, "--sync-batchnorm", "--out", str(one)])
    _run([*SGD_ARGS, "--sync-batchnorm", "--strategy", "mirrored", "--cpu-replicas", "2", "--out", str(two)])
    assert json.loads((one / "metrics.json").read_text())["replicas"] == 1
    assert json.loads((two / "metrics.json").read_text())["replicas"] == 2
    same = _largest_difference(_model_weights(one), _model_weights(two))
    assert same < 2e-4, f"2 replicas drifted from 1 replica by {same}"
    # Negative control: per-replica batch statistics (8 images instead of 16) change the result.
    _run([*SGD_ARGS, "--strategy", "mirrored", "--cpu-replicas", "2", "--out", str(two_local_bn)])
    different = _largest_difference(_model_weights(one), _model_weights(two_local_bn))
    assert different > 10 * max(same, 1e-6), (same, different)


def test_multi_worker_is_refused_with_the_reason(tmp_path, capsys):
    """Keras 3.15's fit fails under MultiWorkerMirroredStrategy (tried with two worker processes on
    localhost; keras-team/keras#20585): the option says so at once instead of failing inside Keras."""
    from ch04_classification import train_classifier
    from common.training import RunError

    with pytest.raises(RunError, match="multi_worker_mirrored.*20585.*--strategy mirrored"):
        train_classifier.main(["--fast", "--strategy", "multi_worker_mirrored", "--out", str(tmp_path)])
