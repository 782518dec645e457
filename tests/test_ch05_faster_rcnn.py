"""Tests of the FasterRCNN model (ch05_detection/faster_rcnn.py) on tiny inputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import rpn
from ch05_detection.faster_rcnn import FasterRCNN
from common import synthetic

SIZE = 64


def tiny_model(**options):
    settings = dict(image_size=(SIZE, SIZE), backbone="resnet_small", output_stride=8,
                    backbone_options={"filters": [8, 16, 32, 64]}, anchor_scales=(12, 24, 48),
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
    assert out["boxes"].shape == (3, 10, 4)
    assert out["classes"].shape == (3, 10) and out["scores"].shape == (3, 10)
    assert out["num_detections"].shape == (3,)
    for i in range(3):
        n = out["num_detections"][i]
        assert (out["classes"][i, n:] == -1).all() and (out["scores"][i, n:] == 0).all()
        assert ((out["classes"][i, :n] >= 0) & (out["classes"][i, :n] < 5)).all()
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
    expected = model(batch["image"], training=False)
    actual = loaded(batch["image"], training=False)
    assert int(tf.reduce_sum(expected["num_detections"])) > 0
    for key in expected:
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy())
    np.testing.assert_array_equal(loaded.propose(batch["image"])["proposals"].numpy(),
                                  model.propose(batch["image"])["proposals"].numpy())


def test_train_steps_reduce_loss_on_a_fixed_batch(trained):
    _, history = trained
    assert np.isfinite(history).all()
    assert np.mean(history[-5:]) < 0.6 * np.mean(history[:3])


def test_rpn_recall_is_high_after_short_training():
    """STYLE.md: an RPN that never proposes boxes on the objects must be caught."""
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


def test_alternating_stages_train_only_their_layers(batch):
    """Steps 3 and 4 of the 4-step schedule: shared convolutions frozen (BatchNorm too)."""
    model = tiny_model(flip_augment=False)
    for stage, frozen, trained_layers in [
            ("rpn_finetune", ("backbone", "detection_head"), ("rpn_head",)),
            ("detector_finetune", ("backbone", "rpn_head"), ("detection_head",))]:
        model.set_training_stage(stage)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
        before = {name: [w.numpy().copy() for w in getattr(model, name).weights]
                  for name in frozen + trained_layers}
        model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
        for name in frozen:
            for old, new in zip(before[name], getattr(model, name).weights):
                np.testing.assert_array_equal(old, new.numpy())
        for name in trained_layers:
            assert any(not np.array_equal(old, new.numpy())
                       for old, new in zip(before[name], getattr(model, name).weights))


def test_bad_and_empty_inputs(batch):
    model = tiny_model()
    with pytest.raises(ValueError, match="images"):
        model.detect(np.zeros((SIZE, SIZE)))  # wrong rank
    with pytest.raises(ValueError, match="images"):
        model.detect(np.zeros((1, 2, SIZE, SIZE, 3)))
    with pytest.raises(ValueError, match="training_stage|stage"):
        model.set_training_stage("everything")
    with pytest.raises(ValueError, match="gt_classes"):
        model._unpack({"image": batch["image"], "boxes": batch["boxes"],
                       "classes": np.where(batch["classes"] >= 0, 7, -1)})
    with pytest.raises(ValueError, match="image"):
        model._unpack({"image": batch["image"]})
    # No objects at all, degenerate / out-of-range boxes, and (inside the graph) class ids
    # beyond num_classes are handled: finite losses, those rows ignored.
    empty = {"image": batch["image"][:2], "boxes": np.zeros((2, 3, 4), np.float32),
             "classes": -np.ones((2, 3), np.int32)}
    odd = {"image": batch["image"][:2],
           "boxes": np.array([[[0.5, 0.5, 0.5, 0.5], [-0.2, 0.1, 1.3, 0.9], [0.8, 0.8, 0.1, 0.1]]] * 2,
                             np.float32),
           "classes": np.array([[1, 2, 9]] * 2, np.int32)}
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    for data in (empty, odd):
        history = model.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0).history
        assert all(np.isfinite(v[-1]) for v in history.values())
    # Other image sizes are resized; an empty batch is fine.
    assert model.detect(np.zeros((1, 40, 50, 3), np.float32))["boxes"].shape == (1, 10, 4)
    assert model.detect(np.zeros((0, SIZE, SIZE, 3), np.float32))["boxes"].shape == (0, 10, 4)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16", "mobilenet_v2"])
def test_other_chapter4_backbones_build_and_detect(backbone):
    model = FasterRCNN(3, image_size=(64, 64), backbone=backbone, output_stride=16,
                       anchor_scales=(16, 32, 64), rpn_filters=8, head_units=8, head_channels=8,
                       rpn_post_nms_top_n_test=10, max_detections=5)
    assert model.feature_size == (4, 4)
    out = model(np.zeros((1, 64, 64, 3), np.float32))
    assert out["boxes"].shape == (1, 5, 4)
