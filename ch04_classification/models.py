"""Chapter 4 model zoo: one registry for classification networks, backbones and feature pyramids.

What this file teaches: a registry turns a name on the command line (`--model resnet50`,
`--backbone resnet_small`) into a model, and a *backbone* is a classification network with its head
cut off at a chosen output stride, which is how the detection (ch05) and segmentation (ch06)
chapters reuse these networks.

The architectures themselves live in one file per family, each citing its paper:
    lenet.py, alexnet.py      LeNet-5 (LeCun et al. 1998), AlexNet (Krizhevsky et al. 2012)
    vgg.py                    VGG-16/19 and the fully convolutional VGG (Simonyan & Zisserman 2015)
    inception.py              GoogLeNet / Inception v1 (Szegedy et al. 2015)
    resnet.py                 ResNet-18..152 and resnet_small (He et al. 2016)
    mobilenet.py              MobileNet v1 (Howard et al. 2017) and v2 (Sandler et al. 2018)
    efficientnet.py           EfficientNet-B0..B7 (Tan & Le 2019)
    layers.py                 LocalResponseNormalization, ImageNetPreprocessing
The blocks are re-exported here, e.g. `from ch04_classification.models import bottleneck_block`.

Public API:
    get_model(name, input_shape, num_classes, include_top=True, **options) -> keras.Model
    get_backbone(name, input_shape, output_stride=16, return_endpoints=False, **options)
        -> keras.Model
    get_feature_pyramid(name, input_shape, strides=(4, 8, 16, 32), **options)
        -> keras.Model with dict outputs {"stride_4": ..., "stride_32": ...}
    backbone_channels(name, output_stride=16) -> int
    MODEL_NAMES, BACKBONE_NAMES

Names: lenet5, lenet5_modern, alexnet, vgg16, vgg19, vgg16_fcn, vgg19_fcn, googlenet, resnet18,
resnet34, resnet50, resnet101, resnet152, resnet_small, mobilenet_v1, mobilenet_v2, efficientnet_b0
.. efficientnet_b7. Backbones: resnet_small, resnet18 .. resnet152, vgg16, vgg19, mobilenet_v1,
mobilenet_v2, efficientnet_b0 .. b7.

Every model takes RGB images in [0, 1] (the repo's data contract). With weights="imagenet" an
`ImageNetPreprocessing` layer converts them to what the keras.applications weights expect.

Usage:
    from ch04_classification.models import get_model, get_backbone
    model = get_model("resnet50", (224, 224, 3), num_classes=1000)
    backbone = get_backbone("resnet_small", (128, 128, 3), output_stride=16)  # [b, 8, 8, 64]
"""

import keras

from ch04_classification.alexnet import build_alexnet
from ch04_classification.efficientnet import (  # noqa: F401  (re-exported)
    EFFICIENTNET_SCALING,
    build_efficientnet,
    compound_scaling,
    efficientnet_endpoint_names,
    mbconv_block,
    scale_width,
)
from ch04_classification.inception import (  # noqa: F401
    GOOGLENET_LOSS_WEIGHTS,
    build_googlenet,
    googlenet_inference_model,
    inception_module,
)
from ch04_classification.layers import LocalResponseNormalization  # noqa: F401
from ch04_classification.lenet import build_lenet5, build_lenet5_modern
from ch04_classification.mobilenet import (  # noqa: F401
    build_mobilenet_v1,
    build_mobilenet_v2,
    depthwise_separable_block,
    inverted_residual_block,
    mobilenet_v1_endpoint_names,
    mobilenet_v2_endpoint_names,
)
from ch04_classification.resnet import (  # noqa: F401
    RESNET_CONFIGS,
    basic_block,
    bottleneck_block,
    build_resnet,
    build_resnet_small,
    conv_bn,
    residual_stage,
    resnet_endpoint_names,
)
from ch04_classification.vgg import (  # noqa: F401
    VGG_CONFIGS,
    build_vgg,
    build_vgg_fcn,
    dense_head_to_convolutions,
    vgg_block,
    vgg_endpoint_names,
)

BACKBONE_STRIDES = (2, 4, 8, 16, 32)


def _named(builder, name):
    """Adapt a family builder that takes `name` first to the registry's signature."""

    def build(input_shape, num_classes, include_top=True, **options):
        return builder(name, input_shape, num_classes, include_top, **options)

    return build


def _unnamed(builder):
    def build(input_shape, num_classes, include_top=True, **options):
        return builder(input_shape, num_classes, include_top, **options)

    return build


# name -> builder(input_shape, num_classes, include_top, **options)
_MODEL_BUILDERS = {
    "lenet5": _unnamed(build_lenet5),
    "lenet5_modern": _unnamed(build_lenet5_modern),
    "alexnet": _unnamed(build_alexnet),
    "googlenet": _unnamed(build_googlenet),
    "resnet_small": _unnamed(build_resnet_small),
    "mobilenet_v1": _unnamed(build_mobilenet_v1),
    "mobilenet_v2": _unnamed(build_mobilenet_v2),
}
_MODEL_BUILDERS.update({name: _named(build_resnet, name) for name in RESNET_CONFIGS})
_MODEL_BUILDERS.update({name: _named(build_vgg, name) for name in VGG_CONFIGS})
_MODEL_BUILDERS.update(
    {f"{name}_fcn": _named(build_vgg_fcn, f"{name}_fcn") for name in VGG_CONFIGS}
)
_MODEL_BUILDERS.update({name: _named(build_efficientnet, name) for name in EFFICIENTNET_SCALING})

def _fixed_endpoints(endpoint_function, *args):
    """An endpoint lookup that does not depend on the builder's options."""
    return lambda **options: endpoint_function(*args)


# backbone name -> function(**options) -> {stride: name of the deepest layer at that stride}
_ENDPOINTS = {
    "resnet_small": lambda blocks=None, **options: resnet_endpoint_names("resnet_small", blocks),
    "mobilenet_v1": _fixed_endpoints(mobilenet_v1_endpoint_names),
    "mobilenet_v2": _fixed_endpoints(mobilenet_v2_endpoint_names),
}
_ENDPOINTS.update({name: _fixed_endpoints(resnet_endpoint_names, name) for name in RESNET_CONFIGS})
_ENDPOINTS.update({name: _fixed_endpoints(vgg_endpoint_names, name) for name in VGG_CONFIGS})
_ENDPOINTS.update(
    {name: _fixed_endpoints(efficientnet_endpoint_names, name) for name in EFFICIENTNET_SCALING}
)

# Output channels of the default configuration at each stride (the truth is
# `model.output.shape[-1]`).
_RESNET_BOTTLENECK_CHANNELS = {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048}
_RESNET_BASIC_CHANNELS = {2: 64, 4: 64, 8: 128, 16: 256, 32: 512}
_BACKBONE_CHANNELS = {
    "resnet_small": {2: 16, 4: 16, 8: 32, 16: 64, 32: 128},
    "resnet18": _RESNET_BASIC_CHANNELS,
    "resnet34": _RESNET_BASIC_CHANNELS,
    "resnet50": _RESNET_BOTTLENECK_CHANNELS,
    "resnet101": _RESNET_BOTTLENECK_CHANNELS,
    "resnet152": _RESNET_BOTTLENECK_CHANNELS,
    "vgg16": {2: 128, 4: 256, 8: 512, 16: 512, 32: 512},
    "vgg19": {2: 128, 4: 256, 8: 512, 16: 512, 32: 512},
    "mobilenet_v1": {2: 64, 4: 128, 8: 256, 16: 512, 32: 1024},
    "mobilenet_v2": {2: 16, 4: 24, 8: 32, 16: 96, 32: 1280},
}
# EfficientNet: B0's stage widths 16, 24, 40, 112 and the 1280 top conv, times the width
# coefficient.
_BACKBONE_CHANNELS.update({
    name: {
        stride: scale_width(channels, scaling[0])
        for stride, channels in zip(BACKBONE_STRIDES, (16, 24, 40, 112, 1280))
    }
    for name, scaling in EFFICIENTNET_SCALING.items()
})  # fmt: skip

MODEL_NAMES = tuple(sorted(_MODEL_BUILDERS))
BACKBONE_NAMES = tuple(sorted(_ENDPOINTS))


def get_model(name, input_shape, num_classes, include_top=True, **options):
    """Build a classification model by name.

    Args:
        name: one of MODEL_NAMES.
        input_shape: (height, width, 3), RGB images in [0, 1].
        num_classes: number of classes of the classifier (ignored when include_top=False).
        include_top: with the classifier head (output [batch, num_classes]); without it the
            model ends at its last feature map (or a pooled vector with pooling="avg"/"max").
        **options: family options, e.g. weights=None|"imagenet", classifier_activation="softmax"
            or None (logits), pooling, alpha (MobileNet width multiplier), ... See each builder.
    """
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    return _MODEL_BUILDERS[name](input_shape, num_classes, include_top, **options)


def _check_backbone_name(name):
    if name not in _ENDPOINTS:
        raise ValueError(f"name must be one of the backbones {BACKBONE_NAMES}, got {name!r}")


def _feature_model(name, input_shape, options):
    """The classification network without head, and its {stride: layer name} endpoints."""
    options = dict(options)
    options.pop("include_top", None)
    options.pop("pooling", None)
    model = get_model(name, input_shape, num_classes=None, include_top=False, **options)
    return model, _ENDPOINTS[name](**options)


def get_backbone(name, input_shape, output_stride=16, return_endpoints=False, **options):
    """An image -> feature map network: a classification model cut at `output_stride`.

    Args:
        name: one of BACKBONE_NAMES.
        input_shape: (height, width, 3); height/width may be None for any size.
        output_stride: 4, 8, 16 or 32 (2 also works). The feature map is the deepest layer at
            that stride: 16 = ResNet's conv4_x output ("C4", the Faster R-CNN ResNet setup),
            32 = the last stage.
        return_endpoints: if True, return get_feature_pyramid(name, input_shape, strides up to
            output_stride) instead (a model with a dict of feature maps).
        **options: builder options, e.g. weights="imagenet".
    Returns:
        keras.Model [batch, H, W, 3] -> [batch, H / output_stride, W / output_stride, channels]
        (sizes that do not divide round up, or down in ResNet's valid-padded stem);
        channels = backbone_channels(name, output_stride).
    """
    _check_backbone_name(name)
    if output_stride not in BACKBONE_STRIDES:
        raise ValueError(f"output_stride must be one of {BACKBONE_STRIDES}, got {output_stride!r}")
    if return_endpoints:
        strides = tuple(stride for stride in (4, 8, 16, 32) if stride <= output_stride)
        return get_feature_pyramid(name, input_shape, strides=strides, **options)
    model, endpoints = _feature_model(name, input_shape, options)
    features = model.get_layer(endpoints[output_stride]).output
    return keras.Model(model.input, features, name=f"{name}_backbone_stride{output_stride}")


def get_feature_pyramid(name, input_shape, strides=(4, 8, 16, 32), **options):
    """Feature maps at several strides from one backbone, for FPN / FCN-8s skips / U-Net decoders.

    Returns a keras.Model whose output is a dict {"stride_4": [b, H/4, W/4, c4], "stride_8": ...,
    "stride_16": ..., "stride_32": ...} (keys for the requested `strides`, a subset of 2, 4, 8, 16,
    32). Each map is the deepest layer at its stride (a stage's output, before the next
    downsampling).
    """
    _check_backbone_name(name)
    strides = tuple(strides)
    if not strides or any(stride not in BACKBONE_STRIDES for stride in strides):
        raise ValueError(
            f"strides must be a non-empty subset of {BACKBONE_STRIDES}, got {strides!r}"
        )
    model, endpoints = _feature_model(name, input_shape, options)
    outputs = {
        f"stride_{stride}": model.get_layer(endpoints[stride]).output for stride in sorted(strides)
    }
    return keras.Model(model.input, outputs, name=f"{name}_feature_pyramid")


def backbone_channels(name, output_stride=16):
    """Number of channels of get_backbone(name, ..., output_stride) with default options."""
    _check_backbone_name(name)
    if output_stride not in BACKBONE_STRIDES:
        raise ValueError(f"output_stride must be one of {BACKBONE_STRIDES}, got {output_stride!r}")
    return _BACKBONE_CHANNELS[name][output_stride]
