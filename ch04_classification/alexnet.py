"""AlexNet, single-tower version.

What this file teaches (Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks", NIPS 2012): ReLU non-linearities (sec. 3.1), local response
normalization (sec. 3.3, layers.LocalResponseNormalization), overlapping max pooling with 3x3
windows and stride 2 (sec. 3.4), an 11x11 stride-4 first layer, and dropout 0.5 in the first two
fully connected layers (sec. 4.2).

The paper split the layers across two GPUs (Fig. 2), so conv2, conv4 and conv5 saw only half of the
previous layer's maps. One GPU is enough today: this is the single-tower net ("one weird trick",
Krizhevsky 2014), with the same widths, about 62.4 M parameters at 227x227 (the paper's "60
million"). The input is 227x227: with the 11x11/4 valid convolution that gives the paper's 55x55
first-layer maps (the paper's text says 224, a known inconsistency). """

import keras

from ch04_classification._common import check_input_shape, check_num_classes
from ch04_classification.layers import LocalResponseNormalization


def build_alexnet(
    input_shape=(227, 227, 3),
    num_classes=1000,
    include_top=True,
    classifier_activation="softmax",
    dropout=0.5,
    name="alexnet",
):
    """AlexNet: [b, H, W, 3] -> [b, num_classes]; without the top: pool5, [b, 6, 6, 256] at 227."""
    input_shape = check_input_shape(input_shape, min_size=67)
    check_num_classes(num_classes, include_top)
    inputs = keras.Input(shape=input_shape, name="image")
    # [b, 55, 55, 96]
    x = keras.layers.Conv2D(96, 11, strides=4, activation="relu", name="conv1")(inputs)
    x = LocalResponseNormalization(name="norm1")(x)  # k=2, n=5, alpha=1e-4, beta=0.75 (sec. 3.3)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)  # [b, 27, 27, 96]; windows overlap
    x = keras.layers.Conv2D(256, 5, padding="same", activation="relu", name="conv2")(x)
    x = LocalResponseNormalization(name="norm2")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool2")(x)  # [b, 13, 13, 256]
    x = keras.layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.Conv2D(384, 3, padding="same", activation="relu", name="conv4")(x)
    x = keras.layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool5")(x)  # [b, 6, 6, 256]
    if include_top:
        x = keras.layers.Flatten(name="flatten")(x)  # [b, 9216]
        x = keras.layers.Dense(4096, activation="relu", name="fc6")(x)
        x = keras.layers.Dropout(dropout, name="fc6_dropout")(x)
        x = keras.layers.Dense(4096, activation="relu", name="fc7")(x)
        x = keras.layers.Dropout(dropout, name="fc7_dropout")(x)
        x = keras.layers.Dense(num_classes, activation=classifier_activation, name="predictions")(x)
    return keras.Model(inputs, x, name=name)
