"""train_detector.py in FAST mode, for every one-stage detector: the same outputs as
train_faster_rcnn.py (metrics, COCO files our evaluation and pycocotools agree on, pictures, a
saved model that predict.py reads back with the same detections), the model's own defaults, and
clear errors for bad options. Run: ``python -m pytest -q tests/test_ch05_train_detector.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "ch05_detection" / "train_detector.py"
MODELS = ("yolo", "yolo_anchors", "ssd", "retinanet", "centernet")
METRIC_KEYS = {"val_map50", "val_map", "train_seconds", "epochs", "val_pycocotools_map50",
               "val_pycocotools_map", "parameters", "train_images_per_second",
               "inference_ms_batch1", "model"}


def run_script(*args, check=True):
    env = dict(os.environ, CVTF_FAST="1", TF_CPP_MIN_LOG_LEVEL="2", MPLBACKEND="Agg")
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_fast_run_writes_the_record_and_the_model_predicts(tmp_path, model):
    import ch05_detection
    from ch05_detection import predict, train_detector

    out = tmp_path / model
    first = run_script("--model", model, "--out", str(out)).stdout
    assert "Summary" in first
    metrics = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics) and metrics["model"] == model
    assert metrics["val_map50"] == pytest.approx(metrics["val_pycocotools_map50"], abs=1e-6)
    assert metrics["val_map"] == pytest.approx(metrics["val_pycocotools_map"], abs=1e-6)
    for name in ("config.json", "val_ground_truth.json", "val_detections.json", "detections.png",
                 "pr_curves.png", "history.png", f"{model}.keras", "checkpoint/state.npz"):
        assert (out / name).exists(), name
    # The options left out took the model's defaults (FAST mode's where FAST sets them).
    config = json.loads((out / "config.json").read_text())
    defaults = train_detector.model_defaults(model)
    assert config["learning_rate"] == pytest.approx(defaults["learning_rate"])
    assert config["epochs"] == 1 and config["batch_size"] == 4  # FAST values
    # The saved model loads with the chapter's loader and detects what predict.py reports.
    loaded = ch05_detection.load_model(out / f"{model}.keras", compile=False)
    image = np.random.default_rng(0).uniform(size=(64, 64, 3)).astype(np.float32)
    direct = loaded.detect(image)
    path = tmp_path / "image.png"
    import cv2

    cv2.imwrite(str(path), np.round(image[..., ::-1] * 255).astype(np.uint8))
    results = predict.main([str(path), "--model", str(out / f"{model}.keras"), "--min-score", "0",
                            "--out", str(tmp_path / "predicted")])
    assert results[0]["error"] is None
    assert len(results[0]["classes"]) == int(direct["num_detections"][0])
    if model != "ssd":
        return  # the harness is the same for every model: one re-run is enough
    # The same command again resumes: nothing is trained again and the record stays.
    second = run_script("--model", model, "--out", str(out)).stdout
    assert "resuming from" in second and "Epoch 1/1" not in second
    again = json.loads((out / "metrics.json").read_text())
    assert again["train_seconds"] == metrics["train_seconds"]


@pytest.mark.slow
def test_bad_options_name_the_flag(tmp_path):
    wrong = run_script("--model", "yolo9000", "--out", str(tmp_path / "a"), check=False)
    assert wrong.returncode == 2 and "--model" in wrong.stderr and "invalid choice" in wrong.stderr
    small = run_script("--model", "ssd", "--image-size", "70", "--out", str(tmp_path / "b"),
                       check=False)
    assert small.returncode == 2 and "--image-size" in small.stderr
    assert "Traceback" not in small.stderr
    anchors = run_script("--model", "yolo_anchors", "--anchors", "0", "--out", str(tmp_path / "c"),
                         check=False)
    assert anchors.returncode == 2 and "--anchors" in anchors.stderr


def test_every_model_module_has_what_the_script_needs():
    from ch05_detection import train_detector
    from ch05_detection.detector import Detector

    for name in train_detector.MODELS:
        module = train_detector.model_module(name)
        defaults = train_detector.model_defaults(name)
        assert set(train_detector.MODEL_DEFAULT_OPTIONS) <= set(defaults), name
        assert callable(module.from_options), name
        classes = [value for value in vars(module).values()
                   if isinstance(value, type) and issubclass(value, Detector) and value is not Detector]
        assert classes, f"{module.__name__} defines no Detector"
