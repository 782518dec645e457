"""ResNet-18/34/50/101/152 and a small CPU-friendly ResNet, built from scratch.

What this file teaches: residual learning (He, Zhang, Ren & Sun, "Deep Residual Learning for Image
Recognition", CVPR 2016). A block learns a residual F(x) and outputs relu(F(x) + shortcut(x)):
- the *basic block* (two 3x3 convolutions) of ResNet-18/34 (paper Fig. 5 left),
- the *bottleneck block* (1x1 reduce -> 3x3 -> 1x1 expand x4) of ResNet-50/101/152 (Fig. 5 right),
- the shortcut is the identity when the shape is unchanged and a *projection* (1x1 convolution with
  the block's stride + batch norm, the paper's option B, sec. 3.3) when stride or width change.
Stage layout (paper Table 1): a 7x7/2 stem and 3x3/2 max pooling (stride 4), then stages conv2_x ..
conv5_x at strides 4, 8, 16, 32 with 64, 128, 256, 512 bottleneck widths.

Matching keras.applications exactly (so the parameter counts are identical and its ImageNet
weights load by name), the bottleneck models follow the Caffe release of the paper, as
keras.applications.ResNet50 does:
- every convolution has a bias, although batch norm right after it makes the bias redundant (BN
  subtracts the mean and adds its own beta). That is 1 extra parameter per output channel: ResNet-50
  has 25,636,712 parameters with the biases and 25,557,032 without (the count torchvision reports).
- the stride of a downsampling bottleneck sits on its first 1x1 convolution (the "v1" of the paper's
  Caffe model). "ResNet v1.5" moves it onto the 3x3 convolution (better accuracy, more compute);
  this does not change the parameter count; `stride_on_3x3=True` builds it.
- batch norm epsilon 1.001e-5 and layer names like "conv3_block2_1_conv".
The basic-block models (ResNet-18/34, no keras.applications twin) use no bias by default, as in
the paper.

Run the tests: `python -m pytest -q tests/test_ch04_models.py -k resnet`.
"""

import keras

from ch04_classification._common import (
    check_input_shape,
    check_num_classes,
    check_weights,
    image_input,
    pooling_head,
)
from ch04_classification.weights import load_imagenet_weights

BN_EPSILON = 1.001e-5  # keras.applications' value (from the converted Caffe models)

# name -> (block type, number of blocks per stage conv2_x..conv5_x); He et al. 2016, Table 1.
RESNET_CONFIGS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
STAGE_FILTERS = (64, 128, 256, 512)  # width of the 3x3 convolutions per stage (Table 1)
BOTTLENECK_EXPANSION = 4  # a bottleneck block outputs 4x its 3x3 width (256, 512, 1024, 2048)

# resnet_small: a ResNet-10-like net (one basic block per stage) for the detection and segmentation
# chapters on 64-128 pixel images on a CPU: a 3x3/2 stem instead of 7x7/2 + max pool, and narrow
# stages. It keeps ResNet's five strides 2, 4, 8, 16, 32 (0.31 M parameters with widths 16..128).
RESNET_SMALL_STEM_FILTERS = 16
RESNET_SMALL_FILTERS = (16, 32, 64, 128)
RESNET_SMALL_BLOCKS = (1, 1, 1, 1)


def conv_bn(x, filters, kernel_size, strides=1, use_bias=False, activation="relu", name=None):
    """Convolution ("same" padding) -> batch norm -> optional activation.

    [batch, H, W, C] -> [batch, H / strides, W / strides, filters].
    """
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=use_bias,
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    if activation is not None:
        x = keras.layers.Activation(activation, name=f"{name}_relu")(x)
    return x


def basic_block(x, filters, stride=1, use_bias=False, name="block"):
    """Basic residual block (Fig. 5 left): 3x3 conv, BN, ReLU, 3x3 conv, BN, + shortcut, ReLU.

    [batch, H, W, C] -> [batch, H/stride, W/stride, filters]. The shortcut is a 1x1 projection when
    the stride or the number of channels changes, otherwise the identity.
    """
    input_channels = x.shape[-1]
    if stride != 1 or input_channels != filters:
        shortcut = conv_bn(x, filters, 1, stride, use_bias, activation=None, name=f"{name}_0")
    else:
        shortcut = x
    residual = conv_bn(x, filters, 3, stride, use_bias, name=f"{name}_1")
    residual = conv_bn(residual, filters, 3, 1, use_bias, activation=None, name=f"{name}_2")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def bottleneck_block(x, filters, stride=1, use_bias=True, stride_on_3x3=False, name="block"):
    """Bottleneck block (Fig. 5 right): 1x1 reduce -> 3x3 -> 1x1 expand to 4 * filters, + shortcut.

    [batch, H, W, C] -> [batch, H/stride, W/stride, 4 * filters]. The 1x1 convolutions reduce and
    restore the width so the expensive 3x3 runs on `filters` channels only. Projection shortcut when
    the stride or the number of channels changes (the first block of every stage).
    """
    output_channels = BOTTLENECK_EXPANSION * filters
    if stride != 1 or x.shape[-1] != output_channels:
        shortcut = conv_bn(
            x, output_channels, 1, stride, use_bias, activation=None, name=f"{name}_0"
        )
    else:
        shortcut = x
    stride_1x1, stride_3x3 = (1, stride) if stride_on_3x3 else (stride, 1)
    # [b, H/s, W/s, filters]
    residual = conv_bn(x, filters, 1, stride_1x1, use_bias, name=f"{name}_1")
    residual = conv_bn(residual, filters, 3, stride_3x3, use_bias, name=f"{name}_2")
    residual = conv_bn(residual, output_channels, 1, 1, use_bias, activation=None, name=f"{name}_3")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, residual])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def residual_stage(x, block_type, filters, num_blocks, stride, name, **block_options):
    """`num_blocks` residual blocks named like conv3_block1; the first downsamples by `stride`."""
    block_fn = basic_block if block_type == "basic" else bottleneck_block
    for index in range(num_blocks):
        x = block_fn(
            x,
            filters,
            stride=stride if index == 0 else 1,
            name=f"{name}_block{index + 1}",
            **block_options,
        )
    return x


def resnet_endpoint_names(name, blocks=None):
    """Layer names of the feature maps at strides 2, 4, 8, 16, 32 (the last layer of each stage)."""
    if name == "resnet_small":
        blocks = blocks or RESNET_SMALL_BLOCKS
    else:
        blocks = blocks or RESNET_CONFIGS[name][1]
    endpoints = {2: "conv1_relu"}
    for stage_index, num_blocks in enumerate(blocks):
        endpoints[4 * 2**stage_index] = f"conv{stage_index + 2}_block{num_blocks}_out"
    return endpoints


def build_resnet(
    name="resnet50",
    input_shape=(224, 224, 3),
    num_classes=1000,
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    use_bias=None,
    stride_on_3x3=False,
    weights=None,
    preprocessing=None,
):
    """ResNet-18/34/50/101/152 (He et al. 2016, Table 1).

    Args:
        name: one of RESNET_CONFIGS.
        input_shape: (height, width, 3); RGB images in [0, 1].
        num_classes, include_top, pooling, classifier_activation: as keras.applications.
        use_bias: bias in the convolutions; None = keras.applications' convention (True for
            the bottleneck nets, False for ResNet-18/34).
        stride_on_3x3: ResNet v1.5 (stride on the bottleneck's 3x3) instead of v1 (on the
            first 1x1).
        weights: None or "imagenet" (ResNet-50/101/152 only; copies keras.applications weights).
        preprocessing: see ImageNetPreprocessing; None = "caffe" with ImageNet weights, else
            none.
    Returns:
        keras.Model: [batch, H, W, 3] -> [batch, num_classes] (include_top) or the conv5_x feature
        map [batch, H/32, W/32, 512 or 2048].
    """
    if name not in RESNET_CONFIGS:
        raise ValueError(f"name must be one of {sorted(RESNET_CONFIGS)}, got {name!r}")
    input_shape = check_input_shape(input_shape, min_size=32)
    check_num_classes(num_classes, include_top)
    check_weights(weights)
    block_type, blocks = RESNET_CONFIGS[name]
    if weights == "imagenet" and (block_type != "bottleneck" or stride_on_3x3 or use_bias is False):
        raise ValueError(
            'weights="imagenet" is available for resnet50/101/152 in the keras.applications '
            f"layout (use_bias=True, stride_on_3x3=False), got name={name!r}"
        )
    if use_bias is None:
        use_bias = block_type == "bottleneck"

    inputs, x = image_input(input_shape, preprocessing, weights, default_mode="caffe")
    # Stem: 7x7/2 convolution with explicit 3-pixel zero padding (as in Caffe), 3x3/2 max pooling.
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(x)
    # [b, H/2, W/2, 64]
    x = keras.layers.Conv2D(64, 7, strides=2, use_bias=use_bias, name="conv1_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name="conv1_bn")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(1, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)  # [b, H/4, W/4, 64]

    block_options = {"use_bias": use_bias}
    if block_type == "bottleneck":
        block_options["stride_on_3x3"] = stride_on_3x3
    for stage_index, (filters, num_blocks) in enumerate(zip(STAGE_FILTERS, blocks)):
        # conv2_x keeps stride 4 (the max pool already halved)
        stride = 1 if stage_index == 0 else 2
        x = residual_stage(
            x, block_type, filters, num_blocks, stride, f"conv{stage_index + 2}", **block_options
        )
    # x: [b, H/32, W/32, 512 (basic) or 2048 (bottleneck)]

    outputs = pooling_head(x, num_classes, include_top, pooling, classifier_activation)
    model = keras.Model(inputs, outputs, name=name)
    if weights == "imagenet":
        builder = {
            "resnet50": keras.applications.ResNet50,
            "resnet101": keras.applications.ResNet101,
            "resnet152": keras.applications.ResNet152,
        }[name]
        load_imagenet_weights(model, builder, include_top, num_classes)
    return model


def build_resnet_small(
    input_shape=(64, 64, 3),
    num_classes=10,
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    stem_filters=RESNET_SMALL_STEM_FILTERS,
    filters=RESNET_SMALL_FILTERS,
    blocks=RESNET_SMALL_BLOCKS,
    weights=None,
    preprocessing=None,
    name="resnet_small",
):
    """A narrow ResNet-10-like network: 3x3/2 stem + 4 stages of basic blocks, each with stride 2.

    [batch, H, W, 3] -> [batch, num_classes], or the last stage [batch, H/32, W/32, filters[-1]].
    Same layer naming as the big ResNets, so the same endpoints (strides 2..32) exist.
    """
    input_shape = check_input_shape(input_shape, min_size=32)
    check_num_classes(num_classes, include_top)
    if weights is not None:
        raise ValueError(
            f"weights must be None for resnet_small (no pretrained weights exist), got {weights!r}"
        )
    filters, blocks = tuple(filters), tuple(blocks)
    if len(filters) != 4 or len(blocks) != 4 or min(blocks) < 1:
        raise ValueError(
            f"filters and blocks must have 4 entries (one per stage), got {filters!r}, {blocks!r}"
        )

    inputs, x = image_input(input_shape, preprocessing, weights, default_mode="none")
    x = conv_bn(x, stem_filters, 3, strides=2, name="conv1")  # [b, H/2, W/2, stem_filters]
    for stage_index, (stage_filters, num_blocks) in enumerate(zip(filters, blocks)):
        x = residual_stage(
            x, "basic", stage_filters, num_blocks, 2, f"conv{stage_index + 2}", use_bias=False
        )
    outputs = pooling_head(x, num_classes, include_top, pooling, classifier_activation)
    return keras.Model(inputs, outputs, name=name)
