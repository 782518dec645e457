"""MobileNet v1 and MobileNet v2: convolutional networks for phones.

What this file teaches:
- MobileNet v1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
  Vision Applications", 2017): a standard KxK convolution is factorized into a *depthwise* KxK
  convolution (one filter per input channel) and a *pointwise* 1x1 convolution; cost drops by about
  1/N + 1/K^2 (sec. 3.1). The width multiplier alpha thins every layer (sec. 3.3); Table 1 gives
  the 28-layer body.
- MobileNet v2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR
  2018): blocks expand a thin bottleneck by t=6 with a 1x1 conv, filter it depthwise, and project it
  back with a *linear* 1x1 conv (no ReLU, which would destroy information in a low-dimensional
  space, sec. 3.2); the residual connects the thin bottlenecks ("inverted residual", sec. 3.3).
  Table 2 gives the layout.

Layer names, padding and batch-norm settings follow keras.applications.MobileNet/MobileNetV2, so the
parameter counts are identical and their ImageNet weights can be copied by name. Stride-2 depthwise
convolutions pad explicitly (one row/column at the bottom/right for even sizes) like TF's original
checkpoints, then convolve "valid".
"""

import keras

from ch04_classification._common import (
    check_input_shape,
    check_num_classes,
    check_weights,
    global_pooling,
    image_input,
)
from ch04_classification.weights import load_imagenet_weights

# MobileNet v1 after the stem (Table 1): (pointwise filters, depthwise stride) per separable block.
MOBILENET_V1_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip

# MobileNet v2 (Table 2): (expansion t, output channels c, repeats n, first stride s).
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)  # fmt: skip
V2_BN = {"epsilon": 1e-3, "momentum": 0.999}  # TF-slim settings of the released checkpoints


def make_divisible(value, divisor=8):
    """Round a channel count to a multiple of `divisor` (>= divisor), never down by more than 10%.

    Used by MobileNet v2 and EfficientNet so widths suit the hardware after multiplying by alpha.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def pad_for_stride_2(x, kernel_size, name):
    """Zero padding so a "valid" stride-2 convolution matches TF-slim's "same" output size.

    Even sizes get (k//2 - 1) before and k//2 after; odd (or unknown) sizes k//2 on both sides.
    """
    half = kernel_size // 2
    padding = []
    for size in x.shape[1:3]:
        adjust = 1 if size is None else 1 - size % 2
        padding.append((half - adjust, half))
    return keras.layers.ZeroPadding2D(tuple(padding), name=name)(x)


def depthwise_separable_block(x, pointwise_filters, stride=1, depth_multiplier=1, block_id=1):
    """MobileNet v1 block (Fig. 3): depthwise 3x3 -> BN -> ReLU6 -> pointwise 1x1 -> BN -> ReLU6.

    [b, H, W, C] -> [b, H/stride, W/stride, pointwise_filters].
    """
    if stride == 1:
        padding = "same"
    else:
        x = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name=f"conv_pad_{block_id}")(x)
        padding = "valid"
    x = keras.layers.DepthwiseConv2D(
        3, strides=stride, padding=padding, depth_multiplier=depth_multiplier, use_bias=False,
        name=f"conv_dw_{block_id}",
    )(x)  # [b, H/stride, W/stride, C * depth_multiplier]: one 3x3 filter per channel
    x = keras.layers.BatchNormalization(name=f"conv_dw_{block_id}_bn")(x)
    x = keras.layers.ReLU(6.0, name=f"conv_dw_{block_id}_relu")(x)
    # mixes channels
    x = keras.layers.Conv2D(pointwise_filters, 1, use_bias=False, name=f"conv_pw_{block_id}")(x)
    x = keras.layers.BatchNormalization(name=f"conv_pw_{block_id}_bn")(x)
    return keras.layers.ReLU(6.0, name=f"conv_pw_{block_id}_relu")(x)


def build_mobilenet_v1(
    input_shape=(224, 224, 3),
    num_classes=1000,
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    alpha=1.0,
    depth_multiplier=1,
    dropout=1e-3,
    weights=None,
    preprocessing=None,
    name="mobilenet_v1",
):
    """MobileNet v1, width multiplier alpha: [b, H, W, 3] -> [b, classes] or [b, H/32, W/32, 1024a].

    The classifier is a 1x1 convolution on the pooled features ("conv_preds"), as in the released
    model; it has the same parameters as a dense layer.
    """
    input_shape = check_input_shape(input_shape, min_size=32)
    check_num_classes(num_classes, include_top)
    check_weights(weights)
    if not alpha > 0:
        raise ValueError(f"alpha (width multiplier) must be > 0, got {alpha!r}")
    inputs, x = image_input(input_shape, preprocessing, weights, default_mode="tf")
    x = keras.layers.Conv2D(
        int(32 * alpha), 3, strides=2, padding="same", use_bias=False, name="conv1"
    )(x)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.ReLU(6.0, name="conv1_relu")(x)  # [b, H/2, W/2, 32a]
    for block_id, (filters, stride) in enumerate(MOBILENET_V1_BLOCKS, start=1):
        x = depthwise_separable_block(x, int(filters * alpha), stride, depth_multiplier, block_id)
    # x: [b, H/32, W/32, 1024a]
    if include_top:
        # [b, 1, 1, 1024a]
        x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="avg_pool")(x)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
        x = keras.layers.Conv2D(num_classes, 1, padding="same", name="conv_preds")(x)
        x = keras.layers.Reshape((num_classes,), name="reshape_2")(x)
        x = keras.layers.Activation(classifier_activation or "linear", name="predictions")(x)
    else:
        x = global_pooling(x, pooling)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_imagenet_weights(
            model, keras.applications.MobileNet, include_top, num_classes, alpha=alpha,
            depth_multiplier=depth_multiplier,
        )
    return model


def inverted_residual_block(x, expansion, output_channels, stride, block_id):
    """MobileNet v2 block: 1x1 expand, ReLU6 -> 3x3 depthwise, ReLU6 -> 1x1 linear projection.

    [b, H, W, C] -> [b, H/stride, W/stride, output_channels]. The residual is added when the block
    keeps the shape (stride 1 and C == output_channels). Block 0 has expansion 1 and no expand conv.
    """
    input_channels = x.shape[-1]
    inputs = x
    prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
    if block_id:
        x = keras.layers.Conv2D(
            expansion * input_channels, 1, use_bias=False, name=f"{prefix}expand"
        )(x)
        x = keras.layers.BatchNormalization(**V2_BN, name=f"{prefix}expand_BN")(x)
        x = keras.layers.ReLU(6.0, name=f"{prefix}expand_relu")(x)  # [b, H, W, t * C]
    if stride == 2:
        x = pad_for_stride_2(x, 3, name=f"{prefix}pad")
    x = keras.layers.DepthwiseConv2D(
        3,
        strides=stride,
        padding="same" if stride == 1 else "valid",
        use_bias=False,
        name=f"{prefix}depthwise",
    )(x)
    x = keras.layers.BatchNormalization(**V2_BN, name=f"{prefix}depthwise_BN")(x)
    x = keras.layers.ReLU(6.0, name=f"{prefix}depthwise_relu")(x)
    x = keras.layers.Conv2D(output_channels, 1, use_bias=False, name=f"{prefix}project")(x)
    # linear: no activation
    x = keras.layers.BatchNormalization(**V2_BN, name=f"{prefix}project_BN")(x)
    if stride == 1 and input_channels == output_channels:
        x = keras.layers.Add(name=f"{prefix}add")([inputs, x])
    return x


def build_mobilenet_v2(
    input_shape=(224, 224, 3),
    num_classes=1000,
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    alpha=1.0,
    weights=None,
    preprocessing=None,
    name="mobilenet_v2",
):
    """MobileNet v2 (Table 2): [b, H, W, 3] -> [b, num_classes] or the map [b, H/32, W/32, 1280]."""
    input_shape = check_input_shape(input_shape, min_size=32)
    check_num_classes(num_classes, include_top)
    check_weights(weights)
    if not alpha > 0:
        raise ValueError(f"alpha (width multiplier) must be > 0, got {alpha!r}")
    inputs, x = image_input(input_shape, preprocessing, weights, default_mode="tf")
    x = keras.layers.Conv2D(
        make_divisible(32 * alpha), 3, strides=2, padding="same", use_bias=False, name="Conv1"
    )(x)
    x = keras.layers.BatchNormalization(**V2_BN, name="bn_Conv1")(x)
    x = keras.layers.ReLU(6.0, name="Conv1_relu")(x)  # [b, H/2, W/2, 32]
    block_id = 0
    for expansion, channels, repeats, first_stride in MOBILENET_V2_STAGES:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            x = inverted_residual_block(
                x, expansion, make_divisible(int(channels * alpha)), stride, block_id
            )
            block_id += 1
    # The last 1x1 conv keeps 1280 channels for alpha <= 1 (sec. 5.1: "we apply the width multiplier
    # to all layers except the very last convolutional layer" for small alphas).
    last_channels = make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    x = keras.layers.Conv2D(last_channels, 1, use_bias=False, name="Conv_1")(x)
    x = keras.layers.BatchNormalization(**V2_BN, name="Conv_1_bn")(x)
    x = keras.layers.ReLU(6.0, name="out_relu")(x)  # [b, H/32, W/32, 1280]
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dense(num_classes, activation=classifier_activation, name="predictions")(x)
    else:
        x = global_pooling(x, pooling)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_imagenet_weights(
            model, keras.applications.MobileNetV2, include_top, num_classes, alpha=alpha
        )
    return model


def mobilenet_v1_endpoint_names():
    """Deepest map per stride: the block output before each stride-2 block, and the last block."""
    return {2: "conv_pw_1_relu", 4: "conv_pw_3_relu", 8: "conv_pw_5_relu", 16: "conv_pw_11_relu",
            32: "conv_pw_13_relu"}  # fmt: skip


def mobilenet_v2_endpoint_names():
    """Deepest map per stride: the bottleneck before the next stride-2 block; 32: the 1280 conv."""
    return {2: "expanded_conv_project_BN", 4: "block_2_add", 8: "block_5_add", 16: "block_12_add",
            32: "out_relu"}  # fmt: skip
