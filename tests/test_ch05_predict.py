"""Tests of ch05_detection/predict.py on a tiny untrained Faster R-CNN saved in tmp_path.

What a user hit (issue 18, items 5 and 9): the detections of a model trained on their
own data were labelled with the ``shapes`` names; one unreadable input aborted the
batch with nothing printed, with the same message for a missing file, a folder and a
corrupt file; ``a.png`` and ``a.jpg`` wrote the same output; a classifier given as
``--model`` died with ``AttributeError``. The references: the model's own ``detect`` on
the image read independently with PIL, and the files on disk.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from ch05_detection import predict
from ch05_detection.faster_rcnn import FasterRCNN
from common import synthetic

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
TINY = dict(image_size=(SIZE, SIZE), backbone="resnet_small", output_stride=8,
            backbone_options={"filters": [8, 16, 32, 64]}, anchor_scales=(12, 24, 32),
            rpn_filters=16, head_units=32, rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=20, max_detections=10, score_threshold=0.0)


def tiny_detector(**options):
    keras.utils.set_random_seed(0)
    return FasterRCNN(3, **TINY, **options)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny detector saved without class names, and a folder of inputs good and bad."""
    root = tmp_path_factory.mktemp("predict")
    model_path = root / "model" / "faster_rcnn.keras"
    model_path.parent.mkdir()
    tiny_detector().save(model_path)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i, path in enumerate([images / "a.png", images / "a.jpg", images / "sub" / "a.png"]):
        pixels = (synthetic.make_scene(i, "test", image_size=80)["image"] * 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
    (images / "corrupt.png").write_bytes(b"this is not a PNG")
    (images / "folder.png").mkdir()
    return model_path, images


def read_with_pil(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0


def test_bad_inputs_are_reported_one_by_one_and_the_rest_processed(saved, tmp_path, capsys):
    model_path, images = saved
    inputs = [images / "missing.png", images / "a.png", images / "folder.png",
              images / "corrupt.png", images / "a.jpg", images / "sub" / "a.png"]
    results = predict.main([str(p) for p in inputs] + [
        "--model", str(model_path), "--out", str(tmp_path / "out"), "--min-score", "0"])
    captured = capsys.readouterr()
    assert [r["path"] for r in results] == [str(p) for p in inputs]
    errors = [r["error"] for r in results]
    assert "does not exist" in errors[0]
    assert "is a directory" in errors[2]
    assert "not a readable image" in errors[3]
    assert errors[1] is errors[4] is errors[5] is None
    # Each failure on its own line, naming the file; a summary at the end.
    for index in (0, 2, 3):
        assert f"{inputs[index]}: skipped: {errors[index]}" in captured.err
    assert "3 of 6 input(s) could not be read" in captured.err
    # Three distinct outputs for a.png, a.jpg and sub/a.png, all written.
    outputs = [results[i]["output"] for i in (1, 4, 5)]
    assert [Path(o).name for o in outputs] == [
        "a_png_detections.png", "a_jpg_detections.png", "a_png_2_detections.png"]
    assert all(Path(o).is_file() for o in outputs)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(Path(o).name for o in outputs)
    # The good files got the model's own detections (images read here with PIL).
    model = predict.load_detector(model_path)
    for i in (1, 5):
        expected = model.detect(read_with_pil(inputs[i])[None])
        n = int(expected["num_detections"][0])
        np.testing.assert_allclose(results[i]["scores"], expected["scores"][0, :n], atol=1e-5)
        np.testing.assert_allclose(results[i]["boxes"], expected["boxes"][0, :n], atol=1e-5)
        assert f"{inputs[i]}: {n} detection(s) -> {results[i]['output']}" in captured.out


def test_output_names_are_distinct():
    names = predict.output_names(["a.png", "a.jpg", "x/a.png", "a.png", "README", "b.JPEG"])
    assert names == ["a_png_detections.png", "a_jpg_detections.png", "a_png_2_detections.png",
                     "a_png_3_detections.png", "README_detections.png", "b_jpeg_detections.png"]


def test_exit_status_of_the_script(saved, tmp_path):
    """As a program: the good image is still processed, and the exit status says one failed."""
    model_path, images = saved
    result = subprocess.run(
        [sys.executable, str(REPO / "ch05_detection" / "predict.py"), str(images / "nothere.jpg"),
         str(images / "a.png"), "--model", str(model_path), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "nothere.jpg: skipped: image file" in result.stderr
    assert f"{images / 'a.png'}: " in result.stdout
    assert (tmp_path / "a_png_detections.png").is_file()
    assert "Traceback" not in result.stderr


def test_not_a_detector_says_what_was_expected(tmp_path):
    from ch04_classification import models

    path = tmp_path / "classifier.keras"
    models.get_model("lenet5_modern", (32, 32, 1), 10).save(path)
    with pytest.raises(ValueError, match=r"--model .*without a detect\(\) method.*object detector"):
        predict.main([str(tmp_path / "a.png"), "--model", str(path)])
    assert predict.cli([str(tmp_path / "a.png"), "--model", str(path)]) == 2


def test_missing_model_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--model .*does not exist.*train_faster_rcnn.py"):
        predict.main(["a.png", "--model", str(tmp_path / "none.keras")])


def test_help_runs_and_shows_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in predict.build_parser()._actions:
        for option in action.option_strings:
            assert option in text
    for default in ("runs/predict", "0.5", predict.DEFAULT_MODEL):
        assert default in text


def test_bad_min_score_is_rejected():
    with pytest.raises(SystemExit):
        predict.main(["a.png", "--min-score", "5"])


# ------------------------------------------------------------------ class names
def test_without_saved_names_the_classes_are_numbered_not_shapes(saved, tmp_path, capsys):
    model_path, images = saved
    results = predict.main([str(images / "a.png"), "--model", str(model_path),
                            "--out", str(tmp_path), "--min-score", "0"])
    out = capsys.readouterr().out
    assert "class names (none saved with the model): class 0, class 1, class 2" in out
    assert len(results[0]["classes"]) > 0  # an untrained model with threshold 0 detects
    for name in synthetic.CLASS_NAMES:
        assert f" {name} " not in out and not any(line.strip().startswith(name)
                                                  for line in out.splitlines())
    assert f"class {results[0]['classes'][0]}  score" in out


def test_class_names_json_beside_the_model(saved, tmp_path):
    model_path, _ = saved
    copy = tmp_path / "faster_rcnn.keras"
    shutil.copy(model_path, copy)
    model = predict.load_detector(copy)
    (tmp_path / "class_names.json").write_text(json.dumps(["cat", "dog", "bird"]))
    saved_names = getattr(model, "class_names", None)
    if saved_names is None or list(saved_names) == ["class 0", "class 1", "class 2"]:
        assert predict.resolve_class_names(model, copy) == (
            ["cat", "dog", "bird"], str(tmp_path / "class_names.json"))
    # --class-names wins over everything; a wrong count names its source.
    assert predict.resolve_class_names(model, copy, ["x", "y", "z"])[0] == ["x", "y", "z"]
    with pytest.raises(ValueError, match="--class-names gives 2 class names"):
        predict.resolve_class_names(model, copy, ["x", "y"])
    (tmp_path / "class_names.json").write_text(json.dumps(["cat", "dog"]))
    with pytest.raises(ValueError, match="class_names.json.*2 class names.*3 classes"):
        predict.resolve_class_names(model, copy)
    (tmp_path / "class_names.json").write_text("cat, dog, bird")
    with pytest.raises(ValueError, match="class_names.json.*JSON list"):
        predict.resolve_class_names(model, copy)


def test_class_names_saved_in_the_model(tmp_path, capsys):
    try:
        model = tiny_detector(class_names=("cat", "dog", "bird"))
    except (TypeError, ValueError) as error:
        pytest.skip(f"FasterRCNN does not take class_names yet: {error}")
    path = tmp_path / "faster_rcnn.keras"
    model.save(path)
    # The model's names win over a sidecar file.
    (tmp_path / "class_names.json").write_text(json.dumps(["a", "b", "c"]))
    predict.main([str(REPO / "nothing.png"), "--model", str(path), "--out", str(tmp_path)])
    assert "class names (the model): cat, dog, bird" in capsys.readouterr().out
