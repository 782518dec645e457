"""Small helpers shared by the model builders of chapter 4 (input validation, input layer, head).

Not a lesson on its own: the family files (resnet.py, vgg.py, ...) are where to read the
architectures. """

import keras

from ch04_classification.layers import PREPROCESSING_MODES, ImageNetPreprocessing


def check_input_shape(input_shape, min_size=1):
    """Return `input_shape` as a tuple (height, width, channels) or raise ValueError."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = None
    if (
        shape is None
        or len(shape) != 3
        or any(dim is not None and (int(dim) != dim or dim < 1) for dim in shape)
        or shape[2] is None
    ):
        raise ValueError(
            "input_shape must be (height, width, channels) with positive integers "
            f"(height/width may be None), got {input_shape!r}"
        )
    for dim in shape[:2]:
        if dim is not None and dim < min_size:
            raise ValueError(
                f"input_shape height and width must be at least {min_size}, got {input_shape!r}"
            )
    return tuple(None if dim is None else int(dim) for dim in shape)


def check_num_classes(num_classes, include_top):
    if include_top and (num_classes is None or int(num_classes) != num_classes or num_classes < 1):
        raise ValueError(
            f"num_classes must be a positive integer when include_top=True, got {num_classes!r}"
        )


def check_weights(weights):
    if weights not in (None, "imagenet"):
        raise ValueError(f'weights must be None or "imagenet", got {weights!r}')


def image_input(input_shape, preprocessing, weights, default_mode):
    """Input layer for RGB images in [0, 1], plus the ImageNet preprocessing layer when wanted.

    preprocessing=None means: convert to the pretrained weights' convention (`default_mode`) only
    when weights="imagenet"; otherwise feed the [0, 1] images unchanged. Preprocessing has no
    weights, so it never changes a parameter count. """
    if preprocessing is None:
        preprocessing = default_mode if weights == "imagenet" else "none"
    if preprocessing not in PREPROCESSING_MODES:
        raise ValueError(
            f"preprocessing must be one of {PREPROCESSING_MODES} or None, got {preprocessing!r}"
        )
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if preprocessing != "none":
        x = ImageNetPreprocessing(preprocessing, name="imagenet_preprocessing")(x)
    return inputs, x


def global_pooling(x, pooling):
    """The headless network's optional pooling: None keeps the map, "avg" or "max" -> [batch, channels]."""
    if pooling not in (None, "avg", "max"):
        raise ValueError(f'pooling must be None, "avg" or "max", got {pooling!r}')
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")(x)
    return x


def pooling_head(x, num_classes, include_top, pooling, classifier_activation):
    """Global average pooling + a dense classifier (include_top), or optional pooling only."""
    if pooling not in (None, "avg", "max"):
        raise ValueError(f'pooling must be None, "avg" or "max", got {pooling!r}')
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)  # [batch, channels]
        return keras.layers.Dense(
            num_classes, activation=classifier_activation, name="predictions"
        )(x)
    return global_pooling(x, pooling)
