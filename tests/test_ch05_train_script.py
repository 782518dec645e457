"""Smoke tests of ch05_detection/train_faster_rcnn.py and predict.py in FAST mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ch05_detection" / "train_faster_rcnn.py"
METRIC_KEYS = {"val_map50", "val_map", "train_seconds", "epochs", "val_pycocotools_map50",
               "val_pycocotools_map", "parameters", "replicas"}
OUTPUTS = ("metrics.json", "config.json", "val_ground_truth.json", "val_detections.json",
           "detections.png", "proposals.png", "pr_curves.png", "faster_rcnn.keras", "history.png",
           "checkpoint/state.npz")


def run_script(*args):
    env = dict(os.environ, CVTF_FAST="1")
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def check_outputs(out):
    for name in OUTPUTS:
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    # Our evaluation and pycocotools agree on the exported JSON files.
    assert metrics["val_map50"] == pytest.approx(metrics["val_pycocotools_map50"], abs=1e-6)
    assert metrics["val_map"] == pytest.approx(metrics["val_pycocotools_map"], abs=1e-6)
    detections = json.loads((out / "val_detections.json").read_text())
    ground_truth = json.loads((out / "val_ground_truth.json").read_text())
    assert isinstance(detections, list) and {"images", "annotations", "categories"} <= set(ground_truth)
    return metrics


@pytest.mark.slow
def test_fast_joint_run_keeps_its_record_and_predicts(tmp_path):
    out = tmp_path / "joint"
    first = run_script("--out", str(out), "--epochs", "2")
    assert "Summary" in first
    metrics = check_outputs(out)
    assert metrics["epochs"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["fast"] is True and config["image_size"] == 64
    # The same command again: nothing is trained and the record of the run stays as it was.
    second = run_script("--out", str(out), "--epochs", "2")
    assert "resuming from" in second and "Epoch " not in second  # no epoch trained again
    again = json.loads((out / "metrics.json").read_text())
    assert again["train_seconds"] == metrics["train_seconds"] and again["epochs"] == 2
    assert again["val_map50"] == pytest.approx(metrics["val_map50"])
    history = json.loads((out / "metrics.json").read_text())
    assert history["epochs_this_run"] == 0

    # predict.py on the saved model: two image files in, annotated PNGs out, labelled with the
    # class names the model was trained with.
    import cv2

    from ch05_detection import predict
    from common import synthetic

    paths = []
    for i in range(2):
        image = synthetic.make_scene(i, "test", image_size=80)["image"]
        paths.append(tmp_path / f"scene{i}.png")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor((image * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))
    results = predict.main([str(p) for p in paths] + ["--model", str(out / "faster_rcnn.keras"),
                                                      "--out", str(tmp_path / "pred"),
                                                      "--min-score", "0.0"])
    assert len(results) == 2
    for path, result in zip(paths, results):
        assert list((tmp_path / "pred").glob(f"{path.stem}*detections.png"))
        assert len(result["boxes"]) == len(result["scores"]) == len(result["classes"])


def test_bad_options_name_the_flag(tmp_path, monkeypatch, capsys):
    """--epochs 0, fewer images than a batch and an unsupported stride are refused before training.

    One case runs as a user runs it (a process: exit code 2, no traceback); the others call
    ``main`` in this process, which is what the script's entry point wraps."""
    from ch05_detection import train_faster_rcnn
    from common import training

    env = dict(os.environ, CVTF_FAST="1")
    result = subprocess.run([sys.executable, str(SCRIPT), "--epochs", "0", "--out", str(tmp_path / "x")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--epochs" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    monkeypatch.setenv("CVTF_FAST", "1")
    for args, flag in ((["--epochs", "-2"], "--epochs"), (["--output-stride", "4"], "--output-stride"),
                       (["--num-train-examples", "3", "--batch-size", "4"], "--batch-size"),
                       (["--image-size", "50"], "--image-size")):
        with pytest.raises((training.RunError, SystemExit)) as error:
            train_faster_rcnn.main([*args, "--out", str(tmp_path / "x")])
        message = str(error.value) if error.type is training.RunError else capsys.readouterr().err
        assert flag in message, (args, message)
        assert error.type is training.RunError or error.value.code == 2
    assert not (tmp_path / "x" / "metrics.json").exists()


@pytest.mark.slow
def test_fast_alternating_schedule(tmp_path):
    out = tmp_path / "alternating"
    stdout = run_script("--out", str(out), "--schedule", "alternating", "--roi-op", "pool",
                        "--eval-every", "0")
    for step, stage in enumerate(["rpn", "detector", "rpn_finetune", "detector_finetune"], 1):
        assert f"stage {step}/4: {stage}" in stdout
    metrics = check_outputs(out)
    assert metrics["epochs"] == 4 and metrics["schedule"] == "alternating"


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["voc/2007", "coco/2017"])
def test_real_dataset_paths_under_mock_data(tmp_path, dataset, monkeypatch):
    import tensorflow_datasets as tfds

    from ch05_detection import train_faster_rcnn

    monkeypatch.setenv("CVTF_FAST", "1")
    with tfds.testing.mock_data(num_examples=4):
        metrics = train_faster_rcnn.main(
            ["--dataset", dataset, "--out", str(tmp_path / "run"), "--num-train-examples", "4",
             "--num-val-examples", "2", "--eval-every", "0", "--batch-size", "2"])
    assert np.isfinite(metrics["val_map50"]) and metrics["epochs"] == 1
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"] == dataset


def test_bad_arguments_are_rejected():
    from ch05_detection import train_faster_rcnn

    with pytest.raises(SystemExit):
        train_faster_rcnn.main(["--roi-op", "warp", "--fast"])
    with pytest.raises(SystemExit):
        train_faster_rcnn.main(["--schedule", "sometimes", "--fast"])
