"""Tests of the FasterRCNN model (ch05_detection/faster_rcnn.py) on tiny inputs."""

import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import rpn
from ch05_detection.faster_rcnn import FasterRCNN, FasterRCNNConfig, load_backbone_weights
from common import synthetic
from detection_checks import check_detect_contract  # tests/detection_checks.py

SIZE = 64


def tiny_model(**options):
    settings = dict(image_size=(SIZE, SIZE), backbone="resnet_small", output_stride=8,
                    backbone_options={"filters": [8, 16, 32, 64]}, anchor_scales=(12, 24, 36),
                    rpn_filters=16, head_units=32, rois_per_image=16,
                    rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=50,
                    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=20, max_detections=10)
    settings.update(options)
    return FasterRCNN(5, **settings)


def shapes_batch(count, max_boxes=6, start=0):
    images = np.zeros((count, SIZE, SIZE, 3), np.float32)
    boxes = np.zeros((count, max_boxes, 4), np.float32)
    classes = -np.ones((count, max_boxes), np.int32)
    for i in range(count):
        scene = synthetic.make_scene(start + i, "train", image_size=SIZE)
        n = len(scene["classes"])
        images[i], boxes[i, :n], classes[i, :n] = scene["image"], scene["boxes"], scene["classes"]
    return {"image": images, "boxes": boxes, "classes": classes}


@pytest.fixture(scope="module")
def batch():
    return shapes_batch(8)


@pytest.fixture(scope="module")
def trained(batch):
    """A tiny model (RoI pooling + conv head) after 30 steps on one fixed batch."""
    keras.utils.set_random_seed(1)
    model = tiny_model(roi_op="pool", head_type="conv", flip_augment=False)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=False)
    history = model.fit(tf.data.Dataset.from_tensors(batch).repeat(), steps_per_epoch=1,
                        epochs=30, verbose=0).history["loss"]
    return model, history


def test_output_shapes_and_padding(batch, trained):
    model, _ = trained
    out = model.detect(batch["image"][:3])
    check_detect_contract(out, 3, 10, 5)
    # predict() (Keras) gives the same dict; one [H, W, 3] image gets a batch axis.
    predicted = model.predict(batch["image"][:2], verbose=0)
    np.testing.assert_allclose(predicted["scores"], out["scores"][:2], atol=1e-5)
    single = model.detect(batch["image"][0])
    assert single["boxes"].shape == (1, 10, 4)
    # Proposals before / after NMS for pictures.
    proposals = model.propose(batch["image"][:2])
    assert proposals["pre_nms_boxes"].shape == (2, 100, 4)
    assert proposals["proposals"].shape == (2, 20, 4)


def test_keras_round_trip_gives_identical_outputs(tmp_path, batch, trained):
    model, _ = trained
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FasterRCNN)
    assert loaded.get_config() == model.get_config()
    # Same call (eager, same batch shape) on both: bit-identical outputs. (Graphs traced
    # for other batch shapes may pick other CPU kernels, which differ in the last bit.)
    expected = model(batch["image"], training=False)  # raw outputs: proposals, head outputs
    actual = loaded(batch["image"], training=False)
    assert set(expected) == {"proposals", "num_proposals", "class_logits", "box_deltas"}
    for key in expected:
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy())
    decoded, loaded_decoded = model.decode(expected), loaded.decode(actual)
    assert int(tf.reduce_sum(decoded["num_detections"])) > 0
    for key in decoded:
        np.testing.assert_array_equal(loaded_decoded[key].numpy(), decoded[key].numpy())
    np.testing.assert_array_equal(loaded.propose(batch["image"])["proposals"].numpy(),
                                  model.propose(batch["image"])["proposals"].numpy())


def test_train_steps_reduce_loss_on_a_fixed_batch(trained):
    _, history = trained
    assert np.isfinite(history).all()
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:3])


def test_rpn_recall_is_high_after_short_training():
    """An RPN that never proposes boxes on the objects must be caught."""
    keras.utils.set_random_seed(2)
    data = shapes_batch(16, start=100)
    model = tiny_model(flip_augment=False, rpn_post_nms_top_n_test=50)
    # 60 steps are too few for BatchNorm's running averages at momentum 0.99 (inference
    # would see different features than training); let them follow the batches faster.
    for layer in model.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.5
    model.set_training_stage("rpn")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)

    def recall(iou_threshold):
        out = model.propose(data["image"])
        return float(rpn.proposal_recall(out["proposals"], out["num_proposals"], data["boxes"],
                                         data["classes"], iou_threshold=iou_threshold))

    recall_before = recall(0.5)
    model.fit(tf.data.Dataset.from_tensor_slices(data).batch(8).repeat(), steps_per_epoch=60,
              epochs=1, verbose=0)
    assert recall(0.5) >= 0.85
    assert recall(0.5) > recall_before + 0.2


def test_bad_and_empty_inputs(batch):
    model = tiny_model()
    with pytest.raises(ValueError, match="images"):
        model.detect(np.zeros((SIZE, SIZE)))  # wrong rank
    with pytest.raises(ValueError, match="images"):
        model.detect(np.zeros((1, 2, SIZE, SIZE, 3)))
    with pytest.raises(ValueError, match="stage"):
        model.set_training_stage("everything")
    with pytest.raises(ValueError, match="alternating"):
        model.set_training_stage("detector")  # a joint model has no detector network
    with pytest.raises(ValueError, match="image"):
        model._unpack({"image": batch["image"]})
    # No objects at all, and degenerate / out-of-range boxes: finite losses, rows ignored.
    empty = {"image": batch["image"][:2], "boxes": np.zeros((2, 3, 4), np.float32),
             "classes": -np.ones((2, 3), np.int32)}
    odd = {"image": batch["image"][:2],
           "boxes": np.array([[[0.5, 0.5, 0.5, 0.5], [-0.2, 0.1, 1.3, 0.9],
                               [0.8, 0.8, 0.1, 0.1]]] * 2, np.float32),
           "classes": np.array([[1, 2, 4]] * 2, np.int32)}
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    for data in (empty, odd):
        history = model.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0).history
        assert all(np.isfinite(v[-1]) for v in history.values())
    # A class id beyond num_classes: the same message eagerly and inside the traced step.
    wrong = dict(odd, classes=np.array([[1, 9, -1]] * 2, np.int32))
    message = r"num_classes=5\); bad class ids:"
    with pytest.raises(ValueError, match=message + r" \[9\]"):
        model.compute_losses(wrong)
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?s)" + message + r".*\[9 9\]"):
        model.fit(tf.data.Dataset.from_tensors(wrong), epochs=1, verbose=0)
    # Other image sizes are resized; an empty batch is fine.
    assert model.detect(np.zeros((1, 40, 50, 3), np.float32))["boxes"].shape == (1, 10, 4)
    assert model.detect(np.zeros((0, SIZE, SIZE, 3), np.float32))["boxes"].shape == (0, 10, 4)


def test_compute_losses_names_and_stages(batch):
    model = tiny_model()
    losses = model.compute_losses(batch)
    assert set(losses) == {"loss", "rpn_class_loss", "rpn_box_loss", "head_class_loss",
                           "head_box_loss"}
    assert all(np.isfinite(float(v)) for v in losses.values())
    parts = sum(float(v) for k, v in losses.items() if k != "loss")
    assert float(losses["loss"]) == pytest.approx(parts, rel=1e-6)
    # A freshly initialised RPN predicts logit ~0: log loss ~log 2 on the sampled anchors.
    assert float(losses["rpn_class_loss"]) == pytest.approx(np.log(2.0), abs=0.05)
    # The same step samples the same anchors and RoIs: the losses are repeatable.
    again = model.compute_losses(batch)
    for key in losses:
        assert float(again[key]) == pytest.approx(float(losses[key]), rel=1e-6)
    model.set_training_stage("rpn")
    rpn_only = model.compute_losses(batch)
    assert float(rpn_only["head_class_loss"]) == 0.0 and float(rpn_only["head_box_loss"]) == 0.0
    assert float(rpn_only["rpn_class_loss"]) == pytest.approx(float(losses["rpn_class_loss"]))


def test_options_live_in_one_config():
    options = dict(image_size=(SIZE, SIZE), backbone_options={"filters": [8, 16, 32, 64]},
                   anchor_scales=(12, 24, 36), rpn_filters=16, head_units=32,
                   class_names=("circle", "square", "triangle", "star", "ring"))
    config = FasterRCNNConfig(num_classes=5, **options)
    from_options = FasterRCNN(5, name="a", **options)
    from_config = FasterRCNN(config=config, name="a")
    assert from_options.config == config == from_config.config
    assert from_options.get_config() == from_config.get_config()
    # get_config = the dataclass fields (+ Keras' own keys and the stage), nothing else.
    fields = {f.name for f in dataclasses.fields(FasterRCNNConfig)}
    assert set(from_options.get_config()) == fields | {"name", "trainable", "dtype",
                                                       "training_stage"}
    # JSON turns tuples into lists; from_config turns them back.
    as_json = json.loads(json.dumps(from_options.get_config()))
    assert FasterRCNN.from_config(as_json).config == config
    assert from_options.class_names[1] == "square"
    assert FasterRCNNConfig(num_classes=3).names == ("class 0", "class 1", "class 2")
    assert FasterRCNNConfig(num_classes=3, image_size=96).image_size == (96, 96)
    with pytest.raises(ValueError, match="class_names"):
        FasterRCNNConfig(num_classes=3, class_names=("a", "b"))
    with pytest.raises(ValueError, match="unknown FasterRCNN options"):
        FasterRCNN(5, rpn_filter=3)
    with pytest.raises(ValueError, match="schedule"):
        FasterRCNNConfig(num_classes=3, schedule="sometimes")
    with pytest.raises(ValueError, match="rpn_negative_iou"):
        FasterRCNNConfig(num_classes=3, rpn_negative_iou=0.8)
    # An anchor shape that never fits inside the image would never be trained.
    with pytest.raises(ValueError, match="rpn_ignore_cross_boundary"):
        tiny_model(anchor_scales=(12, 24, 48))
    unchecked = tiny_model(anchor_scales=(12, 24, 48), rpn_ignore_cross_boundary=False)
    assert unchecked.anchor_valid is None


def test_synchronized_batch_norm_option(batch):
    plain = tiny_model()
    synced = tiny_model(synchronized_batch_norm=True)
    norms = [layer for layer in synced.backbone.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and all(layer.synchronized for layer in norms)
    assert [layer.name for layer in synced.backbone.layers] == \
        [layer.name for layer in plain.backbone.layers]
    # Same weights -> same training-mode features on one device (no replicas to sync).
    synced.backbone.set_weights(plain.backbone.get_weights())
    np.testing.assert_allclose(synced.backbone(batch["image"], training=True),
                               plain.backbone(batch["image"], training=True), rtol=1e-4, atol=1e-4)


def classifier_file(tmp_path, filters=(8, 16, 32, 64)):
    """A chapter-4 classifier saved the way train_classifier.py saves it (model.keras)."""
    from ch04_classification.models import get_model

    classifier = get_model("resnet_small", (32, 32, 3), 5, filters=list(filters))
    path = tmp_path / "model.keras"
    classifier.save(path)
    return classifier, path


def test_load_backbone_weights_from_a_chapter4_classifier(tmp_path):
    keras.utils.set_random_seed(4)
    classifier, path = classifier_file(tmp_path)
    for schedule in ("joint", "alternating"):
        model = tiny_model(schedule=schedule)
        copied = load_backbone_weights(model, path)
        assert "conv1_conv" in copied and "conv5_block1_1_conv" not in copied  # stride 8
        backbones = [model.backbone] + ([model.detector_backbone] if schedule == "alternating"
                                        else [])
        for backbone in backbones:
            for layer in backbone.layers:
                for ours, theirs in zip(layer.weights,
                                        classifier.get_layer(layer.name).weights):
                    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    with pytest.raises(ValueError, match="does not match"):
        load_backbone_weights(tiny_model(backbone_options={"filters": [16, 16, 32, 64]}), path)
    with pytest.raises(ValueError, match="classifier_path"):
        load_backbone_weights(tiny_model(), tmp_path / "missing.keras")


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16", "mobilenet_v2"])
def test_other_chapter4_backbones_build_and_detect(backbone):
    model = FasterRCNN(3, image_size=(64, 64), backbone=backbone, output_stride=16,
                       anchor_scales=(16, 32), rpn_filters=8, head_units=8, head_channels=8,
                       rpn_post_nms_top_n_test=10, max_detections=5)
    assert model.feature_size == (4, 4)
    out = model.detect(np.zeros((1, 64, 64, 3), np.float32))
    assert out["boxes"].shape == (1, 5, 4)
