"""EfficientNet-B0 and its compound scaling to B1-B7.

What this file teaches (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019):
- the MBConv block: MobileNet v2's inverted residual plus *squeeze-and-excitation* (Hu et al. 2018):
  the block pools each channel to one number, passes the vector through a small bottleneck (reduce
  to a quarter of the block's input channels, swish, expand, sigmoid) and rescales the channels by
  the result; swish activations; *stochastic depth* (Huang et al. 2016) drops whole residual
  branches per example during training, at a rate growing linearly with depth up to
  `drop_connect_rate`;
- the B0 layout found by architecture search (Table 1);
- compound scaling (sec. 3.3): depth d = alpha^phi, width w = beta^phi, resolution r = gamma^phi
  with alpha=1.2, beta=1.1, gamma=1.15 chosen so alpha * beta^2 * gamma^2 ~= 2 (FLOPs double per
  unit of phi). The released B1-B7 use rounded coefficients (EFFICIENTNET_SCALING below, from the
  authors' code); `compound_scaling(phi)` gives the raw rule for comparison.

Layer names follow keras.applications.EfficientNetB0..B7, so their ImageNet weights copy by name.
One difference on purpose: keras.applications puts Rescaling(1/255) and a Normalization layer (7
non-trainable numbers: mean[3], variance[3], count) inside the model; ours takes [0, 1] images and,
with ImageNet weights, an ImageNetPreprocessing("torch") layer (no weights) does the same
standardization.
"""

import math

import keras

from ch04_classification._common import (
    check_input_shape,
    check_num_classes,
    check_weights,
    global_pooling,
    image_input,
)
from ch04_classification.mobilenet import make_divisible, pad_for_stride_2
from ch04_classification.weights import load_imagenet_weights

# Compound-scaling constants (sec. 3.3, eq. 3 and the grid search of step 1).
DEPTH_BASE, WIDTH_BASE, RESOLUTION_BASE = 1.2, 1.1, 1.15

# Published coefficients of the released models: name -> (width, depth, resolution, dropout).
EFFICIENTNET_SCALING = {
    "efficientnet_b0": (1.0, 1.0, 224, 0.2),
    "efficientnet_b1": (1.0, 1.1, 240, 0.2),
    "efficientnet_b2": (1.1, 1.2, 260, 0.3),
    "efficientnet_b3": (1.2, 1.4, 300, 0.3),
    "efficientnet_b4": (1.4, 1.8, 380, 0.4),
    "efficientnet_b5": (1.6, 2.2, 456, 0.4),
    "efficientnet_b6": (1.8, 2.6, 528, 0.5),
    "efficientnet_b7": (2.0, 3.1, 600, 0.5),
}

# B0 (Table 1): (expand ratio, kernel, stride, input channels, output channels, repeats) per stage.
EFFICIENTNET_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
SE_RATIO = 0.25  # squeeze to a quarter of the block's *input* channels

# Initializers of the reference implementation (He-style fan-out for convs).
CONV_INITIALIZER = keras.initializers.VarianceScaling(
    2.0, mode="fan_out", distribution="truncated_normal"
)
DENSE_INITIALIZER = keras.initializers.VarianceScaling(
    1.0 / 3.0, mode="fan_out", distribution="uniform"
)


def compound_scaling(phi, base_resolution=224):
    """The raw compound-scaling rule: width beta^phi, depth alpha^phi, resolution 224 gamma^phi."""
    return WIDTH_BASE**phi, DEPTH_BASE**phi, base_resolution * RESOLUTION_BASE**phi


def scale_width(channels, width_coefficient, divisor=8):
    """Channels of a scaled stage, rounded to a multiple of 8 (as in the authors' code)."""
    return make_divisible(channels * width_coefficient, divisor)


def scale_depth(repeats, depth_coefficient):
    """Blocks of a scaled stage, rounded up."""
    return int(math.ceil(depth_coefficient * repeats))


def mbconv_block(
    x,
    input_channels,
    output_channels,
    expand_ratio,
    kernel_size,
    stride,
    drop_rate=0.0,
    name="block1a_",
):
    """MBConv with squeeze-and-excitation: [b, H, W, input_channels] -> [b, H/stride, W/stride,
    output_channels].

    1x1 expand (swish) -> kxk depthwise (swish) -> SE -> 1x1 linear projection (+ residual with
    stochastic depth when the shape is kept).
    """
    inputs = x
    channels = input_channels * expand_ratio
    if expand_ratio != 1:
        x = keras.layers.Conv2D(
            channels, 1, padding="same", use_bias=False, kernel_initializer=CONV_INITIALIZER,
            name=f"{name}expand_conv",
        )(x)
        x = keras.layers.BatchNormalization(name=f"{name}expand_bn")(x)
        x = keras.layers.Activation("swish", name=f"{name}expand_activation")(x)
    if stride == 2:
        x = pad_for_stride_2(x, kernel_size, name=f"{name}dwconv_pad")
    x = keras.layers.DepthwiseConv2D(
        kernel_size, strides=stride, padding="same" if stride == 1 else "valid", use_bias=False,
        depthwise_initializer=CONV_INITIALIZER, name=f"{name}dwconv",
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}bn")(x)
    x = keras.layers.Activation("swish", name=f"{name}activation")(x)  # [b, H/s, W/s, channels]

    # Squeeze-and-excitation: one weight in (0, 1) per channel, computed from the whole image.
    squeezed_channels = max(1, int(input_channels * SE_RATIO))
    se = keras.layers.GlobalAveragePooling2D(name=f"{name}se_squeeze")(x)  # [b, channels]
    se = keras.layers.Reshape((1, 1, channels), name=f"{name}se_reshape")(se)
    se = keras.layers.Conv2D(
        squeezed_channels,
        1,
        padding="same",
        activation="swish",
        kernel_initializer=CONV_INITIALIZER,
        name=f"{name}se_reduce",
    )(se)
    se = keras.layers.Conv2D(
        channels, 1, padding="same", activation="sigmoid", kernel_initializer=CONV_INITIALIZER,
        name=f"{name}se_expand",
    )(se)  # [b, 1, 1, channels]
    x = keras.layers.Multiply(name=f"{name}se_excite")([x, se])

    x = keras.layers.Conv2D(
        output_channels, 1, padding="same", use_bias=False, kernel_initializer=CONV_INITIALIZER,
        name=f"{name}project_conv",
    )(x)
    x = keras.layers.BatchNormalization(name=f"{name}project_bn")(x)  # linear bottleneck
    if stride == 1 and input_channels == output_channels:
        if drop_rate > 0:
            # Stochastic depth: drop the residual branch of whole examples (noise [b, 1, 1, 1]).
            x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}drop")(x)
        x = keras.layers.Add(name=f"{name}add")([x, inputs])
    return x


def build_efficientnet(
    name="efficientnet_b0",
    input_shape=None,
    num_classes=1000,
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    drop_connect_rate=0.2,
    dropout=None,
    weights=None,
    preprocessing=None,
):
    """EfficientNet-B0..B7: [b, H, W, 3] -> [b, num_classes] or [b, H/32, W/32, 1280 * width].

    input_shape=None uses the published resolution of `name`. drop_connect_rate=0 disables
    stochastic depth.
    """
    if name not in EFFICIENTNET_SCALING:
        raise ValueError(f"name must be one of {sorted(EFFICIENTNET_SCALING)}, got {name!r}")
    width, depth, resolution, default_dropout = EFFICIENTNET_SCALING[name]
    input_shape = check_input_shape(input_shape or (resolution, resolution, 3), min_size=32)
    check_num_classes(num_classes, include_top)
    check_weights(weights)
    if not 0.0 <= drop_connect_rate < 1.0:
        raise ValueError(f"drop_connect_rate must be in [0, 1), got {drop_connect_rate!r}")
    dropout = default_dropout if dropout is None else dropout

    inputs, x = image_input(input_shape, preprocessing, weights, default_mode="torch")
    x = pad_for_stride_2(x, 3, name="stem_conv_pad")
    x = keras.layers.Conv2D(
        scale_width(32, width), 3, strides=2, padding="valid", use_bias=False,
        kernel_initializer=CONV_INITIALIZER, name="stem_conv",
    )(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("swish", name="stem_activation")(x)  # [b, H/2, W/2, 32w]

    total_blocks = sum(scale_depth(stage[-1], depth) for stage in EFFICIENTNET_B0_STAGES)
    block_index = 0
    for stage_index, (
        expand, kernel, stride, channels_in, channels_out, repeats
    ) in enumerate(EFFICIENTNET_B0_STAGES):
        channels_in, channels_out = scale_width(channels_in, width), scale_width(
            channels_out, width
        )
        for repeat in range(scale_depth(repeats, depth)):
            x = mbconv_block(
                x,
                channels_in if repeat == 0 else channels_out,
                channels_out,
                expand,
                kernel,
                stride if repeat == 0 else 1,
                drop_rate=drop_connect_rate * block_index / total_blocks,  # linear in depth
                name=f"block{stage_index + 1}{chr(ord('a') + repeat)}_",
            )
            block_index += 1

    x = keras.layers.Conv2D(
        scale_width(
            1280, width
        ), 1, padding="same", use_bias=False, kernel_initializer=CONV_INITIALIZER,
        name="top_conv",
    )(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    x = keras.layers.Activation("swish", name="top_activation")(x)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name="top_dropout")(x)
        x = keras.layers.Dense(
            num_classes,
            activation=classifier_activation,
            kernel_initializer=DENSE_INITIALIZER,
            name="predictions",
        )(x)
    else:
        x = global_pooling(x, pooling)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        application = getattr(keras.applications, f"EfficientNetB{name[-1]}")
        load_imagenet_weights(model, application, include_top, num_classes)
    return model


def efficientnet_endpoint_names(name):
    """Deepest map per stride: the last block of stages 1, 2, 3 and 5; stride 32: top activation."""
    depth = EFFICIENTNET_SCALING[name][1]
    last_blocks = []
    for stage_index, stage in enumerate(EFFICIENTNET_B0_STAGES):
        repeats = scale_depth(stage[-1], depth)
        # A stage's later blocks keep the shape, so they end with the residual addition.
        suffix = "add" if repeats > 1 else "project_bn"
        last_blocks.append(f"block{stage_index + 1}{chr(ord('a') + repeats - 1)}_{suffix}")
    return {
        2: last_blocks[0],
        4: last_blocks[1],
        8: last_blocks[2],
        16: last_blocks[4],
        32: "top_activation",
    }
