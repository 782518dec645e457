"""Tests of the focal loss (ch05_detection/focal_loss.py) against Keras and hand-computed values."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection.focal_loss import FocalLoss, focal_loss, sigmoid_focal_loss


def logit(p):
    return math.log(p / (1.0 - p))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    logits = rng.uniform(-6.0, 6.0, size=(4, 50, 5)).astype(np.float32)
    labels = (rng.random((4, 50, 5)) < 0.1).astype(np.float32)
    return labels, logits


def test_equals_keras_binary_focal_crossentropy_per_element(data):
    """Keras weights class 1 by alpha and class 0 by 1 - alpha: the paper's alpha_t. Keras
    averages over the last axis, so every element gets its own last axis of size 1."""
    labels, logits = data
    for alpha, gamma in ((0.25, 2.0), (0.5, 1.0), (0.9, 3.0)):
        reference = keras.losses.BinaryFocalCrossentropy(
            apply_class_balancing=True, alpha=alpha, gamma=gamma, from_logits=True,
            reduction=None)(labels[..., None], logits[..., None])
        ours = sigmoid_focal_loss(labels, logits, alpha=alpha, gamma=gamma)
        assert ours.shape == labels.shape
        np.testing.assert_allclose(ours.numpy(), np.asarray(reference), rtol=1e-4, atol=1e-6)
    # Soft labels follow the same formula.
    soft = np.random.default_rng(1).random(labels.shape).astype(np.float32)
    reference = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True,
        reduction=None)(soft[..., None], logits[..., None])
    np.testing.assert_allclose(sigmoid_focal_loss(soft, logits).numpy(), np.asarray(reference),
                               rtol=1e-4, atol=1e-6)


def test_gamma_zero_is_alpha_balanced_cross_entropy(data):
    labels, logits = data
    cross_entropy = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits).numpy()
    alpha_t = np.where(labels == 1, 0.25, 0.75)
    np.testing.assert_allclose(sigmoid_focal_loss(labels, logits, alpha=0.25, gamma=0.0).numpy(),
                               alpha_t * cross_entropy, rtol=1e-5, atol=1e-7)
    # No alpha, no gamma: Keras' plain binary cross-entropy.
    plain = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)(
        labels[..., None], logits[..., None])
    np.testing.assert_allclose(sigmoid_focal_loss(labels, logits, alpha=None, gamma=0.0).numpy(),
                               np.asarray(plain), rtol=1e-4, atol=1e-6)


def test_easy_examples_are_down_weighted_by_the_hand_computed_factor():
    """An easy negative: background with p = 0.1 for the class, so p_t = 0.9. The modulating
    factor is (1 - 0.9)^2 = 0.01 and alpha_t = 1 - 0.25 = 0.75 (Lin et al. 2017, sec. 3.2)."""
    easy_negative = float(sigmoid_focal_loss([0.0], [logit(0.1)])[0])
    cross_entropy = -math.log(0.9)
    assert easy_negative == pytest.approx(0.75 * 0.01 * cross_entropy, rel=1e-5)  # 7.90e-4
    assert easy_negative / cross_entropy == pytest.approx(0.0075, rel=1e-5)
    # An easy positive (p = 0.9): alpha_t = 0.25; a hard negative (p_t = 0.1): factor 0.81.
    easy_positive = float(sigmoid_focal_loss([1.0], [logit(0.9)])[0])
    assert easy_positive == pytest.approx(0.25 * 0.01 * cross_entropy, rel=1e-5)
    hard_negative = float(sigmoid_focal_loss([0.0], [logit(0.9)])[0])
    assert hard_negative == pytest.approx(0.75 * 0.81 * -math.log(0.1), rel=1e-5)
    # "with gamma = 2, an example classified with p_t = 0.968 would have 1000x lower loss".
    ratio = float(sigmoid_focal_loss([0.0], [logit(0.032)], alpha=None)[0]) / -math.log(0.968)
    assert 1.0 / ratio == pytest.approx(1000.0, rel=0.03)
    # p = 0.5, label 1: 0.25 * 0.5^2 * log 2; label 0: 0.75 * 0.5^2 * log 2.
    np.testing.assert_allclose(sigmoid_focal_loss([1.0, 0.0], [0.0, 0.0]).numpy(),
                               [0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)], rtol=1e-6)


def test_exact_and_finite_for_extreme_logits():
    logits = tf.constant([-100.0, 100.0, -100.0, 100.0])
    labels = tf.constant([1.0, 0.0, 0.0, 1.0])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = sigmoid_focal_loss(labels, logits)
    # Confidently wrong: (1 - p_t)^2 = 1, -log p_t = 100 (a probability would round to 0).
    np.testing.assert_allclose(loss.numpy(), [25.0, 75.0, 0.0, 0.0], rtol=1e-6, atol=1e-30)
    assert np.isfinite(tape.gradient(loss, logits).numpy()).all()


def test_sum_normalised_by_positive_count(data):
    labels, logits = data
    per_element = sigmoid_focal_loss(labels, logits).numpy()
    count = labels.sum()
    assert count > 1
    assert float(focal_loss(labels, logits)) == pytest.approx(per_element.sum() / count, rel=1e-5)
    # No positive at all: divided by 1, not 0.
    zeros = np.zeros_like(labels)
    assert float(focal_loss(zeros, logits)) == pytest.approx(
        sigmoid_focal_loss(zeros, logits).numpy().sum(), rel=1e-5)
    # Ignored anchors (weight 0) neither add loss nor count as positives.
    weights = np.ones(labels.shape[:2] + (1,), np.float32)
    weights[:, :25] = 0.0
    kept = labels[:, 25:]
    assert float(focal_loss(labels, logits, weights=weights)) == pytest.approx(
        per_element[:, 25:].sum() / max(kept.sum(), 1.0), rel=1e-5)
    assert float(focal_loss(labels, logits, num_positives=7.0)) == pytest.approx(
        per_element.sum() / 7.0, rel=1e-5)


def test_keras_loss_class_matches_function_and_serializes(tmp_path, data):
    labels, logits = data
    loss = FocalLoss()
    assert float(loss(labels, logits)) == pytest.approx(float(focal_loss(labels, logits)),
                                                        rel=1e-5)
    per_element = FocalLoss(reduction=None)(labels, logits)
    np.testing.assert_allclose(np.asarray(per_element),
                               sigmoid_focal_loss(labels, logits).numpy() / labels.sum(),
                               rtol=1e-5)
    unnormalised = FocalLoss(alpha=None, gamma=0.0, normalize=False)(labels, logits)
    assert float(unnormalised) == pytest.approx(float(tf.reduce_sum(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))), rel=1e-5)
    # Serialization: config round trip and inside a saved, compiled model.
    restored = keras.losses.deserialize(keras.losses.serialize(FocalLoss(alpha=0.5, gamma=1.5)))
    assert isinstance(restored, FocalLoss) and (restored.alpha, restored.gamma) == (0.5, 1.5)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss=FocalLoss(gamma=1.0))
    x = np.random.default_rng(2).random((8, 3)).astype(np.float32)
    y = (np.arange(16).reshape(8, 2) % 3 == 0).astype(np.float32)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0).history["loss"]
    assert np.isfinite(history).all()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, FocalLoss) and loaded.loss.gamma == 1.0
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        sigmoid_focal_loss([1.0], [0.0], alpha=1.5)
