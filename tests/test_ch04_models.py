"""Tests of the chapter-4 model zoo: each model is proven to be the real architecture.

- Parameter counts equal keras.applications (weights=None, include_top=True, 1000 classes,
  224x224x3) wherever the library has the same network; for LeNet-5, AlexNet and GoogLeNet they
  equal counts computed by hand, layer by layer, from the papers' tables (cited at each test).
- Forward passes on small inputs, `.keras` save/load round trips with identical outputs, an
  XLA-compiled tf.function, backbone strides and channels for every backbone name, the ImageNet
  weight copy (with a random keras.applications model standing in for the download), and
  EfficientNet's scaling table.

Big models are built once per session (cached) and never run at 224x224.
Run: `python -m pytest -q tests/test_ch04_models.py`.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch04_classification import models, weights as weights_module
from ch04_classification.layers import ImageNetPreprocessing

IMAGENET_SHAPE = (224, 224, 3)


def num_parameters(model):
    return int(model.count_params())


def num_trainable_parameters(model):
    return int(sum(np.prod(weight.shape) for weight in model.trainable_weights))


@functools.lru_cache(maxsize=None)
def our_imagenet_model(name, **options):
    """Our model with the keras.applications head (built once per session)."""
    return models.get_model(name, IMAGENET_SHAPE, 1000, **options)


def random_images(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=shape).astype("float32")


def assert_keras_round_trip(model, inputs, tmp_path):
    """Save to .keras, load, and check identical outputs (inference mode)."""
    expected = model(inputs, training=False)
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    actual = restored(inputs, training=False)
    tf.nest.map_structure(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, actual
    )
    return restored


# --------------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(
    "name, reference",
    [("resnet50", "ResNet50"), ("resnet101", "ResNet101"), ("resnet152", "ResNet152")],
)
def test_resnet_parameter_count_equals_keras_applications(name, reference):
    ours = our_imagenet_model(name)
    theirs = getattr(keras.applications, reference)(weights=None)
    assert num_parameters(ours) == num_parameters(theirs)
    assert num_trainable_parameters(ours) == num_trainable_parameters(theirs)
    # Same layer names with weights, in the same order (what the ImageNet weight copy relies on).
    assert [layer.name for layer in ours.layers if layer.weights] == [
        layer.name for layer in theirs.layers if layer.weights
    ]
    # The backbone endpoints of this depth exist and sit at their strides (224 / stride pixels); the
    # backbone test below builds only the cheaper backbones.
    for stride, layer_name in models.resnet_endpoint_names(name).items():
        assert tuple(ours.get_layer(layer_name).output.shape[1:3]) == (224 // stride, 224 // stride)
        assert ours.get_layer(layer_name).output.shape[-1] == models.backbone_channels(name, stride)


@pytest.mark.parametrize(
    "name, options, expected",
    [
        # torchvision's published counts (docs of torchvision.models: resnet18 11,689,512; resnet34
        # 21,797,672; resnet50 25,557,032 parameters). torchvision has no conv biases and counts
        # only trainable parameters (BN running statistics are buffers): compare trainable counts
        # of our models without bias.
        ("resnet18", {}, 11_689_512),
        ("resnet34", {}, 21_797_672),
        ("resnet50", {"use_bias": False, "stride_on_3x3": True}, 25_557_032),
    ],
)
def test_resnet_trainable_count_equals_torchvision(name, options, expected):
    model = our_imagenet_model(name, **options)
    assert num_trainable_parameters(model) == expected


def test_resnet_bias_difference_is_one_per_conv_channel():
    """keras.applications keeps a (redundant) bias in every conv: one per conv output channel."""
    with_bias = our_imagenet_model("resnet50")
    without_bias = our_imagenet_model("resnet50", use_bias=False, stride_on_3x3=True)
    conv_channels = sum(
        layer.filters for layer in with_bias.layers if isinstance(layer, keras.layers.Conv2D)
    )
    assert num_parameters(with_bias) - num_parameters(without_bias) == conv_channels


def test_basic_and_bottleneck_blocks_shapes_and_shortcuts():
    inputs = keras.Input((16, 16, 32))
    same = models.basic_block(inputs, 32, stride=1, name="same")
    down = models.basic_block(inputs, 64, stride=2, name="down")
    bottleneck = models.bottleneck_block(inputs, 16, stride=2, name="bneck")
    model = keras.Model(inputs, [same, down, bottleneck])
    assert tuple(same.shape) == (None, 16, 16, 32)
    assert tuple(down.shape) == (None, 8, 8, 64)
    assert tuple(bottleneck.shape) == (None, 8, 8, 64)
    names = {layer.name for layer in model.layers}
    assert "same_0_conv" not in names  # identity shortcut when the shape is unchanged
    assert {"down_0_conv", "bneck_0_conv"} <= names  # projection shortcut when it changes
    # Hand count of the basic block with projection, no bias: 3x3x32x64 + 3x3x64x64 + 1x1x32x64
    # weights, plus 3 batch norms x 4 x 64 (gamma, beta, moving mean, moving variance).
    down_layers = [layer for layer in model.layers if layer.name.startswith("down_")]
    assert sum(
        layer.count_params() for layer in down_layers
    ) == 9 * 32 * 64 + 9 * 64 * 64 + 32 * 64 + 3 * 4 * 64


def test_resnet_small_forward_and_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.get_model("resnet_small", (64, 64, 3), 5)
    assert 100_000 < num_parameters(model) < 1_000_000  # "a few hundred thousand"
    images = random_images((2, 64, 64, 3))
    probabilities = model(images, training=False)
    assert tuple(probabilities.shape) == (2, 5)
    np.testing.assert_allclose(np.sum(probabilities, axis=-1), 1.0, rtol=1e-5)
    assert_keras_round_trip(model, images, tmp_path)


def test_resnet_small_xla_compiled_forward_matches_eager():
    model = models.get_model("resnet_small", (64, 64, 3), 4, classifier_activation=None)
    images = tf.constant(random_images((2, 64, 64, 3)))
    compiled = tf.function(lambda x: model(x, training=False), jit_compile=True)
    np.testing.assert_allclose(
        compiled(images).numpy(), model(images, training=False).numpy(), atol=1e-4
    )


def test_resnet50_imagenet_weights_copy_gives_keras_applications_outputs(monkeypatch):
    """weights="imagenet" path, with a random keras.applications model standing in for the download:
    our network with the copied weights (and our preprocessing layer) must compute exactly what the
    library network computes on keras' own preprocess_input. This proves the same architecture,
    not only the same count."""
    keras.utils.set_random_seed(1)
    real_resnet50 = keras.applications.ResNet50
    sources = []

    def fake_resnet50(weights=None, include_top=True, **kwargs):
        assert weights == "imagenet"
        source = real_resnet50(
            weights=None, include_top=include_top, input_shape=(64, 64, 3), **kwargs
        )
        rng = np.random.default_rng(0)
        for variable in source.weights:  # random values everywhere, incl. BN moving statistics
            values = rng.normal(0.0, 0.05, size=variable.shape)
            if "variance" in variable.path:
                values = rng.uniform(0.5, 1.5, size=variable.shape)
            variable.assign(values.astype("float32"))
        sources.append(source)
        return source

    monkeypatch.setattr(keras.applications, "ResNet50", fake_resnet50)
    ours = models.get_model("resnet50", (64, 64, 3), None, include_top=False, weights="imagenet")
    assert isinstance(ours.get_layer("imagenet_preprocessing"), ImageNetPreprocessing)
    images = random_images((2, 64, 64, 3))
    expected = sources[0](
        keras.applications.resnet.preprocess_input(images * 255.0), training=False
    )
    np.testing.assert_allclose(
        ours(images, training=False).numpy(), expected.numpy(), rtol=1e-4, atol=1e-4
    )


def test_weight_copy_rejects_a_different_architecture():
    source = models.get_model("resnet_small", (32, 32, 3), 5)
    target = models.get_model("resnet_small", (32, 32, 3), 5, filters=(16, 32, 64, 64))
    with pytest.raises(ValueError, match="conv5_block1"):
        weights_module.copy_weights_by_name(source, target)


@pytest.mark.parametrize("mode", ["caffe", "tf", "torch"])
def test_imagenet_preprocessing_matches_keras_preprocess_input(mode):
    images = random_images((2, 8, 8, 3))
    expected = keras.applications.imagenet_utils.preprocess_input(images * 255.0, mode=mode)
    actual = ImageNetPreprocessing(mode)(images)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Backbones and feature pyramids
# --------------------------------------------------------------------------------------------------

# resnet101/152 differ from resnet50 only in block counts, efficientnet_b1..b7 from b0 only in
# widths and depths; their endpoints are checked on the models of the parameter-count tests instead
# of building them again here.
CHEAP_BACKBONES = tuple(
    name for name in models.BACKBONE_NAMES
    if name not in ("resnet101", "resnet152") and not (
        name.startswith("efficientnet") and name != "efficientnet_b0"
    )
)


@pytest.mark.parametrize("name", CHEAP_BACKBONES)
def test_feature_pyramid_strides_and_channels(name):
    """Every stride 2..32 of every backbone: spatial size H / stride, the documented channels."""
    pyramid = models.get_feature_pyramid(name, (None, None, 3), strides=(2, 4, 8, 16, 32))
    for height, width in ((64, 64), (96, 128)):
        outputs = pyramid(random_images((1, height, width, 3)), training=False)
        assert sorted(outputs) == sorted(f"stride_{stride}" for stride in (2, 4, 8, 16, 32))
        for stride in (2, 4, 8, 16, 32):
            assert tuple(outputs[f"stride_{stride}"].shape) == (
                1, height // stride, width // stride, models.backbone_channels(name, stride)
            )


@pytest.mark.parametrize(
    "name, output_stride",
    [("resnet_small", 8), ("resnet_small", 16), ("resnet18", 32), ("mobilenet_v2", 16)],
)
def test_backbone_output_stride_and_channels(name, output_stride):
    backbone = models.get_backbone(name, (None, None, 3), output_stride=output_stride)
    feature_map = backbone(random_images((2, 96, 128, 3)), training=False)
    channels = models.backbone_channels(name, output_stride)
    assert tuple(feature_map.shape) == (2, 96 // output_stride, 128 // output_stride, channels)
    assert backbone.output.shape[-1] == channels


def test_backbone_stride_16_is_resnet_c4_and_shares_weights_with_classifier():
    backbone = models.get_backbone("resnet18", (64, 64, 3), output_stride=16)
    assert backbone.layers[-1].name == "conv4_block2_out"  # C4 = output of conv4_x
    assert "conv5_block1_1_conv" not in {layer.name for layer in backbone.layers}


def test_backbone_return_endpoints_and_round_trip(tmp_path):
    pyramid = models.get_backbone(
        "resnet_small", (64, 64, 3), output_stride=32, return_endpoints=True
    )
    images = random_images((1, 64, 64, 3))
    outputs = pyramid(images)
    assert sorted(outputs) == ["stride_16", "stride_32", "stride_4", "stride_8"]
    assert_keras_round_trip(pyramid, images, tmp_path)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: models.get_model("resnet_9000", (64, 64, 3), 5), "name"),
        (lambda: models.get_model("resnet18", (64, 64), 5), "input_shape"),
        (lambda: models.get_model("resnet18", (64, 64, 3), 0), "num_classes"),
        (lambda: models.get_model("resnet18", (64, 64, 3), 5, weights="imagenet"), "weights"),
        (lambda: models.get_backbone("resnet18", (64, 64, 3), output_stride=12), "output_stride"),
        (lambda: models.get_backbone("lenet5", (64, 64, 3)), "name"),
        (lambda: models.get_feature_pyramid("resnet18", (64, 64, 3), strides=(3,)), "strides"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------------
# VGG, MobileNet, EfficientNet against keras.applications
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize(
    "name, reference",
    [
        ("vgg16", "VGG16"),
        ("vgg19", "VGG19"),
        ("mobilenet_v1", "MobileNet"),
        ("mobilenet_v2", "MobileNetV2"),
    ],
)
def test_parameter_count_equals_keras_applications(name, reference):
    ours = our_imagenet_model(name)
    theirs = getattr(keras.applications, reference)(weights=None)
    assert num_parameters(ours) == num_parameters(theirs)
    assert num_trainable_parameters(ours) == num_trainable_parameters(theirs)
    assert [layer.name for layer in ours.layers if layer.weights] == [
        layer.name for layer in theirs.layers if layer.weights
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, reference, size",
    [("efficientnet_b0", "EfficientNetB0", 224), ("efficientnet_b2", "EfficientNetB2", 260)],
)
def test_efficientnet_parameter_count_equals_keras_applications(name, reference, size):
    """keras.applications.EfficientNet has Rescaling + Normalization layers inside the model; the
    Normalization layer holds 7 non-trainable numbers (mean[3], variance[3], count[]) that are input
    statistics, not network parameters. Ours takes [0, 1] images and has no such layer, so:
    trainable counts are identical, and the totals differ by exactly that layer's weights.
    B2 (width 1.1, depth 1.2) also checks the compound-scaling rounding of widths and depths."""
    ours = models.get_model(name, (size, size, 3), 1000)
    theirs = getattr(keras.applications, reference)(weights=None)
    normalization_layers = [
        layer for layer in theirs.layers if isinstance(layer, keras.layers.Normalization)
    ]
    assert len(normalization_layers) == 1
    normalization_weights = normalization_layers[0].count_params()
    assert normalization_weights == 7
    assert num_trainable_parameters(ours) == num_trainable_parameters(theirs)
    assert num_parameters(ours) == num_parameters(theirs) - normalization_weights
    theirs_weighted = [
        layer.name for layer in theirs.layers if layer.weights and layer not in normalization_layers
    ]
    assert [layer.name for layer in ours.layers if layer.weights] == theirs_weighted
    # The backbone endpoints of this width/depth exist at their strides (ceil: "same" padding).
    for stride, layer_name in models.efficientnet_endpoint_names(name).items():
        expected = -(-size // stride)
        assert tuple(ours.get_layer(layer_name).output.shape[1:3]) == (expected, expected)
        assert ours.get_layer(layer_name).output.shape[-1] == models.backbone_channels(name, stride)


@pytest.mark.parametrize(
    "name, reference, input_scale",
    [
        ("mobilenet_v1", "MobileNet", 1.0),
        ("mobilenet_v2", "MobileNetV2", 1.0),
        # keras' EfficientNet rescales by 1/255, then normalizes (identity: mean 0, variance 1).
        ("efficientnet_b0", "EfficientNetB0", 255.0),
    ],
)
def test_same_function_as_keras_applications(name, reference, input_scale, tmp_path):
    """Copy the weights of a random keras.applications network into ours by name: both must
    compute the same feature map. Proves the same padding, strides, activations and wiring, not
    only the same count. Also the family's .keras round trip."""
    theirs = getattr(keras.applications, reference)(
        weights=None, include_top=False, input_shape=(64, 64, 3)
    )
    rng = np.random.default_rng(0)
    for variable in theirs.weights:
        if "normalization" in variable.path:
            continue
        values = rng.uniform(
            0.5, 1.5, variable.shape
        ) if "variance" in variable.path else rng.normal(0, 0.1, variable.shape)
        variable.assign(values.astype("float32"))
    ours = models.get_model(name, (64, 64, 3), None, include_top=False)
    weights_module.copy_weights_by_name(theirs, ours)
    images = random_images((2, 64, 64, 3))
    expected = theirs(images * input_scale, training=False).numpy()
    actual = ours(images, training=False).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    assert_keras_round_trip(ours, images, tmp_path)
    if name == "efficientnet_b0":
        # Stochastic depth: one Dropout per shape-keeping block, rate growing linearly with depth
        # (0.2 * block_index / 16), dropping whole examples (noise shape [batch, 1, 1, 1]).
        drop_layers = [layer for layer in ours.layers if layer.name.endswith("_drop")]
        assert len(drop_layers) == 16 - 7  # 16 blocks, 7 of which open a stage and change the shape
        rates = [layer.rate for layer in drop_layers]
        assert rates == sorted(rates) and rates[0] == pytest.approx(
            0.2 * 2 / 16
        ) and rates[-1] < 0.2
        assert all(layer.noise_shape == (None, 1, 1, 1) for layer in drop_layers)


def test_imagenet_weights_with_a_new_head_keep_the_head_random(monkeypatch):
    real_mobilenet_v2 = keras.applications.MobileNetV2
    sources = []

    def fake_mobilenet_v2(weights=None, include_top=True, **kwargs):
        assert weights == "imagenet" and include_top
        source = real_mobilenet_v2(
            weights=None, include_top=True, input_shape=(96, 96, 3), **kwargs
        )
        sources.append(source)
        return source

    monkeypatch.setattr(keras.applications, "MobileNetV2", fake_mobilenet_v2)
    model = models.get_model("mobilenet_v2", (96, 96, 3), 7, weights="imagenet", alpha=0.35)
    source = sources[0]
    np.testing.assert_array_equal(
        model.get_layer("Conv_1").get_weights()[0], source.get_layer("Conv_1").get_weights()[0]
    )
    # new head, not copied
    assert model.get_layer("predictions").get_weights()[0].shape == (1280, 7)
    assert model.get_layer("imagenet_preprocessing").mode == "tf"


# Published (width, depth, resolution) of B0-B7: Tan & Le 2019 (the released models' coefficients,
# from the authors' efficientnet_builder.py; the paper's Table 2 lists B0-B7 and sec. 3.3 the
# scaling rule).
PAPER_EFFICIENTNET = {
    0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260), 3: (1.2, 1.4, 300),
    4: (1.4, 1.8, 380), 5: (1.6, 2.2, 456), 6: (1.8, 2.6, 528), 7: (2.0, 3.1, 600),
}  # fmt: skip


def test_efficientnet_scaling_table_matches_paper():
    for index, (width, depth, resolution) in PAPER_EFFICIENTNET.items():
        assert models.EFFICIENTNET_SCALING[
            f"efficientnet_b{index}"
        ][:3] == (width, depth, resolution)
    # The rule behind it (sec. 3.3): alpha * beta^2 * gamma^2 ~= 2, so FLOPs grow about 2^phi.
    from ch04_classification.efficientnet import DEPTH_BASE, RESOLUTION_BASE, WIDTH_BASE

    assert (DEPTH_BASE, WIDTH_BASE, RESOLUTION_BASE) == (1.2, 1.1, 1.15)
    assert abs(DEPTH_BASE * WIDTH_BASE**2 * RESOLUTION_BASE**2 - 2.0) < 0.1
    width, depth, resolution = models.compound_scaling(1)
    assert (width, depth) == pytest.approx((1.1, 1.2)) and resolution == pytest.approx(224 * 1.15)
    # The built models use the table: B3 (width 1.2, depth 1.4) scales B0's 16-channel first stage
    # to make_divisible(16 * 1.2) = 24 channels and 1 block to ceil(1.4 * 1) = 2 blocks, at 300x300.
    from ch04_classification.efficientnet import scale_depth, scale_width

    assert (scale_width(16, 1.2), scale_depth(1, 1.4), scale_depth(4, 3.1)) == (24, 2, 13)
    assert models.backbone_channels("efficientnet_b7", 32) == 2560  # 1280 * 2.0


@pytest.mark.parametrize(
    "name, alpha, stem_layer, stem_filters, last_layer, last_filters",
    [
        ("mobilenet_v1", 0.25, "conv1", 8, "conv_pw_13", 256),  # int(32 * 0.25), int(1024 * 0.25)
        # rounded to multiples of 8; last conv kept
        ("mobilenet_v2", 0.35, "Conv1", 16, "Conv_1", 1280),
    ],
)
def test_mobilenet_width_multiplier_forward_and_round_trip(
    name, alpha, stem_layer, stem_filters, last_layer, last_filters, tmp_path
):
    model = models.get_model(name, (64, 64, 3), 4, alpha=alpha)
    assert model.get_layer(stem_layer).filters == stem_filters
    assert model.get_layer(last_layer).filters == last_filters
    images = random_images((1, 64, 64, 3))
    assert tuple(model(images).shape) == (1, 4)
    assert_keras_round_trip(model, images, tmp_path)


def test_depthwise_separable_block_is_cheaper_than_full_convolution():
    """MobileNet v1 sec. 3.1: depthwise 3x3 + pointwise 1x1 cost 9 C + C N weights, not 9 C N."""
    inputs = keras.Input((16, 16, 64))
    separable = keras.Model(
        inputs, models.depthwise_separable_block(inputs, 128, stride=2, block_id=99)
    )
    convolutions = [
        layer for layer in separable.layers if isinstance(
            layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
        )
    ]
    assert sum(layer.count_params() for layer in convolutions) == 9 * 64 + 64 * 128
    assert tuple(separable.output.shape) == (None, 8, 8, 128)


def test_inverted_residual_block_shapes_and_residual():
    inputs = keras.Input((16, 16, 24))
    kept = models.inverted_residual_block(inputs, 6, 24, 1, block_id=50)
    reduced = models.inverted_residual_block(inputs, 6, 32, 2, block_id=51)
    model = keras.Model(inputs, [kept, reduced])
    names = {layer.name for layer in model.layers}
    assert "block_50_add" in names and "block_51_add" not in names
    assert model.get_layer("block_50_expand").filters == 6 * 24  # expansion t = 6
    assert model.get_layer("block_50_project_BN").output.shape[-1] == 24
    assert tuple(reduced.shape) == (None, 8, 8, 32)


# --------------------------------------------------------------------------------------------------
# VGG: the classifier and the fully convolutional variant
# --------------------------------------------------------------------------------------------------

def test_vgg_fully_convolutional_equals_dense_head_and_accepts_any_size(tmp_path):
    keras.utils.set_random_seed(0)
    # A reduced head so the test is cheap: at 64x64 the last map is 2x2, so fc1 is a 2x2
    # convolution.
    dense = models.get_model("vgg16", (64, 64, 3), 5, classifier_activation=None, fc_units=64)
    fcn = models.get_model(
        "vgg16_fcn", (None, None, 3), 5, classifier_activation=None, fc_kernel_size=2, fc_units=64
    )
    models.dense_head_to_convolutions(dense, fcn)
    images = random_images((1, 64, 64, 3))
    class_map = fcn(images, training=False)  # [1, 1, 1, 5]
    assert tuple(class_map.shape) == (1, 1, 1, 5)
    np.testing.assert_allclose(
        class_map.numpy()[:, 0, 0], dense(images, training=False).numpy(), rtol=1e-4, atol=1e-4
    )
    bigger = fcn(random_images((1, 128, 96, 3)), training=False)
    assert tuple(bigger.shape) == (1, 128 // 32 - 1, 96 // 32 - 1, 5)  # a map of class scores
    assert_keras_round_trip(fcn, images, tmp_path)


@pytest.mark.slow
def test_vgg_fcn_parameter_count_equals_classifier():
    """The conv head holds exactly the dense head's numbers (7x7x512x4096 = 25088x4096)."""
    fcn = models.get_model("vgg16_fcn", (None, None, 3), 1000)
    assert num_parameters(fcn) == num_parameters(our_imagenet_model("vgg16"))


# --------------------------------------------------------------------------------------------------
# LeNet-5, AlexNet, GoogLeNet against the papers' tables
# --------------------------------------------------------------------------------------------------

def test_lenet5_parameter_counts_match_lecun_1998():
    """LeCun et al. 1998, sec. II-B: C1 156, S2 12, C3 1,516, S4 32, C5 48,120, F6 10,164
    trainable parameters; "60,000 trainable free parameters" in all. Output: 10 RBF units x 84
    fixed parameters."""
    model = models.get_model("lenet5", (32, 32, 1), 10)
    per_layer = {layer.name: layer.count_params() for layer in model.layers if layer.weights}
    # C3 from Table I: 6 maps see 3 inputs, 9 maps see 4, 1 map sees all 6
    c3_by_hand = 6 * (3 * 25 + 1) + 6 * (4 * 25 + 1) + 3 * (4 * 25 + 1) + 1 * (6 * 25 + 1)
    expected = {
        "c1": 6 * (5 * 5 * 1 + 1),
        "s2": 6 * 2,  # one coefficient and one bias per map
        "c3": c3_by_hand,
        "s4": 16 * 2,
        "c5": 120 * (5 * 5 * 16 + 1),
        "f6": 84 * (120 + 1),
        "rbf_output": 84 * 10,
    }
    assert expected["c3"] == 1516
    assert per_layer == expected
    assert num_trainable_parameters(model) == 60_000


def test_lenet5_forward_mnist_size_and_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.get_model("lenet5", (28, 28, 1), 10)  # centred in a 32x32 field, as in the paper
    images = random_images((3, 28, 28, 1))
    probabilities = model(images)
    assert tuple(probabilities.shape) == (3, 10)
    np.testing.assert_allclose(np.sum(probabilities, axis=-1), 1.0, rtol=1e-5)
    assert_keras_round_trip(model, images, tmp_path)
    modern = models.get_model("lenet5_modern", (32, 32, 3), 10)
    # Hand count: 6*(5*5*3+1) + 16*(5*5*6+1) + 120*(400+1) + 84*(120+1) + 10*(84+1)
    assert num_parameters(modern) == 6 * 76 + 16 * 151 + 120 * 401 + 84 * 121 + 10 * 85
    assert_keras_round_trip(modern, random_images((2, 32, 32, 3)), tmp_path)


def test_lenet_c3_connection_table_matches_a_masked_convolution():
    """ConnectionTableConv2D = a full convolution whose kernel is zero outside Table I's links."""
    from ch04_classification.layers import LENET_C3_CONNECTIONS, ConnectionTableConv2D

    layer = ConnectionTableConv2D()
    inputs = random_images((2, 14, 14, 6))
    outputs = layer(inputs).numpy()
    full_kernel = np.zeros((5, 5, 6, 16), "float32")
    for output_index, (kernel, input_indices) in enumerate(
        zip(layer.kernels, LENET_C3_CONNECTIONS)
    ):
        full_kernel[:, :, list(input_indices), output_index] = kernel.numpy()[..., 0]
    expected = tf.nn.conv2d(inputs, full_kernel, 1, "VALID").numpy() + layer.bias.numpy()
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_alexnet_parameter_count_matches_krizhevsky_2012():
    """Krizhevsky et al. 2012, sec. 3.5 / Fig. 2, single tower (every layer sees all maps of the
    previous one): conv1 96@11x11x3, conv2 256@5x5x96, conv3 384@3x3x256, conv4 384@3x3x384,
    conv5 256@3x3x384, fc6 4096 on 6x6x256, fc7 4096, fc8 1000, each with biases: 62,378,344
    ("60 million parameters")."""
    model = models.get_model("alexnet", (227, 227, 3), 1000)
    by_hand = {
        "conv1": 11 * 11 * 3 * 96 + 96,
        "conv2": 5 * 5 * 96 * 256 + 256,
        "conv3": 3 * 3 * 256 * 384 + 384,
        "conv4": 3 * 3 * 384 * 384 + 384,
        "conv5": 3 * 3 * 384 * 256 + 256,
        "fc6": 6 * 6 * 256 * 4096 + 4096,
        "fc7": 4096 * 4096 + 4096,
        "predictions": 4096 * 1000 + 1000,
    }
    assert {layer.name: layer.count_params() for layer in model.layers if layer.weights} == by_hand
    assert num_parameters(model) == sum(by_hand.values()) == 62_378_344
    assert tuple(model.get_layer("conv1").output.shape) == (None, 55, 55, 96)  # as in Fig. 2


def test_alexnet_small_forward_and_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = models.get_model("alexnet", (67, 67, 3), 3)  # smallest input with a 1x1 pool5
    assert isinstance(model.get_layer("norm1"), models.LocalResponseNormalization)
    images = random_images((2, 67, 67, 3))
    assert tuple(model(images, training=False).shape) == (2, 3)
    assert_keras_round_trip(model, images, tmp_path)


def test_local_response_normalization_under_xla():
    layer = models.LocalResponseNormalization()
    inputs = tf.constant(
        np.random.default_rng(1).uniform(-30, 30, size=(2, 7, 7, 16)).astype("float32")
    )
    compiled = tf.function(layer, jit_compile=True)
    np.testing.assert_allclose(compiled(inputs).numpy(), layer(inputs).numpy(), rtol=1e-5)


def test_local_response_normalization_matches_tf_op():
    """Paper (sec. 3.3): k=2, n=5, alpha=1e-4, beta=0.75, sum over n adjacent maps. TF's op
    sums over depth_radius on each side, so depth_radius = n // 2 = 2, bias = k, and alpha and
    beta are unchanged."""
    layer = models.LocalResponseNormalization()
    assert (layer.depth, layer.bias, layer.alpha, layer.beta) == (5, 2.0, 1e-4, 0.75)
    # Large activations, so that the normalization really changes them.
    inputs = np.random.default_rng(0).uniform(-60, 60, size=(2, 5, 5, 12)).astype("float32")
    expected = tf.nn.local_response_normalization(
        inputs, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75
    )
    np.testing.assert_allclose(layer(inputs).numpy(), expected.numpy(), rtol=1e-5)
    # The neighbouring channels change the result (not just a division by k^beta).
    assert np.abs(expected.numpy() - inputs / 2.0**0.75).max() > 1e-2
    restored = models.LocalResponseNormalization.from_config(
        models.LocalResponseNormalization(depth=3).get_config()
    )
    expected_3 = tf.nn.local_response_normalization(
        inputs, depth_radius=1, bias=2.0, alpha=1e-4, beta=0.75
    )
    np.testing.assert_allclose(restored(inputs).numpy(), expected_3.numpy(), rtol=1e-5)


# Szegedy et al. 2015, Table 1: (input channels, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool
# proj) and the "params" column (thousands), which rounds and sums to about 6.8 M.
GOOGLENET_TABLE_1 = {
    "3a": ((192, 64, 96, 128, 16, 32, 32), 159),
    "3b": ((256, 128, 128, 192, 32, 96, 64), 380),
    "4a": ((480, 192, 96, 208, 16, 48, 64), 364),
    "4b": ((512, 160, 112, 224, 24, 64, 64), 437),
    "4c": ((512, 128, 128, 256, 24, 64, 64), 463),
    "4d": ((512, 112, 144, 288, 32, 64, 64), 580),
    "4e": ((528, 256, 160, 320, 32, 128, 128), 840),
    "5a": ((832, 256, 160, 320, 32, 128, 128), 1072),
    "5b": ((832, 384, 192, 384, 48, 128, 128), 1388),
}
GOOGLENET_TABLE_1_OTHER_PARAMS_K = {"conv1": 2.7, "conv2": 112, "linear": 1000}


def _inception_parameters_by_hand(channels, n1x1, r3, n3, r5, n5, pool_projection):
    weights = (
        channels * n1x1  # 1x1 branch
        + channels * r3 + 3 * 3 * r3 * n3  # 1x1 reduce -> 3x3
        + channels * r5 + 5 * 5 * r5 * n5  # 1x1 reduce -> 5x5
        + channels * pool_projection  # max pool -> 1x1
    )
    return weights + (n1x1 + r3 + n3 + r5 + n5 + pool_projection)  # + biases


@pytest.mark.slow
def test_googlenet_parameter_count_matches_szegedy_2015_table_1():
    model = models.get_model("googlenet", IMAGENET_SHAPE, 1000)
    with_aux = models.get_model("googlenet", IMAGENET_SHAPE, 1000, aux_classifiers=True)
    # Each auxiliary head (sec. 5): 1x1x128 conv, 1024-unit dense on 4x4x128, 1000-way classifier;
    # aux1 sits on 4a (512 channels), aux2 on 4d (528 channels).
    aux_by_hand = sum(
        (channels * 128 + 128) + (4 * 4 * 128 * 1024 + 1024) + (1024 * 1000 + 1000)
        for channels in (512, 528)
    )
    assert num_parameters(with_aux) - num_parameters(model) == aux_by_hand
    total_by_hand = (
        (7 * 7 * 3 * 64 + 64)  # conv1 7x7/2
        + (64 * 64 + 64)  # conv2 1x1 reduce
        + (3 * 3 * 64 * 192 + 192)  # conv2 3x3
        + (1024 * 1000 + 1000)  # linear
    )
    for module, (filters, table_k) in GOOGLENET_TABLE_1.items():
        by_hand = _inception_parameters_by_hand(*filters)
        prefix = f"inception_{module}_"
        ours = sum(layer.count_params() for layer in model.layers if layer.name.startswith(prefix))
        assert ours == by_hand
        assert abs(by_hand / 1000 - table_k) / table_k < 0.11  # the table's rounded column
        total_by_hand += by_hand
    assert num_parameters(model) == total_by_hand == 6_998_552
    table_total = sum(k for _, k in GOOGLENET_TABLE_1.values()) + sum(
        GOOGLENET_TABLE_1_OTHER_PARAMS_K.values()
    )
    assert abs(table_total - 6797.7) < 0.1
    assert abs(total_by_hand / 1000 - table_total) / table_total < 0.05  # "about 6.8 M"


def test_googlenet_auxiliary_losses_weighted_0_3_and_inference_model(tmp_path):
    keras.utils.set_random_seed(0)
    num_classes = 4
    train_model = models.get_model("googlenet", (96, 96, 3), num_classes, aux_classifiers=True)
    assert sorted(train_model.output) == ["aux1_predictions", "aux2_predictions", "predictions"]
    train_model.compile(
        optimizer="sgd",
        loss={key: "sparse_categorical_crossentropy" for key in models.GOOGLENET_LOSS_WEIGHTS},
        loss_weights=models.GOOGLENET_LOSS_WEIGHTS,
        # a tiny batch: tracing/compiling the step would cost more than running it
        run_eagerly=True,
    )
    images = random_images((4, 96, 96, 3))
    labels = np.array([0, 1, 2, 3], "int32")
    targets = {key: labels for key in models.GOOGLENET_LOSS_WEIGHTS}
    total = train_model.evaluate(images, targets, verbose=0, return_dict=True)["loss"]
    outputs = train_model(images, training=False)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy()
    expected = (
        float(cross_entropy(labels, outputs["predictions"]))
        + 0.3 * float(cross_entropy(labels, outputs["aux1_predictions"]))
        + 0.3 * float(cross_entropy(labels, outputs["aux2_predictions"]))
    )
    assert total == pytest.approx(expected, rel=1e-4)
    logs = train_model.train_on_batch(images, targets, return_dict=True)
    assert np.isfinite(logs["loss"])

    inference = models.googlenet_inference_model(train_model)
    assert not [layer for layer in inference.layers if layer.name.startswith("aux")]
    np.testing.assert_allclose(
        inference(
            images, training=False
        ).numpy(), train_model(images, training=False)["predictions"].numpy(), atol=1e-6
    )
    assert_keras_round_trip(inference, images, tmp_path)


def test_inception_module_output_depth_and_bottleneck_savings():
    inputs = keras.Input((28, 28, 192))
    module = keras.Model(inputs, models.inception_module(inputs, 64, 96, 128, 16, 32, 32, name="m"))
    assert tuple(module.output.shape) == (None, 28, 28, 64 + 128 + 32 + 32)  # 256 for inception 3a
    # Without the 1x1 reductions the 3x3 and 5x5 branches would need 192*128*9 + 192*32*25 weights.
    branch_names = ("m_3x3_reduce", "m_3x3", "m_5x5_reduce", "m_5x5")
    reduced = sum(module.get_layer(layer_name).count_params() for layer_name in branch_names)
    assert reduced < (192 * 128 * 9 + 192 * 32 * 25) / 2


@pytest.mark.parametrize("name, application", [("mobilenet_v2", "MobileNetV2"), ("vgg16", "VGG16"),
                                               ("efficientnet_b0", "EfficientNetB0")])
@pytest.mark.parametrize("pooling", [None, "avg", "max"])
def test_headless_pooling_matches_keras_applications(name, application, pooling):
    ours = models.get_model(name, (64, 64, 3), num_classes=None, include_top=False, pooling=pooling)
    reference = getattr(keras.applications, application)(
        include_top=False, weights=None, input_shape=(64, 64, 3), pooling=pooling)
    assert ours.output.shape == reference.output.shape
    with pytest.raises(ValueError, match="pooling"):
        models.get_model(name, (64, 64, 3), num_classes=None, include_top=False, pooling="mean")
