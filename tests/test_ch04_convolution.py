"""Convolution and pooling by hand (ch04_classification/convolution.py) against the libraries.

Referees: tf.nn.conv2d, keras MaxPooling2D / AveragePooling2D, Conv2D.count_params(),
scipy.signal.convolve2d (true convolution), scipy.ndimage.sobel and cv2.Scharr (edge filters), and
the lecture's hand-worked 6x6 example.
"""

import ast
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import scipy.ndimage
import scipy.signal
import tensorflow as tf

from ch04_classification import convolution

RNG_SEEDS = range(12)


def tf_conv2d(image, kernels, stride, p):
    """The reference: tf.nn.conv2d with explicit symmetric padding, on [1, H, W, C] float64."""
    image = np.asarray(image, np.float64)
    image = image[:, :, None] if image.ndim == 2 else image
    kernels = np.asarray(kernels, np.float64)
    while kernels.ndim < 4:
        kernels = kernels[..., None]
    result = tf.nn.conv2d(image[None], kernels, strides=stride,
                          padding=[[0, 0], [p, p], [p, p], [0, 0]])
    return result.numpy()[0]


@pytest.mark.parametrize("seed", RNG_SEEDS)
def test_conv2d_matches_tf_over_random_shapes_strides_and_paddings(seed):
    rng = np.random.default_rng(seed)
    f = int(rng.choice([1, 2, 3, 5]))
    channels, filters = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    stride, p = int(rng.integers(1, 4)), int(rng.integers(0, 3))
    height, width = int(rng.integers(f, 14)), int(rng.integers(f, 14))
    image = rng.normal(size=(height, width, channels))
    kernels = rng.normal(size=(f, f, channels, filters))
    ours = convolution.conv2d(image, kernels, stride=stride, padding=p)
    expected = tf_conv2d(image, kernels, stride, p)
    assert ours.shape == expected.shape == (
        convolution.output_size(height, f, p, stride), convolution.output_size(width, f, p, stride),
        filters)
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("f", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_same_padding_is_symmetric_and_equals_tf_same_at_stride_1(f, stride):
    rng = np.random.default_rng(f * 10 + stride)
    image = rng.normal(size=(11, 8, 2))
    kernels = rng.normal(size=(f, f, 2, 3))
    ours = convolution.conv2d(image, kernels, stride=stride, padding="same")
    np.testing.assert_allclose(ours, tf_conv2d(image, kernels, stride, (f - 1) // 2), atol=1e-10)
    tf_same = tf.nn.conv2d(image[None], kernels, strides=stride, padding="SAME").numpy()[0]
    assert ours.shape == tf_same.shape  # the sizes agree: ceil(n / s)
    if stride == 1:
        np.testing.assert_allclose(ours, tf_same, atol=1e-10)
    valid = convolution.conv2d(image, kernels, stride=stride, padding="valid")
    np.testing.assert_allclose(valid, tf.nn.conv2d(image[None], kernels, strides=stride,
                                                   padding="VALID").numpy()[0], atol=1e-10)


def test_kernel_shapes_give_the_documented_output_shapes():
    rng = np.random.default_rng(0)
    gray, colour = rng.normal(size=(7, 9)), rng.normal(size=(7, 9, 3))
    assert convolution.conv2d(gray, np.ones((3, 3))).shape == (5, 7)
    assert convolution.conv2d(gray, np.ones((3, 3, 1, 4))).shape == (5, 7, 4)
    assert convolution.conv2d(colour, np.ones((3, 3, 3))).shape == (5, 7)
    assert convolution.conv2d(colour, np.ones((3, 3, 3, 2)), stride=2, padding=1).shape == (4, 5, 2)
    # A 2-D single kernel equals the same kernel as a [f, f, 1, 1] bank.
    kernel = rng.normal(size=(3, 3))
    np.testing.assert_allclose(convolution.conv2d(gray, kernel),
                               convolution.conv2d(gray, kernel[:, :, None, None])[:, :, 0])


def test_true_convolution_is_scipy_convolve2d_and_differs_only_by_the_flip():
    rng = np.random.default_rng(1)
    image, kernel = rng.normal(size=(9, 12)), rng.normal(size=(3, 3))
    np.testing.assert_allclose(convolution.true_convolution(image, kernel),
                               scipy.signal.convolve2d(image, kernel, mode="valid"), atol=1e-12)
    np.testing.assert_allclose(convolution.true_convolution(image, kernel, padding="same"),
                               scipy.signal.convolve2d(image, kernel, mode="same"), atol=1e-12)
    np.testing.assert_allclose(convolution.conv2d(image, kernel),
                               scipy.signal.correlate2d(image, kernel, mode="valid"), atol=1e-12)
    sobel = convolution.edge_filter("sobel_vertical")  # antisymmetric: the flip changes the sign
    np.testing.assert_allclose(convolution.true_convolution(image, sobel),
                               -convolution.conv2d(image, sobel), atol=1e-12)
    box = np.ones((3, 3)) / 9  # symmetric: no difference
    np.testing.assert_allclose(convolution.true_convolution(image, box), convolution.conv2d(image, box))


# ---------------------------------------------------------------------------------------------
# The lecture's worked example
# ---------------------------------------------------------------------------------------------
def test_six_by_six_bright_left_dark_right_gives_a_band_of_30s():
    image = np.array([[10, 10, 10, 0, 0, 0]] * 6)
    result = convolution.conv2d(image, convolution.edge_filter("vertical"))
    np.testing.assert_array_equal(result, np.array([[0, 30, 30, 0]] * 4))
    mirrored = convolution.conv2d(image[:, ::-1], convolution.edge_filter("vertical"))
    np.testing.assert_array_equal(mirrored, np.array([[0, -30, -30, 0]] * 4))
    # The other direction of the filter sees the mirror image as a light-to-dark edge again.
    dark_to_light = convolution.edge_filter("vertical", dark_to_light=True)
    np.testing.assert_array_equal(convolution.conv2d(image[:, ::-1], dark_to_light), result)
    # The horizontal filter on the image turned by 90 degrees gives the same band, turned.
    turned = convolution.conv2d(image.T, convolution.edge_filter("horizontal"))
    np.testing.assert_array_equal(turned, result.T)
    # And it sees no horizontal edge in the original.
    np.testing.assert_array_equal(convolution.conv2d(image, convolution.edge_filter("horizontal")),
                                  np.zeros((4, 4)))


def test_sobel_and_scharr_agree_with_scipy_and_opencv():
    rng = np.random.default_rng(2)
    image = rng.uniform(size=(10, 13))
    # scipy.ndimage.sobel(axis=1) is d/dx (right minus left) with [1, 2, 1] smoothing: our vertical
    # Sobel is left minus right, so the sign flips. Compare away from the border (scipy pads).
    ours = convolution.conv2d(image, convolution.edge_filter("sobel_vertical"))
    np.testing.assert_allclose(ours, -scipy.ndimage.sobel(image, axis=1)[1:-1, 1:-1], atol=1e-12)
    ours = convolution.conv2d(image, convolution.edge_filter("sobel_horizontal"))
    np.testing.assert_allclose(ours, -scipy.ndimage.sobel(image, axis=0)[1:-1, 1:-1], atol=1e-12)
    ours = convolution.conv2d(image, convolution.edge_filter("scharr_vertical", dark_to_light=True))
    np.testing.assert_allclose(ours, cv2.Scharr(image, cv2.CV_64F, 1, 0)[1:-1, 1:-1], atol=1e-10)
    ours = convolution.conv2d(image, convolution.edge_filter("scharr_horizontal", dark_to_light=True))
    np.testing.assert_allclose(ours, cv2.Scharr(image, cv2.CV_64F, 0, 1)[1:-1, 1:-1], atol=1e-10)


def test_edge_filters_are_copies_and_named():
    kernel = convolution.edge_filter("sobel_vertical")
    kernel[0, 0] = 99
    assert convolution.edge_filter("sobel_vertical")[0, 0] == 1
    assert set(convolution.EDGE_FILTERS) == {
        "vertical", "horizontal", "sobel_vertical", "sobel_horizontal", "scharr_vertical",
        "scharr_horizontal"}
    for name, kernel in convolution.EDGE_FILTERS.items():
        assert kernel.shape == (3, 3) and kernel.sum() == 0, name  # no response to a flat image
    with pytest.raises(ValueError, match="name"):
        convolution.edge_filter("laplace")


# ---------------------------------------------------------------------------------------------
# Pooling, sizes, parameter counts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", RNG_SEEDS)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_pool2d_matches_keras_pooling_layers(seed, mode):
    rng = np.random.default_rng(seed)
    size, stride = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    image = rng.normal(size=(int(rng.integers(size, 12)), int(rng.integers(size, 12)),
                             int(rng.integers(1, 4))))
    layer = (keras.layers.MaxPooling2D if mode == "max" else keras.layers.AveragePooling2D)(
        pool_size=size, strides=stride, padding="valid")
    expected = np.asarray(layer(image[None].astype(np.float32)))[0]
    ours = convolution.pool2d(image, size, stride, mode=mode)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_pool2d_by_hand_and_2d_input():
    image = np.array([[1, 3, 2, 1], [2, 9, 1, 1], [1, 3, 2, 3], [5, 6, 1, 2]])
    np.testing.assert_array_equal(convolution.pool2d(image, 2), [[9, 2], [6, 3]])
    np.testing.assert_array_equal(convolution.pool2d(image, 2, mode="avg"), [[3.75, 1.25], [3.75, 2]])
    assert convolution.pool2d(np.zeros((5, 5, 7)), 3, 1).shape == (3, 3, 7)  # channels kept


@pytest.mark.parametrize("seed", range(20))
def test_output_size_and_parameters_match_keras(seed):
    rng = np.random.default_rng(seed)
    f, stride, channels, filters = (int(rng.integers(1, 6)), int(rng.integers(1, 4)),
                                    int(rng.integers(1, 8)), int(rng.integers(1, 9)))
    n = int(rng.integers(f, 30))
    layer = keras.layers.Conv2D(filters, f, strides=stride, padding="valid")
    output = layer(np.zeros((1, n, n, channels), np.float32))
    assert convolution.output_size(n, f, "valid", stride) == output.shape[1]
    assert convolution.conv_parameters(f, channels, filters) == layer.count_params()
    no_bias = keras.layers.Conv2D(filters, f, use_bias=False)
    no_bias.build((None, n, n, channels))
    assert convolution.conv_parameters(f, channels, filters, use_bias=False) == no_bias.count_params()


def test_output_size_by_hand():
    assert convolution.output_size(6, 3) == 4  # the lecture's 6x6 * 3x3 -> 4x4
    assert convolution.output_size(6, 3, "same") == 6
    assert convolution.output_size(7, 3, 0, 2) == 3  # 7x7 * 3x3, stride 2 -> 3x3
    assert convolution.output_size(32, 5) == 28  # LeNet-5's C1
    assert convolution.conv_parameters(5, 1, 6) == 156  # LeNet-5's C1 (LeCun et al. 1998, sec. II-B)
    assert convolution.conv_parameters(3, 3, 10) == 280  # ten 3x3x3 filters: 27 weights + 1 bias each


def test_bad_input_raises_value_error_naming_the_argument():
    image = np.zeros((6, 6, 3))
    with pytest.raises(ValueError, match="deeper than"):
        convolution.conv2d(image, np.ones((3, 3, 4)))
    with pytest.raises(ValueError, match="shallower than"):
        convolution.conv2d(image, np.ones((3, 3)))
    with pytest.raises(ValueError, match="stride"):
        convolution.conv2d(image, np.ones((3, 3, 3)), stride=0)
    with pytest.raises(ValueError, match="odd"):
        convolution.conv2d(image, np.ones((2, 2, 3)), padding="same")
    with pytest.raises(ValueError, match="padding"):
        convolution.conv2d(image, np.ones((3, 3, 3)), padding="full")
    with pytest.raises(ValueError, match="padding"):
        convolution.conv2d(image, np.ones((3, 3, 3)), padding=-1)
    with pytest.raises(ValueError, match="does not fit"):
        convolution.conv2d(np.zeros((2, 2)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="square"):
        convolution.conv2d(image, np.ones((3, 2, 3)))
    with pytest.raises(ValueError, match="image"):
        convolution.conv2d(np.zeros(5), np.ones((3, 3)))
    with pytest.raises(ValueError, match="mode"):
        convolution.pool2d(image, 2, mode="median")
    with pytest.raises(ValueError, match="size"):
        convolution.pool2d(image, 0)
    with pytest.raises(ValueError, match="stride"):
        convolution.output_size(6, 3, 0, 1.5)
    with pytest.raises(ValueError, match="filters"):
        convolution.conv_parameters(3, 3, 0)


def test_convolution_module_imports_no_tensorflow():
    source = Path(convolution.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "numpy"}, imported


# ---------------------------------------------------------------------------------------------
# A filter learned instead of designed (ch04_classification/learned_filter.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sobel_vertical", "scharr_horizontal"])
def test_gradient_descent_learns_the_designed_filter_on_real_photographs(name):
    from ch04_classification import learned_filter

    images = learned_filter.grayscale_sample_images(downsample=8)  # china.jpg, flower.jpg
    assert len(images) == 2 and images[0].shape == (54, 80)
    assert 0.0 <= min(i.min() for i in images) and max(i.max() for i in images) <= 1.0
    target = convolution.edge_filter(name)
    result = learned_filter.learn_filter(images, target, steps=300)
    assert result["initial_cosine"] < 0.5  # it starts far from the answer ...
    assert result["cosine"] >= 0.99  # ... and gradient descent finds it
    assert result["losses"][-1] < 1e-3 * result["losses"][0]
    # The learned filter's response on a photograph is the designed one's (our NumPy conv2d).
    np.testing.assert_allclose(convolution.conv2d(images[0], result["kernel"]),
                               convolution.conv2d(images[0], target), atol=0.02)


def test_learned_filter_bad_input():
    from ch04_classification import learned_filter

    assert learned_filter.cosine_similarity([1, 2], [2, 4]) == pytest.approx(1.0)
    assert learned_filter.cosine_similarity([1, 0], [0, 3]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="target_kernel"):
        learned_filter.learn_filter(np.zeros((1, 8, 8)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="images"):
        learned_filter.learn_filter(np.zeros((8, 8)), np.ones((3, 3)))
    with pytest.raises(ValueError, match="steps"):
        learned_filter.learn_filter(np.zeros((1, 8, 8)), np.ones((3, 3)), steps=0)
    with pytest.raises(ValueError, match="names"):
        learned_filter.grayscale_sample_images(["lena.png"])
    with pytest.raises(ValueError, match="downsample"):
        learned_filter.grayscale_sample_images(downsample=0)
