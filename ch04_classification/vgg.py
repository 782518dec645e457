"""VGG-16 and VGG-19, and the fully convolutional VGG that outputs a class map for any input size.

What this file teaches (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015):
- depth from stacks of 3x3 convolutions: two 3x3 layers see a 5x5 window and three see 7x7, with
  fewer parameters (3 * 9 C^2 = 27 C^2 instead of 49 C^2) and more non-linearities (sec. 2.3);
- five blocks, each ending with 2x2/2 max pooling, widths 64-128-256-512-512 (Table 1, configs
  D and E);
- a 4096-4096-1000 dense head with dropout 0.5 on the first two (sec. 3.1);
- at test time the dense layers become convolutions, the first 7x7 and the others 1x1 (sec. 3.2), so
  the net slides over a larger image and returns a class score map; `build_vgg_fcn` builds that
  variant and `dense_head_to_convolutions` copies trained dense weights into it. Long et al. 2015
  (FCN) start from it.

Layer names match keras.applications.VGG16/VGG19, whose ImageNet weights can be copied by name.
keras.applications has no dropout in the head; dropout has no parameters, so the counts are equal.
"""

import keras
import numpy as np

from ch04_classification._common import (
    check_input_shape,
    check_num_classes,
    check_weights,
    global_pooling,
    image_input,
)
from ch04_classification.weights import load_imagenet_weights

# convolutions per block (Table 1: D = VGG-16, E = VGG-19)
VGG_CONFIGS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
VGG_BLOCK_FILTERS = (64, 128, 256, 512, 512)
VGG_FC_UNITS = 4096


def vgg_block(x, filters, num_convs, block_index):
    """`num_convs` 3x3 conv + ReLU, 2x2/2 max pooling: [b, H, W, C] -> [b, H/2, W/2, filters]."""
    for conv_index in range(num_convs):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            activation="relu",
            name=f"block{block_index}_conv{conv_index + 1}",
        )(x)
    return keras.layers.MaxPooling2D(2, strides=2, name=f"block{block_index}_pool")(x)


def _vgg_features(name, input_shape, weights, preprocessing):
    if name not in VGG_CONFIGS:
        raise ValueError(f"name must be one of {sorted(VGG_CONFIGS)}, got {name!r}")
    inputs, x = image_input(input_shape, preprocessing, weights, default_mode="caffe")
    for block_index, (filters, num_convs) in enumerate(zip(VGG_BLOCK_FILTERS, VGG_CONFIGS[name])):
        x = vgg_block(x, filters, num_convs, block_index + 1)
    return inputs, x  # [b, H/32, W/32, 512]


def _application(name):
    return {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}[name]


def build_vgg(
    name="vgg16",
    input_shape=(224, 224, 3),
    num_classes=1000,
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    dropout=0.5,
    fc_units=VGG_FC_UNITS,
    weights=None,
    preprocessing=None,
):
    """VGG-16/19 classifier: [b, H, W, 3] -> [b, num_classes] (the dense head needs a fixed H, W).

    Without the top: the block5 pooled map [b, H/32, W/32, 512] (or a pooled vector with `pooling`).
    fc_units: width of the two hidden dense layers (4096 in the paper; smaller for small data sets).
    """
    input_shape = check_input_shape(input_shape, min_size=32)
    check_num_classes(num_classes, include_top)
    check_weights(weights)
    if include_top and (input_shape[0] is None or input_shape[1] is None):
        raise ValueError(
            f"input_shape needs a fixed height and width with include_top=True, got {input_shape!r}"
        )
    inputs, x = _vgg_features(name, input_shape, weights, preprocessing)
    if include_top:
        x = keras.layers.Flatten(name="flatten")(x)  # [b, 7 * 7 * 512] at 224x224
        x = keras.layers.Dense(fc_units, activation="relu", name="fc1")(x)
        x = keras.layers.Dropout(dropout, name="fc1_dropout")(x)
        x = keras.layers.Dense(fc_units, activation="relu", name="fc2")(x)
        x = keras.layers.Dropout(dropout, name="fc2_dropout")(x)
        x = keras.layers.Dense(num_classes, activation=classifier_activation, name="predictions")(x)
    else:
        x = global_pooling(x, pooling)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_imagenet_weights(model, _application(name), include_top, num_classes)
    return model


def build_vgg_fcn(
    name="vgg16_fcn",
    input_shape=(None, None, 3),
    num_classes=1000,
    include_top=True,
    classifier_activation="softmax",
    dropout=0.5,
    fc_kernel_size=7,
    fc_units=VGG_FC_UNITS,
    weights=None,
    preprocessing=None,
):
    """Fully convolutional VGG (sec. 3.2): [b, H, W, 3] -> class map [b, h, w, num_classes].

    h = H/32 - k + 1 and w = W/32 - k + 1.

    fc6 is a k x k "valid" convolution (k = fc_kernel_size = 7, the 7x7x512 window the dense fc1 saw
    at 224x224), fc7 and the classifier are 1x1 convolutions. At 224x224 the map is 1x1 and equals
    the dense network's output; a 384x384 image gives a 6x6 map of class scores. `name` is
    vgg16_fcn or vgg19_fcn.
    """
    base_name = name.replace("_fcn", "")
    input_shape = check_input_shape(input_shape, min_size=32)
    check_num_classes(num_classes, include_top)
    check_weights(weights)
    inputs, x = _vgg_features(base_name, input_shape, weights, preprocessing)
    if include_top:
        x = keras.layers.Conv2D(fc_units, fc_kernel_size, activation="relu", name="fc1_conv")(x)
        x = keras.layers.Dropout(dropout, name="fc1_dropout")(x)
        x = keras.layers.Conv2D(fc_units, 1, activation="relu", name="fc2_conv")(x)
        x = keras.layers.Dropout(dropout, name="fc2_dropout")(x)
        x = keras.layers.Conv2D(
            num_classes, 1, activation=classifier_activation, name="predictions_conv"
        )(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        dense = build_vgg(
            base_name, (224, 224, 3), 1000, include_top=include_top, weights="imagenet"
        )
        dense_head_to_convolutions(
            dense, model, skip_classifier=include_top and num_classes != 1000
        )
    return model


def dense_head_to_convolutions(dense_model, fcn_model, skip_classifier=False):
    """Copy a VGG classifier's weights into the fully convolutional VGG (Simonyan & Zisserman 3.2).

    Convolution layers are copied as they are; each dense kernel [inputs, units] is reshaped to the
    convolution kernel [k, k, channels, units] it is equivalent to (Flatten runs row-major over
    height, width, channels, which is exactly the order of a conv kernel's first three axes).
    """
    for layer in dense_model.layers:
        if not layer.weights:
            continue
        if isinstance(layer, keras.layers.Dense):
            if skip_classifier and layer.name == "predictions":
                continue
            target = fcn_model.get_layer(f"{layer.name}_conv")
            kernel, bias = layer.get_weights()
            target.set_weights([np.reshape(kernel, target.kernel.shape), bias])
        else:
            fcn_model.get_layer(layer.name).set_weights(layer.get_weights())
    return fcn_model


def vgg_endpoint_names(name):
    """Deepest feature map at each stride: the last conv of each block; stride 32 = block5 pooling.

    Stride 16 = conv5_3, the feature map of Faster R-CNN with VGG-16 (Ren et al. 2015). FCN-8s
    (Long et al. 2015) takes its skips from pool3/pool4, which are these maps max-pooled once.
    """
    blocks = VGG_CONFIGS[name.replace("_fcn", "")]
    endpoints = {
        2 ** index: f"block{index + 1}_conv{num_convs}" for index, num_convs in enumerate(blocks)
    }
    endpoints[32] = "block5_pool"
    return endpoints
