"""Chapter 6 losses and metrics, each checked against an independent reference.

Mean IoU vs keras.metrics.MeanIoU (also with ignored pixels, by dropping them
before Keras sees them, and with sample weights), the confusion matrix vs a
NumPy count, pixel accuracy vs NumPy, both metrics alone and together under
tf.function / XLA and inside fit; PSNR vs tf.image.psnr, SSIM vs
tf.image.ssim, the ignoring cross-entropy (values and gradients) vs Keras'
cross-entropy on the kept pixels, Dice vs a hand-computed example; bad masks
raise ValueError.
"""

import numpy as np
import pytest
import keras
import tensorflow as tf

from ch06_segmentation import losses

NUM_CLASSES = 4


def _random_case(seed, ignore_fraction=0.0, shape=(2, 8, 8)):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, size=shape).astype(np.int32)
    if ignore_fraction:
        labels[rng.random(shape) < ignore_fraction] = 255
    logits = rng.normal(size=shape + (NUM_CLASSES,)).astype(np.float32)
    # Make predictions right more often than chance, so IoUs are not all tiny.
    logits += 2.0 * np.eye(NUM_CLASSES, dtype=np.float32)[np.minimum(labels, NUM_CLASSES - 1)]
    return labels, logits


# ---------------------------------------------------------------------------
# Mean IoU and pixel accuracy
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mean_iou_equals_keras_over_several_batches(seed):
    ours = losses.MeanIoU(NUM_CLASSES)
    reference = keras.metrics.MeanIoU(NUM_CLASSES, sparse_y_true=True, sparse_y_pred=False)
    for batch in range(3):
        labels, logits = _random_case(seed * 10 + batch)
        ours.update_state(labels, logits)
        reference.update_state(labels, logits)
    np.testing.assert_allclose(ours.result().numpy(), reference.result().numpy(), rtol=1e-6)


def test_mean_iou_with_ignore_label_equals_keras_on_kept_pixels():
    labels, logits = _random_case(5, ignore_fraction=0.3)
    ours = losses.MeanIoU(NUM_CLASSES, ignore_label=255)
    ours.update_state(labels, logits)
    keep = labels != 255
    reference = keras.metrics.MeanIoU(NUM_CLASSES)
    reference.update_state(labels[keep], np.argmax(logits, -1)[keep])
    np.testing.assert_allclose(ours.result().numpy(), reference.result().numpy(), rtol=1e-6)
    # And with Keras' own ignore_class argument.
    keras_ignore = keras.metrics.MeanIoU(NUM_CLASSES, ignore_class=255, sparse_y_pred=False)
    keras_ignore.update_state(labels, logits)
    np.testing.assert_allclose(ours.result().numpy(), keras_ignore.result().numpy(), rtol=1e-6)


def test_mean_iou_hand_example_and_absent_class():
    # truth [0 0 1 1], prediction [0 1 1 1]: IoU_0 = 1/2, IoU_1 = 2/3, class 2 absent
    # from both -> not averaged in.
    truth = np.array([[[0, 0, 1, 1]]])
    prediction = np.array([[[0, 1, 1, 1]]])
    metric = losses.MeanIoU(3, from_logits=False)
    metric.update_state(truth, prediction)
    np.testing.assert_allclose(metric.result().numpy(), (1 / 2 + 2 / 3) / 2, rtol=1e-6)
    accuracy = losses.PixelAccuracy(3, from_logits=False)
    accuracy.update_state(truth, prediction)
    np.testing.assert_allclose(accuracy.result().numpy(), 0.75)
    metric.reset_state()
    assert metric.result().numpy() == 0.0


def test_pixel_accuracy_skips_ignored_pixels():
    labels, logits = _random_case(6, ignore_fraction=0.25)
    metric = losses.PixelAccuracy(NUM_CLASSES)
    metric.update_state(labels, logits)
    keep = labels != 255
    expected = np.mean(np.argmax(logits, -1)[keep] == labels[keep])
    np.testing.assert_allclose(metric.result().numpy(), expected, rtol=1e-6)


def test_metrics_in_compiled_fit_and_serialisable():
    metric = losses.MeanIoU(3, name="val_iou")
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, losses.MeanIoU) and restored.num_classes == 3
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.compile("adam", losses.SparseCrossEntropyIgnore(),
                  metrics=[losses.MeanIoU(3), losses.PixelAccuracy(3)])
    images = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    masks = (images[..., 0] * 3).astype(np.int32)
    masks[:, 0] = 255
    logs = model.fit(images, masks, epochs=1, verbose=0).history
    assert 0.0 <= logs["mean_iou"][0] <= 1.0 and 0.0 <= logs["pixel_accuracy"][0] <= 1.0


def _numpy_confusion(labels, predictions, weights, num_classes):
    """Reference: add each counted pixel's weight at (truth, prediction), one pixel at a time."""
    matrix = np.zeros((num_classes, num_classes))
    for t, p, w in zip(labels.ravel(), predictions.ravel(), np.broadcast_to(weights, labels.shape).ravel()):
        if 0 <= t < num_classes and 0 <= p < num_classes:
            matrix[t, p] += w
    return matrix


def test_confusion_matrix_equals_numpy_count_with_weights_and_out_of_range():
    labels, logits = _random_case(13, ignore_fraction=0.2)
    predictions = np.argmax(logits, -1)
    predictions[0, 0, :3] = [NUM_CLASSES, -1, NUM_CLASSES + 3]  # outside [0, classes): not counted
    weights = np.random.default_rng(13).uniform(size=labels.shape)
    for w in (None, 2.5, weights, np.array([0.5, 3.0])):
        ours = losses.confusion_matrix(labels, predictions, NUM_CLASSES, sample_weight=w).numpy()
        reference_weights = 1.0 if w is None else (w[:, None, None] if np.ndim(w) == 1 else w)
        np.testing.assert_allclose(ours, _numpy_confusion(labels, predictions, reference_weights,
                                                          NUM_CLASSES), rtol=1e-12)
    with pytest.raises(ValueError, match="sample_weight"):
        losses.confusion_matrix(labels, predictions, NUM_CLASSES, sample_weight=np.ones((3, 5)))
    with pytest.raises(ValueError, match="same shape"):
        losses.confusion_matrix(labels, predictions[:, :4], NUM_CLASSES)
    # An empty batch is an empty matrix, not an error.
    empty = losses.confusion_matrix(np.zeros((0, 8, 8), np.int32), np.zeros((0, 8, 8)), NUM_CLASSES)
    np.testing.assert_array_equal(empty.numpy(), np.zeros((NUM_CLASSES, NUM_CLASSES)))


def test_weighted_metrics_equal_keras_mean_iou_and_numpy_accuracy():
    labels, logits = _random_case(14, ignore_fraction=0.2)
    pixel_weights = np.random.default_rng(14).uniform(size=labels.shape).astype(np.float32)
    image_weights = np.array([0.25, 2.0], np.float32)
    keep = labels != 255
    correct = np.argmax(logits, -1) == labels
    for weights, per_pixel in ((pixel_weights, pixel_weights), (image_weights, np.broadcast_to(
            image_weights[:, None, None], labels.shape)), (3.0, np.full(labels.shape, 3.0))):
        ours = losses.MeanIoU(NUM_CLASSES)
        ours.update_state(labels, logits, sample_weight=weights)
        # Keras' default dtype (int) would truncate fractional weights.
        reference = keras.metrics.MeanIoU(NUM_CLASSES, ignore_class=255, sparse_y_pred=False,
                                          dtype="float64")
        reference.update_state(labels, logits, sample_weight=per_pixel)
        np.testing.assert_allclose(ours.result().numpy(), reference.result().numpy(), rtol=1e-6)
        accuracy = losses.PixelAccuracy(NUM_CLASSES)
        accuracy.update_state(labels, logits, sample_weight=weights)
        expected = (per_pixel * correct * keep).sum() / (per_pixel * keep).sum()
        np.testing.assert_allclose(accuracy.result().numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_metrics_alone_and_together_under_tf_function(jit_compile):
    batches = [_random_case(20 + i, ignore_fraction=0.1) for i in range(2)]
    eager = [losses.MeanIoU(NUM_CLASSES), losses.PixelAccuracy(NUM_CLASSES)]
    alone = [losses.MeanIoU(NUM_CLASSES), losses.PixelAccuracy(NUM_CLASSES)]
    together = [losses.MeanIoU(NUM_CLASSES), losses.PixelAccuracy(NUM_CLASSES)]
    steps_alone = [tf.function(lambda y, p, m=m: m.update_state(y, p), jit_compile=jit_compile)
                   for m in alone]

    @tf.function(jit_compile=jit_compile)
    def step_together(y, p):  # both in one graph, as in fit's train step
        for metric in together:
            metric.update_state(y, p)
        return [metric.result() for metric in together]

    for labels, logits in batches:
        for metric, step in zip(eager, steps_alone):
            metric.update_state(labels, logits)
        for step in steps_alone:
            step(labels, logits)
        step_together(labels, logits)
    for metrics in (alone, together):
        for metric, reference in zip(metrics, eager):
            np.testing.assert_allclose(metric.result().numpy(), reference.result().numpy(), rtol=1e-6)
            np.testing.assert_array_equal(metric.total_confusion.numpy(),
                                          reference.total_confusion.numpy())


def test_metric_configs_round_trip():
    for metric in (losses.MeanIoU(5, ignore_label=7, from_logits=False, name="iou"),
                   losses.PixelAccuracy(5, ignore_label=7, from_logits=False, name="acc")):
        restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
        assert type(restored) is type(metric)
        assert restored.get_config() == metric.get_config()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_metrics_logged_by_fit_equal_keras_on_the_same_predictions(jit_compile, without_op_determinism):
    # Learning rate 0: the weights do not move, so the epoch's metrics are those of one model.
    rng = np.random.default_rng(15)
    inputs = keras.Input((8, 8, 2))
    model = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    model.compile(keras.optimizers.SGD(0.0), losses.CrossEntropyPlusDice(),
                  metrics=[losses.MeanIoU(3), losses.PixelAccuracy(3)], jit_compile=jit_compile)
    assert model.jit_compile is jit_compile  # not silently refused
    images = rng.normal(size=(12, 8, 8, 2)).astype(np.float32)
    masks = rng.integers(0, 3, size=(12, 8, 8)).astype(np.int32)
    masks[:, 0] = 255
    logs = model.fit(images, masks, batch_size=4, epochs=1, verbose=0).history
    logits = model.predict(images, verbose=0)
    reference = keras.metrics.MeanIoU(3, ignore_class=255, sparse_y_pred=False)
    reference.update_state(masks, logits)
    np.testing.assert_allclose(logs["mean_iou"][0], reference.result().numpy(), rtol=1e-5)
    keep = masks != 255
    np.testing.assert_allclose(logs["pixel_accuracy"][0],
                               np.mean(np.argmax(logits, -1)[keep] == masks[keep]), rtol=1e-5)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

def test_cross_entropy_ignore_equals_keras_on_kept_pixels():
    labels, logits = _random_case(7, ignore_fraction=0.3)
    keep = labels != 255
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels[keep], logits[keep])
    ours = losses.SparseCrossEntropyIgnore()(labels, logits)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), rtol=1e-5)
    # Every pixel ignored: zero, not NaN.
    assert losses.SparseCrossEntropyIgnore()(np.full_like(labels, 255), logits).numpy() == 0.0


def test_cross_entropy_gradient_equals_keras_on_kept_pixels():
    labels, logits = _random_case(16, ignore_fraction=0.3)
    keep = labels != 255
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        ours = losses.SparseCrossEntropyIgnore()(labels, variable)
    gradient = tape.gradient(ours, variable).numpy()
    kept = tf.Variable(logits[keep])
    with tf.GradientTape() as tape:
        expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels[keep], kept)
    np.testing.assert_allclose(gradient[keep], tape.gradient(expected, kept).numpy(), rtol=1e-4,
                               atol=1e-7)
    assert np.all(gradient[~keep] == 0)
    # Probabilities in (from_logits=False) give the same loss as logits in.
    probabilities = tf.nn.softmax(logits).numpy()
    np.testing.assert_allclose(losses.SparseCrossEntropyIgnore(from_logits=False)(labels, probabilities),
                               expected.numpy(), rtol=1e-5)


def test_cross_entropy_plus_dice_is_the_sum_of_its_parts():
    labels, logits = _random_case(17, ignore_fraction=0.2)
    keep = labels != 255
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels[keep],
                                                                                logits[keep])
    dice = losses.SoftDiceLoss()(labels, logits)
    np.testing.assert_allclose(losses.CrossEntropyPlusDice(dice_weight=0.5)(labels, logits).numpy(),
                               cross_entropy.numpy() + 0.5 * dice.numpy(), rtol=1e-5)


def test_weighted_cross_entropy_is_a_weighted_mean():
    labels, logits = _random_case(8)
    weights = np.array([0.5, 1.0, 2.0, 4.0], np.float32)
    per_pixel = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(
        labels, logits).numpy()
    pixel_weights = weights[labels]
    expected = (per_pixel * pixel_weights).sum() / pixel_weights.sum()
    ours = losses.WeightedSparseCrossEntropy(weights)(labels, logits)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-5)
    # Equal weights give the plain loss.
    plain = losses.SparseCrossEntropyIgnore()(labels, logits)
    np.testing.assert_allclose(losses.WeightedSparseCrossEntropy([3.0] * 4)(labels, logits).numpy(),
                               plain.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="class_weights"):
        losses.WeightedSparseCrossEntropy([1.0, 2.0])(labels, logits)


def test_median_frequency_weights():
    masks = np.array([0] * 6 + [1] * 3 + [2] * 1 + [255] * 5)
    weights = losses.median_frequency_weights(masks, 4)
    # frequencies 0.6, 0.3, 0.1 (class 3 absent): median 0.3 -> weights 0.5, 1, 3, 0
    np.testing.assert_allclose(weights, [0.5, 1.0, 3.0, 0.0], rtol=1e-6)


def test_soft_dice_hand_example_and_perfect_prediction():
    # Two classes, probabilities given directly (from_logits=False), smooth=0.
    truth = np.array([[[0, 1]]])
    probabilities = np.array([[[[0.8, 0.2], [0.4, 0.6]]]], np.float32)
    # class 0: 2*0.8 / (1.2 + 1) ; class 1: 2*0.6 / (0.8 + 1)
    dice = np.mean([1.6 / 2.2, 1.2 / 1.8])
    ours = losses.SoftDiceLoss(from_logits=False, smooth=0.0)(truth, probabilities)
    np.testing.assert_allclose(ours.numpy(), 1.0 - dice, rtol=1e-6)
    perfect = np.eye(2, dtype=np.float32)[truth]
    assert losses.SoftDiceLoss(from_logits=False, smooth=0.0)(truth, perfect).numpy() == pytest.approx(0.0)


def test_soft_dice_ignores_label_255_and_has_gradients():
    labels, logits = _random_case(9, ignore_fraction=0.3)
    keep = labels != 255
    full = losses.SoftDiceLoss()(labels, logits).numpy()
    kept_only = losses.SoftDiceLoss()(labels[keep][None, None], logits[keep][None, None]).numpy()
    np.testing.assert_allclose(full, kept_only, rtol=1e-5)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = losses.SoftDiceLoss()(labels, variable)
    gradient = tape.gradient(value, variable).numpy()
    assert np.isfinite(gradient).all() and np.abs(gradient).sum() > 0
    assert np.all(gradient[~keep] == 0)  # ignored pixels get no gradient


def test_losses_serialise_and_run_under_tf_function():
    labels, logits = _random_case(10, ignore_fraction=0.1)
    for loss in (losses.SparseCrossEntropyIgnore(), losses.WeightedSparseCrossEntropy([1, 2, 3, 4]),
                 losses.SoftDiceLoss(), losses.CrossEntropyPlusDice()):
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        eager = loss(labels, logits).numpy()
        graph = tf.function(lambda y, p, loss=restored: loss(y, p))(labels, logits).numpy()
        np.testing.assert_allclose(graph, eager, rtol=1e-5)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

def test_labels_beyond_num_classes_raise_value_error():
    labels, logits = _random_case(11)
    labels[0, 0, 0] = 7  # not a class and not 255
    for call in (lambda: losses.SparseCrossEntropyIgnore()(labels, logits),
                 lambda: losses.SoftDiceLoss()(labels, logits),
                 lambda: losses.MeanIoU(NUM_CLASSES).update_state(labels, logits)):
        with pytest.raises(ValueError, match=r"\[7\]"):
            call()
    with pytest.raises(ValueError, match="num_classes"):
        losses.validate_mask_values(np.array([0, 1, 5, 255]), num_classes=5)
    losses.validate_mask_values(np.array([0, 4, 255]), num_classes=5)  # all valid
    with pytest.raises(ValueError, match="mask values"):
        losses.validate_mask_values(np.array([-1, 0]), num_classes=5)


def test_mask_size_differing_from_image_raises_value_error():
    image = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match=r"mask must have the image's height and width"):
        losses.validate_segmentation_example(image, np.zeros((8, 6), np.int32), num_classes=3)
    losses.validate_segmentation_example(image, np.zeros((8, 8), np.int32), num_classes=3)
    labels, logits = _random_case(12)
    with pytest.raises(ValueError, match="y_true must be a mask"):
        losses.SparseCrossEntropyIgnore()(labels[:, :4], logits)


# ---------------------------------------------------------------------------
# PSNR and SSIM
# ---------------------------------------------------------------------------

def _image_pair(seed, shape=(3, 32, 32, 3)):
    rng = np.random.default_rng(seed)
    clean = rng.uniform(size=shape).astype(np.float32)
    # Smooth the clean image a bit so SSIM sees structure, then add noise.
    clean = (clean + np.roll(clean, 1, axis=1) + np.roll(clean, 1, axis=2)) / 3
    noisy = np.clip(clean + rng.normal(0, 0.1, size=shape), 0, 1).astype(np.float32)
    return clean, noisy


def test_psnr_equals_tf_image_psnr():
    clean, noisy = _image_pair(0)
    np.testing.assert_allclose(losses.psnr(clean, noisy).numpy(),
                               tf.image.psnr(clean, noisy, max_val=1.0).numpy(), rtol=1e-5)
    # Hand check: a constant error of 0.1 everywhere is 20 dB.
    np.testing.assert_allclose(losses.psnr(clean, clean + 0.1).numpy(), 20.0, rtol=1e-4)
    with pytest.raises(ValueError, match="same shape"):
        losses.psnr(clean, noisy[:, :16])


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 24, 40, 1)])
def test_ssim_equals_tf_image_ssim(shape):
    clean, noisy = _image_pair(1, shape)
    np.testing.assert_allclose(losses.ssim(clean, noisy).numpy(),
                               tf.image.ssim(clean, noisy, max_val=1.0).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(losses.ssim(clean, clean).numpy(), 1.0, rtol=1e-5)
