"""Tests for ch04_classification/tta.py: test-time augmentation over flips and scales.

References used (independent of the code under test): views computed by hand in NumPy (a
mirrored array; a centred zoom as separable bilinear interpolation matrices with the grey frame
written out), a linear softmax classifier evaluated in NumPy, ``model.predict`` for the plain
prediction, and ``tf.image.resize`` for an exact 2x downsampling.

Run: python -m pytest -q tests/test_ch04_tta.py   (a few seconds on 2 CPU cores)
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch04_classification import tta

SIZE, CHANNELS, CLASSES = 4, 3, 3


def linear_classifier(size=SIZE, activation="softmax", seed=0):
    """softmax(flatten(image) @ W + b) with fixed random W, b: computable by hand."""
    inputs = keras.Input((size, size, CHANNELS))
    outputs = keras.layers.Dense(CLASSES, activation=activation)(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    weights = rng.normal(0.0, 2.0, (size * size * CHANNELS, CLASSES))
    weights = (weights - weights.mean(axis=0)).astype(np.float32)  # no class wins on grey alone
    bias = rng.normal(0.0, 0.1, CLASSES).astype(np.float32)
    model.layers[-1].set_weights([weights, bias])
    return model, weights, bias


def zoom_matrix(size, scale):
    """[size, size] matrix R with zoomed = R @ column, and the mask of rows inside the image.

    Output pixel k has its centre at (k + 0.5) / size; magnifying by ``scale`` about the centre
    means it reads the input at u = 0.5 + ((k + 0.5) / size - 0.5) / scale (normalized), i.e.
    at pixel-centre index u * size - 0.5, bilinearly, the edge pixels extending half a pixel.
    Outside [0, 1] it reads the grey frame.
    """
    matrix = np.zeros((size, size))
    inside = np.zeros(size, bool)
    for k in range(size):
        u = 0.5 + ((k + 0.5) / size - 0.5) / scale
        inside[k] = 0.0 <= u <= 1.0
        position = min(max(u * size - 0.5, 0.0), size - 1.0)
        low = int(np.floor(position))
        high = min(low + 1, size - 1)
        matrix[k, low] += 1.0 - (position - low)
        matrix[k, high] += position - low
    return matrix, inside


def view_by_hand(images, scale, flipped, fill=0.5):
    matrix, inside = zoom_matrix(images.shape[1], scale)
    zoomed = np.einsum("ij,bjkc,lk->bilc", matrix, images, matrix)  # rows, then columns
    frame = inside[:, None] & inside[None, :]
    zoomed = np.where(frame[None, :, :, None], zoomed, fill)
    return zoomed[:, :, ::-1] if flipped else zoomed


def softmax(logits):
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).uniform(0.0, 1.0, (10, SIZE, SIZE, CHANNELS)).astype(np.float32)


def test_tta_is_the_mean_softmax_over_views_computed_by_hand(images):
    model, weights, bias = linear_classifier()
    scales = (0.5, 1.0, 2.0)
    views = [view_by_hand(images, s, f) for s in scales for f in (False, True)]
    # Our views are the hand-made ones (in the documented order) ...
    for (name, ours), expected in zip(tta.tta_views(images, True, scales), views):
        np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, err_msg=name)
    per_view = [softmax(v.reshape(len(images), -1) @ weights + bias) for v in views]
    expected = np.mean(per_view, axis=0)
    result = tta.predict_tta(model, images, flips=True, scales=scales, batch_size=4)
    np.testing.assert_allclose(result, expected, atol=1e-5)
    np.testing.assert_allclose(result.sum(axis=-1), 1.0, atol=1e-6)
    # ... and the averaging matters: every view alone predicts something else.
    for probabilities in per_view:
        assert np.abs(probabilities - expected).max() > 0.05
    # Flips only, and logits in: softmax before averaging.
    logit_model, _, _ = linear_classifier(activation=None)
    flip_only = tta.predict_tta(logit_model, images, flips=True, scales=(1.0,), from_logits=True)
    np.testing.assert_allclose(flip_only, (per_view[2] + per_view[3]) / 2, atol=1e-5)


def test_identity_tta_is_model_predict(images):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, CHANNELS))
    x = keras.layers.Conv2D(5, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Dense(CLASSES, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    expected = model.predict(images, verbose=0)
    np.testing.assert_allclose(tta.predict_tta(model, images, flips=False, scales=(1.0,),
                                               batch_size=3), expected, atol=1e-6)
    # Images of twice the model's size: scale 1 resizes them (2 x 2 block means).
    large = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
    large = large + np.random.default_rng(2).normal(0, 0.01, large.shape).astype(np.float32)
    resized = tf.image.resize(large, (SIZE, SIZE), method="bilinear").numpy()
    np.testing.assert_allclose(tta.predict_tta(model, large, flips=False, scales=(1.0,)),
                               model.predict(resized, verbose=0), atol=1e-5)


def test_evaluate_tta_with_and_without(images):
    model, _, _ = linear_classifier()
    scales = (0.5, 1.0, 2.0)
    with_tta = tta.predict_tta(model, images, scales=scales).argmax(axis=-1)
    plain = model.predict(images, verbose=0).argmax(axis=-1)
    assert (with_tta != plain).any(), "pick data where TTA changes some answers"
    labels = with_tta.astype(np.int32)  # TTA right everywhere, the plain model not
    expected = {"accuracy": float(np.mean(plain == labels)), "tta_accuracy": 1.0,
                "num_examples": len(images), "num_views": 6, "scales": list(scales), "flips": True}
    unbatched = tf.data.Dataset.from_tensor_slices((images, labels))
    dicts = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(4)
    for data, extra in (((images, labels), {}), (images, {"labels": labels}),
                        (unbatched, {}), (unbatched.batch(3), {}), (dicts, {})):
        assert tta.evaluate_tta(model, data, scales=scales, batch_size=4, **extra) == expected
    one_hot = np.eye(CLASSES, dtype=np.float32)[labels]
    assert tta.evaluate_tta(model, (images, one_hot), scales=scales) == expected
    # Without scale 1 among the views, the plain accuracy is still the unzoomed image's.
    result = tta.evaluate_tta(model, (images, labels), flips=False, scales=(0.5, 2.0))
    assert result["accuracy"] == expected["accuracy"] and result["num_views"] == 2


def test_bad_arguments_raise_value_error(images):
    model, _, _ = linear_classifier()
    cases = [
        lambda: tta.predict_tta(model, images, scales=()),
        lambda: tta.predict_tta(model, images, scales=(1.0, -0.5)),
        lambda: tta.predict_tta(model, images[0]),
        lambda: tta.predict_tta(model, images, batch_size=0),
        lambda: tta.evaluate_tta(model, images),
        lambda: tta.evaluate_tta(model, (images, np.zeros(3))),
        lambda: tta.evaluate_tta(model, tf.data.Dataset.from_tensor_slices({"image": images})),
        lambda: tta.evaluate_tta(model, tf.data.Dataset.from_tensor_slices(images), labels=[0]),
    ]
    for case in cases:
        with pytest.raises(ValueError):
            case()
