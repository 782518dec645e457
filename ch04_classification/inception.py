"""GoogLeNet (Inception v1).

What this file teaches (Szegedy et al., "Going Deeper with Convolutions", CVPR 2015):
- the inception module (sec. 4, Fig. 2b): four parallel branches on the same input, 1x1 | 1x1 -> 3x3
  | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated on depth. The 1x1 "reduce" convolutions shrink
  the width before the expensive 3x3 and 5x5 convolutions, which keeps the 22-layer network at about
  6.8 M parameters (Table 1), 12x fewer than AlexNet;
- global average pooling instead of large dense layers (sec. 5), then dropout 0.4 and one
  linear layer;
- two auxiliary classifiers on inception 4a and 4d (sec. 5): 5x5/3 average pooling, 1x1 conv with
  128 filters, a 1024-unit dense layer, dropout 0.7 and a softmax. Their losses are added with
  weight 0.3 during training only; `build_googlenet(aux_classifiers=True)` returns a three-output
  training model and `googlenet_inference_model` the same weights without the auxiliary heads.

Table 1's filter numbers are in GOOGLENET_INCEPTION_FILTERS below. Convolutions use "same" padding
and ReLU, as all convolutions in the paper.
"""

import keras

from ch04_classification._common import check_input_shape, check_num_classes
from ch04_classification.layers import LocalResponseNormalization

# Table 1: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) for each inception module.
GOOGLENET_INCEPTION_FILTERS = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}
# sec. 5: "their loss gets added to the total loss of the network with a discount weight"
AUX_LOSS_WEIGHT = 0.3
GOOGLENET_LOSS_WEIGHTS = {
    "predictions": 1.0, "aux1_predictions": AUX_LOSS_WEIGHT, "aux2_predictions": AUX_LOSS_WEIGHT
}


def _conv_relu(x, filters, kernel_size, name, strides=1):
    return keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding="same", activation="relu", name=name
    )(x)


def inception_module(
    x, filters_1x1, reduce_3x3, filters_3x3, reduce_5x5, filters_5x5, pool_projection, name
):
    """Inception module (Fig. 2b): [b, H, W, C] -> [b, H, W, filters_1x1 + filters_3x3 + filters_5x5
    + pool_projection]."""
    branch_1x1 = _conv_relu(x, filters_1x1, 1, f"{name}_1x1")
    branch_3x3 = _conv_relu(x, reduce_3x3, 1, f"{name}_3x3_reduce")  # 1x1 bottleneck before the 3x3
    branch_3x3 = _conv_relu(branch_3x3, filters_3x3, 3, f"{name}_3x3")
    branch_5x5 = _conv_relu(x, reduce_5x5, 1, f"{name}_5x5_reduce")
    branch_5x5 = _conv_relu(branch_5x5, filters_5x5, 5, f"{name}_5x5")
    branch_pool = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_pool")(x)
    branch_pool = _conv_relu(branch_pool, pool_projection, 1, f"{name}_pool_proj")
    return keras.layers.Concatenate(axis=-1, name=f"{name}_output")(
        [branch_1x1, branch_3x3, branch_5x5, branch_pool]
    )


def auxiliary_classifier(x, num_classes, classifier_activation, name):
    """Auxiliary head (sec. 5): [b, 14, 14, C] -> 5x5/3 average pool [b, 4, 4, C] -> 1x1 conv 128
    -> dense 1024 -> dropout 0.7 -> [b, num_classes]."""
    x = keras.layers.AveragePooling2D(5, strides=3, name=f"{name}_avg_pool")(x)
    x = _conv_relu(x, 128, 1, f"{name}_conv")
    x = keras.layers.Flatten(name=f"{name}_flatten")(x)
    x = keras.layers.Dense(1024, activation="relu", name=f"{name}_fc")(x)
    x = keras.layers.Dropout(0.7, name=f"{name}_dropout")(x)
    return keras.layers.Dense(
        num_classes, activation=classifier_activation, name=f"{name}_predictions"
    )(x)


def build_googlenet(
    input_shape=(224, 224, 3),
    num_classes=1000,
    include_top=True,
    classifier_activation="softmax",
    aux_classifiers=False,
    dropout=0.4,
    name="googlenet",
):
    """GoogLeNet (Table 1): [b, H, W, 3] -> [b, num_classes].

    With aux_classifiers=True (training): outputs a dict {"predictions", "aux1_predictions",
    "aux2_predictions"}; compile with loss_weights=GOOGLENET_LOSS_WEIGHTS and give the labels for
    each key. The auxiliary heads need inception 4a/4d maps of at least 5x5, i.e. images of at
    least 80x80.
    """
    input_shape = check_input_shape(input_shape, min_size=32)
    check_num_classes(num_classes, include_top)
    if aux_classifiers and not include_top:
        raise ValueError("aux_classifiers=True needs include_top=True")
    if aux_classifiers and any(size is not None and size < 80 for size in input_shape[:2]):
        raise ValueError(
            f"input_shape must be at least 80x80 with aux_classifiers=True, got {input_shape!r}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv_relu(inputs, 64, 7, "conv1_7x7", strides=2)  # [b, 112, 112, 64]
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1")(x)  # [b, 56, 56, 64]
    x = LocalResponseNormalization(name="norm1")(x)
    x = _conv_relu(x, 64, 1, "conv2_3x3_reduce")
    x = _conv_relu(x, 192, 3, "conv2_3x3")
    x = LocalResponseNormalization(name="norm2")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool2")(x)  # [b, 28, 28, 192]
    x = inception_module(x, *GOOGLENET_INCEPTION_FILTERS["3a"], name="inception_3a")  # 256 channels
    x = inception_module(x, *GOOGLENET_INCEPTION_FILTERS["3b"], name="inception_3b")  # 480
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool3")(x)  # [b, 14, 14, 480]
    auxiliary_inputs = {}
    for module in ("4a", "4b", "4c", "4d", "4e"):
        x = inception_module(x, *GOOGLENET_INCEPTION_FILTERS[module], name=f"inception_{module}")
        auxiliary_inputs[module] = x  # 4a: 512, 4d: 528 channels
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool4")(x)  # [b, 7, 7, 832]
    x = inception_module(x, *GOOGLENET_INCEPTION_FILTERS["5a"], name="inception_5a")
    # [b, 7, 7, 1024]
    x = inception_module(x, *GOOGLENET_INCEPTION_FILTERS["5b"], name="inception_5b")
    if not include_top:
        return keras.Model(inputs, x, name=name)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)  # [b, 1024]
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    predictions = keras.layers.Dense(
        num_classes, activation=classifier_activation, name="predictions"
    )(x)
    if not aux_classifiers:
        return keras.Model(inputs, predictions, name=name)
    outputs = {
        "predictions": predictions,
        "aux1_predictions": auxiliary_classifier(
            auxiliary_inputs["4a"], num_classes, classifier_activation, "aux1"
        ),
        "aux2_predictions": auxiliary_classifier(
            auxiliary_inputs["4d"], num_classes, classifier_activation, "aux2"
        ),
    }
    return keras.Model(inputs, outputs, name=f"{name}_train")


def googlenet_inference_model(training_model):
    """The inference network: the training model's weights without the auxiliary classifiers."""
    predictions = training_model.get_layer("predictions").output
    return keras.Model(
        training_model.input, predictions, name=training_model.name.replace("_train", "")
    )
