"""Each chapter's one-line loader: ``ch04_classification.load_model(path)``, ... (issue 18, item 10).

A bare ``keras.saving.load_model("faster_rcnn.keras")`` in a fresh Python fails with
``Could not locate class 'FasterRCNN'``: Keras finds a custom class only once its module
has run. The models are saved here, then loaded in a fresh interpreter (the only place
where nothing of the repo is imported yet): the bare Keras load fails as the user saw,
the chapter loaders succeed and give the saved model's outputs, and the wrong chapter's
loader names the right one.
"""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import ch04_classification
import ch05_detection
import ch06_segmentation

REPO = Path(__file__).resolve().parents[1]

FRESH_PROCESS = r"""
import json, sys
import numpy as np

import ch04_classification, ch05_detection, ch06_segmentation
# Importing the chapters stays cheap: no TensorFlow yet.
report = {"tensorflow_imported_by_packages": "tensorflow" in sys.modules}
import keras

paths = json.loads(sys.argv[1])
inputs = np.load(sys.argv[2])
for chapter, path in paths.items():
    try:
        keras.saving.load_model(path)
        report[chapter + "_bare_keras"] = "loaded"
    except Exception as error:
        report[chapter + "_bare_keras"] = str(error)
# The chapter-4 loader on a chapter-5 file (before chapter 5 is imported).
try:
    ch04_classification.load_model(paths["ch05"])
    report["ch04_loader_on_ch05"] = "loaded"
except ValueError as error:
    report["ch04_loader_on_ch05"] = str(error)
# The chapter-5 loader on a chapter-6 file (an initializer Keras cannot find).
try:
    ch05_detection.load_model(paths["ch06"])
    report["ch05_loader_on_ch06"] = "loaded"
except ValueError as error:
    report["ch05_loader_on_ch06"] = str(error)
outputs = {}
for chapter, loader in [("ch04", ch04_classification.load_model),
                        ("ch05", ch05_detection.load_model),
                        ("ch06", ch06_segmentation.load_model)]:
    model = loader(paths[chapter])
    report[chapter + "_class"] = type(model).__name__
    result = model(inputs[chapter], training=False)
    if isinstance(result, dict):
        result = result["class_logits"]  # a detector: its raw head outputs
    outputs[chapter] = np.asarray(result)
np.savez(sys.argv[3], **outputs)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """One small model per chapter, each with the chapter's own Keras classes, saved,
    with an input and the output it gives here."""
    from ch04_classification import models as ch04_models
    from ch05_detection.faster_rcnn import FasterRCNN
    from ch06_segmentation import models as ch06_models

    root = tmp_path_factory.mktemp("load_models")
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    built = {
        # LeNet-5's own layers (ScaledTanh, TrainableSubsampling, ...).
        "ch04": (ch04_models.get_model("lenet5", (32, 32, 1), 10), (2, 32, 32, 1)),
        "ch05": (FasterRCNN(3, image_size=(64, 64), backbone="resnet_small", output_stride=8,
                            backbone_options={"filters": [8, 16, 32, 64]},
                            anchor_scales=(12, 24, 32), rpn_filters=16, head_units=32,
                            rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20,
                            max_detections=10), (2, 64, 64, 3)),
        # FCN-8s's bilinear initializer is a chapter-6 class.
        "ch06": (ch06_models.get_model("fcn8s", (32, 32, 3), 3, head_filters=8,
                                       filters=(8, 8, 16, 16)), (2, 32, 32, 3)),
    }
    paths, inputs, outputs = {}, {}, {}
    for chapter, (model, input_shape) in built.items():
        paths[chapter] = str(root / f"{chapter}.keras")
        model.save(paths[chapter])
        inputs[chapter] = rng.uniform(size=input_shape).astype(np.float32)
        result = model(inputs[chapter], training=False)
        outputs[chapter] = np.asarray(result["class_logits"] if isinstance(result, dict) else result)
    np.savez(root / "inputs.npz", **inputs)
    return root, paths, outputs


def test_fresh_process_bare_keras_fails_and_chapter_loaders_work(saved_models):
    root, paths, expected = saved_models
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, json.dumps(paths), str(root / "inputs.npz"),
         str(root / "outputs.npz")],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tensorflow_imported_by_packages"] is False
    # What the user saw: Keras alone cannot find the chapters' classes.
    assert "Could not locate class 'FasterRCNN'" in report["ch05_bare_keras"]
    assert "Could not locate class 'ScaledTanh'" in report["ch04_bare_keras"]
    assert ("Could not interpret initializer identifier" in report["ch06_bare_keras"]
            and "BilinearUpsampleInitializer" in report["ch06_bare_keras"])
    # The wrong chapter's loader names the right one.
    message = report["ch04_loader_on_ch05"]
    assert "FasterRCNN" in message and "use ch05_detection.load_model(" in message
    assert paths["ch05"] in message
    message = report["ch05_loader_on_ch06"]
    assert "BilinearUpsampleInitializer" in message
    assert "use ch06_segmentation.load_model(" in message
    # The loaders give back the saved models, with the same outputs.
    assert report["ch05_class"] == "FasterRCNN"
    loaded = np.load(root / "outputs.npz")
    for chapter in ("ch04", "ch05", "ch06"):
        np.testing.assert_allclose(loaded[chapter], expected[chapter], atol=1e-5)


def test_missing_file_names_it(tmp_path):
    for loader in (ch04_classification.load_model, ch05_detection.load_model,
                   ch06_segmentation.load_model):
        with pytest.raises(ValueError, match="no_such.keras.*does not exist"):
            loader(tmp_path / "no_such.keras")


def test_unknown_class_message_names_the_loaders(tmp_path):
    """A class the repo does not define (the user's own layer): the message says what to do."""

    class UsersOwnLayer(keras.layers.Layer):
        def call(self, inputs):
            return inputs

    keras.saving.register_keras_serializable(package="my_project")(UsersOwnLayer)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, UsersOwnLayer()(inputs))
    path = tmp_path / "own.keras"
    model.save(path)
    # Forget the registration, as a fresh interpreter would.
    keras.saving.get_custom_objects().pop("my_project>UsersOwnLayer")
    with pytest.raises(ValueError, match=r"could not locate class 'UsersOwnLayer'.*"
                                         r"ch05_detection.load_model.*custom_objects"):
        ch05_detection.load_model(path)
