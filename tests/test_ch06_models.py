"""Chapter 6 models: transposed convolution by hand vs Keras, autoencoder, FCN-8s, U-Net.

Every model: output shape on a small input, `.keras` round trip with identical
outputs, the same outputs under `tf.function`, and a clear ValueError on input
sizes it cannot take.
"""

import itertools

import numpy as np
import pytest
import keras
import tensorflow as tf

from ch06_segmentation import models


# ---------------------------------------------------------------------------
# Transposed convolution by hand
# ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "stride,kernel_size,padding",
    list(itertools.product((1, 2, 3), (2, 3, 4), ("valid", "same"))))
def test_transposed_conv_by_hand_equals_keras(stride, kernel_size, padding):
    rng = np.random.default_rng(stride * 100 + kernel_size * 10 + (padding == "same"))
    inputs = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)  # non-square, 3 input channels
    layer = keras.layers.Conv2DTranspose(2, kernel_size, strides=stride, padding=padding)
    layer.build(inputs.shape)
    # Independent random weights, put into the Keras layer too.
    kernel = rng.normal(size=layer.kernel.shape).astype(np.float32)  # [kh, kw, out, in]
    bias = rng.normal(size=(2,)).astype(np.float32)
    layer.set_weights([kernel, bias])
    expected = layer(inputs).numpy()

    ours = models.transposed_conv2d_by_hand(inputs, kernel, strides=stride, padding=padding, bias=bias)
    assert ours.shape == expected.shape
    assert ours.shape[1] == models.transposed_conv_output_size(4, kernel_size, stride, padding)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_transposed_conv_hand_example():
    # One input value 2 at (0, 0) and 3 at (0, 1), kernel of ones 2x2, stride 1:
    # the two scaled kernel copies overlap in the middle column (2 + 3).
    inputs = np.array([[[[2.0], [3.0]]]])  # [1, 1, 2, 1]
    kernel = np.ones((2, 2, 1, 1))
    out = models.transposed_conv2d_by_hand(inputs, kernel, strides=1, padding="valid")
    np.testing.assert_allclose(out[0, :, :, 0], [[2, 5, 3], [2, 5, 3]])
    # Stride 3 > kernel 2: gaps of zeros between the copies (and after the last).
    out = models.transposed_conv2d_by_hand(inputs, kernel, strides=3, padding="valid")
    np.testing.assert_allclose(out[0, :, :, 0], [[2, 2, 0, 3, 3, 0], [2, 2, 0, 3, 3, 0], [0] * 6])


def test_transposed_conv_by_hand_rejects_bad_arguments():
    with pytest.raises(ValueError, match="padding"):
        models.transposed_conv2d_by_hand(np.zeros((1, 2, 2, 1)), np.zeros((2, 2, 1, 1)), padding="full")
    with pytest.raises(ValueError, match="kernel"):
        models.transposed_conv2d_by_hand(np.zeros((1, 2, 2, 3)), np.zeros((2, 2, 1, 1)))


def test_bilinear_initializer_upsamples_a_constant_and_a_ramp():
    layer = keras.layers.Conv2DTranspose(
        1, 4, strides=2, padding="same", use_bias=False,
        kernel_initializer=models.BilinearUpsampleInitializer())
    ramp = np.arange(6, dtype=np.float32)[None, None, :, None] * np.ones((1, 6, 1, 1), np.float32)
    out = layer(ramp).numpy()[0, :, :, 0]  # [12, 12]
    # Away from the border, bilinear 2x upsampling of a ramp is a ramp with half the step.
    np.testing.assert_allclose(np.diff(out[5, 2:10]), 0.5, atol=1e-6)
    constant = layer(np.ones((1, 6, 6, 1), np.float32)).numpy()[0, 2:10, 2:10, 0]
    np.testing.assert_allclose(constant, 1.0, atol=1e-6)


# ---------------------------------------------------------------------------
# Common model checks
# ---------------------------------------------------------------------------

def _round_trip_and_tf_function(model, inputs, tmp_path):
    expected = model(inputs, training=False).numpy()
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_array_equal(restored(inputs, training=False).numpy(), expected)
    compiled = tf.function(lambda x: model(x, training=False))
    np.testing.assert_allclose(compiled(tf.constant(inputs)).numpy(), expected, rtol=1e-5, atol=1e-5)
    return expected


def test_denoising_autoencoder_shapes_range_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.build_denoising_autoencoder((16, 16, 3), filters=(4, 8), bottleneck_filters=8)
    inputs = np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype(np.float32)
    outputs = _round_trip_and_tf_function(model, inputs, tmp_path)
    assert outputs.shape == (2, 16, 16, 3)
    assert outputs.min() >= 0.0 and outputs.max() <= 1.0
    # The bottleneck really is smaller: 1/4 of the side.
    assert model.get_layer("bottleneck_relu").output.shape[1:3] == (4, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        models.build_denoising_autoencoder((18, 16, 3), filters=(4, 8))


@pytest.mark.parametrize("depth,base_filters,size", [(2, 4, 16), (3, 4, (24, 16))])
def test_unet_forward_round_trip(depth, base_filters, size, tmp_path):
    keras.utils.set_random_seed(1)
    height, width = (size, size) if isinstance(size, int) else size
    model = models.build_unet((height, width, 3), num_classes=4, depth=depth, base_filters=base_filters)
    inputs = np.random.default_rng(1).uniform(size=(2, height, width, 3)).astype(np.float32)
    outputs = _round_trip_and_tf_function(model, inputs, tmp_path)
    assert outputs.shape == (2, height, width, 4)
    # Width doubles per level; the bottleneck sits at 1/2**depth.
    bottleneck = model.get_layer("bottleneck_relu2").output
    assert bottleneck.shape[1:] == (height // 2 ** depth, width // 2 ** depth, base_filters * 2 ** depth)
    assert len([layer for layer in model.layers if isinstance(layer, keras.layers.Concatenate)]) == depth


def test_unet_skips_change_the_output():
    # The skip concatenation is real: zeroing the deepest skip's weights in the
    # decoder conv changes the output.
    keras.utils.set_random_seed(2)
    model = models.build_unet((16, 16, 1), num_classes=2, depth=2, base_filters=4)
    inputs = np.random.default_rng(2).uniform(size=(1, 16, 16, 1)).astype(np.float32)
    before = model(inputs).numpy()
    conv = model.get_layer("up0_conv1")
    kernel = conv.kernel.numpy()
    kernel[:, :, :4, :] = 0.0  # the first 4 input channels come from the skip (down0)
    conv.kernel.assign(kernel)
    assert not np.allclose(model(inputs).numpy(), before)


@pytest.mark.parametrize("shape,match", [((30, 32, 3), "divisible by 8"), ((32, 20, 3), "width=20"),
                                         ((32, 32), "height, width, channels")])
def test_unet_rejects_input_sizes_it_cannot_take(shape, match):
    with pytest.raises(ValueError, match=match):
        models.build_unet(shape, num_classes=3, depth=3, base_filters=4)


def test_unet_rejects_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        models.build_unet((32, 32, 3), depth=0)


def test_fcn8s_small_backbone_forward_round_trip(tmp_path):
    keras.utils.set_random_seed(3)
    model = models.build_fcn8s((64, 64, 3), num_classes=5, backbone="resnet_small", head_filters=16)
    inputs = np.random.default_rng(3).uniform(size=(2, 64, 64, 3)).astype(np.float32)
    outputs = _round_trip_and_tf_function(model, inputs, tmp_path)
    assert outputs.shape == (2, 64, 64, 5)
    # The three score maps fused at strides 32 -> 16 -> 8.
    assert model.get_layer("score_fr").output.shape[1:3] == (2, 2)
    assert model.get_layer("fuse_pool4").output.shape[1:3] == (4, 4)
    assert model.get_layer("fuse_pool3").output.shape[1:3] == (8, 8)
    # The paper's final 8x upsampling is fixed bilinear, not learned.
    assert not model.get_layer("upscore8").trainable


def test_fcn8s_skip_layers_start_at_zero_then_matter():
    keras.utils.set_random_seed(4)
    model = models.build_fcn8s((32, 32, 3), num_classes=3, backbone="resnet_small", head_filters=8)
    inputs = np.random.default_rng(4).uniform(size=(1, 32, 32, 3)).astype(np.float32)
    assert np.all(model.get_layer("score_pool3").kernel.numpy() == 0)
    before = model(inputs).numpy()
    layer = model.get_layer("score_pool3")
    layer.kernel.assign(np.ones(layer.kernel.shape, np.float32))
    assert not np.allclose(model(inputs).numpy(), before)


def test_fcn8s_vgg16_follows_the_paper(tmp_path):
    keras.utils.set_random_seed(5)
    # Small input and head so it runs on CPU; the taps are VGG-16's pool3/4/5.
    model = models.get_model("fcn8s_vgg16", (32, 32, 3), num_classes=3, head_filters=8)
    names = {layer.name for layer in model.layers}
    assert {"block3_pool", "block4_pool", "block5_pool", "block5_conv3"} <= names
    assert model.get_layer("score_pool3").input.shape[-1] == 256  # pool3 of VGG-16
    assert model.get_layer("score_pool4").input.shape[-1] == 512  # pool4
    inputs = np.random.default_rng(5).uniform(size=(1, 32, 32, 3)).astype(np.float32)
    outputs = _round_trip_and_tf_function(model, inputs, tmp_path)
    assert outputs.shape == (1, 32, 32, 3)


def test_fcn8s_rejects_input_not_divisible_by_32():
    with pytest.raises(ValueError, match="divisible by 32"):
        models.build_fcn8s((48, 64, 3), num_classes=3)


def test_get_model_registry():
    assert models.get_model("unet", (16, 16, 3), 2, depth=2, base_filters=4).output.shape[-1] == 2
    with pytest.raises(ValueError, match="model name"):
        models.get_model("segnet", (16, 16, 3), 2)
