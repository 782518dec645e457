"""The paper's 4-step alternating training (Ren et al. 2015, sec. 3.2) on a tiny FasterRCNN.

Each step is trained for one SGD step on a fixed batch; the test checks which weights
moved and which did not, and that after step 3 the RPN and the detector share one
backbone.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_ch05_faster_rcnn import shapes_batch, tiny_model

from ch05_detection.faster_rcnn import ALTERNATING_SCHEDULE


def snapshot(model):
    """All weights (trainable and BatchNorm statistics) of each part, as NumPy."""
    parts = {"backbone": model.backbone, "detector_backbone": model.detector_backbone,
             "rpn_head": model.rpn_head, "detection_head": model.detection_head,
             "head_reduce": model.head_reduce}
    return {name: [w.numpy().copy() for w in part.weights] for name, part in parts.items()}


def changed(before, after, name):
    return any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))


def train_one_step(model, batch, stage):
    model.set_training_stage(stage)
    model.compile(optimizer=keras.optimizers.SGD(0.05), jit_compile=False)
    before = snapshot(model)
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][-1])
    return before, snapshot(model)


@pytest.fixture(scope="module")
def batch():
    return shapes_batch(4)


def test_four_steps_train_exactly_their_parts(batch):
    keras.utils.set_random_seed(3)
    model = tiny_model(schedule="alternating", flip_augment=False, head_channels=8)
    num_weights = len(model.weights)
    assert model.training_stage == "rpn"
    # Two backbones, same initial weights, separate variables.
    start = snapshot(model)
    for ours, theirs in zip(start["backbone"], start["detector_backbone"]):
        np.testing.assert_array_equal(ours, theirs)
    assert not set(map(id, model.backbone.weights)) & set(map(id, model.detector_backbone.weights))

    # Step 1: the RPN network (its backbone + RPN layers) on the RPN loss.
    before, after = train_one_step(model, batch, "rpn")
    assert changed(before, after, "backbone") and changed(before, after, "rpn_head")
    for name in ("detector_backbone", "detection_head", "head_reduce"):
        assert not changed(before, after, name), name
    proposals_step1 = model.propose(batch["image"])["proposals"].numpy()

    # Step 2: a separate detector network (own backbone + head) on step 1's proposals.
    before, after = train_one_step(model, batch, "detector")
    for name in ("detector_backbone", "detection_head", "head_reduce"):
        assert changed(before, after, name), name
    for name in ("backbone", "rpn_head"):
        assert not changed(before, after, name), name
    np.testing.assert_array_equal(model.propose(batch["image"])["proposals"].numpy(),
                                  proposals_step1)
    # The two networks now differ: step 2 trained only the detector's backbone.
    assert any(not np.array_equal(rpn_weight, detector_weight) for rpn_weight, detector_weight
               in zip(after["backbone"], after["detector_backbone"]))

    # Step 3: the RPN takes the detector's backbone, frozen; only the RPN layers train.
    detector_backbone = after["detector_backbone"]
    before, after = train_one_step(model, batch, "rpn_finetune")
    for ours, theirs in zip(before["backbone"], detector_backbone):
        np.testing.assert_array_equal(ours, theirs)  # copied on entering step 3
    assert changed(before, after, "rpn_head")
    for name in ("backbone", "detector_backbone", "detection_head", "head_reduce"):
        assert not changed(before, after, name), name
    # One backbone for both: same weights, same features on both paths.
    for ours, theirs in zip(after["backbone"], after["detector_backbone"]):
        np.testing.assert_array_equal(ours, theirs)
    images = tf.constant(batch["image"])
    np.testing.assert_array_equal(model.rpn_features(images).numpy(),
                                  model.detector_features(images).numpy())

    # Step 4: the detector layers only; the shared convolutions stay as they are.
    before, after = train_one_step(model, batch, "detector_finetune")
    assert changed(before, after, "detection_head") and changed(before, after, "head_reduce")
    for name in ("backbone", "detector_backbone", "rpn_head"):
        assert not changed(before, after, name), name
    np.testing.assert_array_equal(model.rpn_features(images).numpy(),
                                  model.detector_features(images).numpy())
    assert len(model.weights) == num_weights  # the variable set never changed


def test_saved_alternating_model_keeps_its_stage_and_outputs(tmp_path, batch):
    model = tiny_model(schedule="alternating", flip_augment=False)
    for stage in ALTERNATING_SCHEDULE:
        model.set_training_stage(stage)
    # A detector backbone that differs from the RPN's (as after step 2).
    model.detector_backbone.set_weights(
        [w * 1.01 for w in model.detector_backbone.get_weights()])
    model.set_training_stage("detector_finetune")
    path = tmp_path / "alternating.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_config() == model.get_config()
    assert loaded.training_stage == "detector_finetune"
    expected = model(batch["image"], training=False)
    actual = loaded(batch["image"], training=False)
    for key in expected:
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy())


def test_stage_checks():
    model = tiny_model(schedule="alternating")
    with pytest.raises(ValueError, match="schedule='joint'"):
        model.set_training_stage("joint")
    with pytest.raises(ValueError, match="stage"):
        model.set_training_stage("step 5")
    assert tiny_model().detector_backbone is None
