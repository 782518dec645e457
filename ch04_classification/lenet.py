"""LeNet-5, the original (1998) and a modern re-reading of it.

What this file teaches (LeCun, Bottou, Bengio & Haffner, "Gradient-Based Learning Applied to
Document Recognition", Proc. IEEE 1998, sec. II-B): convolution, subsampling and a few fully
connected layers, trained end to end by back-propagation. Layers on a 32x32 input (the 28x28 MNIST
digits are centred in a
32x32 field, so features at the digit's edges are in the middle of receptive fields):
    C1  6 maps 5x5 conv            -> 28x28x6     156 parameters
    S2  2x2 subsampling            -> 14x14x6      12
    C3  16 maps 5x5, Table I links -> 10x10x16  1,516
    S4  2x2 subsampling            -> 5x5x16       32
    C5  120 maps 5x5 conv          -> 1x1x120  48,120
    F6  84 units                   -> 84       10,164
    output: 10 Euclidean RBF units with fixed codes; 60,000 trainable parameters in all.
The original squashes with A tanh(S a) (A = 1.7159, S = 2/3); `build_lenet5` builds it with the
paper's trainable subsampling and partial C3 connections. `build_lenet5_modern` is the version
people write today: ReLU, max pooling, full C3, dense softmax output.
"""

import keras

from ch04_classification._common import check_input_shape, check_num_classes
from ch04_classification.layers import (
    ConnectionTableConv2D,
    EuclideanRBF,
    ScaledTanh,
    TrainableSubsampling,
)

LENET_INPUT_SIZE = 32


def _lenet_input(input_shape):
    input_shape = check_input_shape(input_shape)
    height, width = input_shape[:2]
    if (
        height is None
        or width is None
        or max(height, width) > LENET_INPUT_SIZE
        or min(height, width) < 20
    ):
        raise ValueError(
            "input_shape must be at most 32x32 (and at least 20x20) for LeNet-5, "
            f"got {input_shape!r}",
        )
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if (height, width) != (LENET_INPUT_SIZE, LENET_INPUT_SIZE):
        # Centre the image in a 32x32 field, as the paper did with the 28x28 MNIST digits.
        pad_h, pad_w = LENET_INPUT_SIZE - height, LENET_INPUT_SIZE - width
        x = keras.layers.ZeroPadding2D(
            ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)), name="pad_to_32"
        )(x)
    return inputs, x


def build_lenet5(
    input_shape=(
        32, 32, 1
    ), num_classes=10, include_top=True, classifier_activation="softmax", name="lenet5"
):
    """The original LeNet-5: [b, <=32, <=32, C] -> [b, num_classes] (softmax of the RBF scores)."""
    check_num_classes(num_classes, include_top)
    inputs, x = _lenet_input(input_shape)
    x = keras.layers.Conv2D(6, 5, name="c1")(x)  # [b, 28, 28, 6]
    x = ScaledTanh(name="c1_tanh")(x)
    x = TrainableSubsampling(name="s2")(x)  # [b, 14, 14, 6]
    x = ScaledTanh(name="s2_tanh")(x)
    x = ConnectionTableConv2D(name="c3")(x)  # [b, 10, 10, 16]
    x = ScaledTanh(name="c3_tanh")(x)
    x = TrainableSubsampling(name="s4")(x)  # [b, 5, 5, 16]
    x = ScaledTanh(name="s4_tanh")(x)
    # [b, 1, 1, 120]: a convolution, full connection at 32x32
    x = keras.layers.Conv2D(120, 5, name="c5")(x)
    x = ScaledTanh(name="c5_tanh")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(84, name="f6")(x)
    x = ScaledTanh(name="f6_tanh")(x)  # [b, 84]
    if include_top:
        x = EuclideanRBF(num_classes, name="rbf_output")(x)  # [b, num_classes], fixed codes
        if classifier_activation is not None:
            x = keras.layers.Activation(classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def build_lenet5_modern(
    input_shape=(
        32, 32, 1
    ), num_classes=10, include_top=True, classifier_activation="softmax", name="lenet5_modern"
):
    """LeNet-5 as written today: ReLU, 2x2 max pooling, full C3, dense softmax output."""
    check_num_classes(num_classes, include_top)
    inputs, x = _lenet_input(input_shape)
    x = keras.layers.Conv2D(6, 5, activation="relu", name="c1")(x)  # [b, 28, 28, 6]
    x = keras.layers.MaxPooling2D(2, name="s2")(x)  # [b, 14, 14, 6]
    x = keras.layers.Conv2D(16, 5, activation="relu", name="c3")(x)  # [b, 10, 10, 16]
    x = keras.layers.MaxPooling2D(2, name="s4")(x)  # [b, 5, 5, 16]
    x = keras.layers.Flatten(name="flatten")(x)  # [b, 400]
    x = keras.layers.Dense(120, activation="relu", name="c5")(x)
    x = keras.layers.Dense(84, activation="relu", name="f6")(x)
    if include_top:
        x = keras.layers.Dense(num_classes, activation=classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=name)
