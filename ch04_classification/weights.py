"""Loading keras.applications ImageNet weights into the from-scratch models of this chapter.

What this file teaches: a pretrained checkpoint is just a list of arrays with names. Our ResNet,
VGG, MobileNet and EfficientNet builders name their layers exactly as keras.applications does, so
the weights of the library model can be copied layer by layer, by name, and any mismatch in
architecture shows up as a missing layer or a wrong shape (a loud error, never a silent half-load).

Users have the internet; this machine has not: `weights="imagenet"` is never used in the tests. The
tests check the copy with a randomly initialised keras.applications model in place of the
download.
"""

import keras


def copy_weights_by_name(source, target, skip_layers=()):
    """Copy the weights of every weighted layer of `target` from the same-named layer of `source`.

    Args:
        source: a built keras.Model, e.g. keras.applications.ResNet50(weights="imagenet").
        target: a built keras.Model with the same layer names (our from-scratch model).
        skip_layers: names of target layers to leave as they are (e.g. a new classifier head).
    Returns:
        the number of layers copied.
    Raises:
        ValueError if a target layer has no counterpart in `source` or the shapes differ.
    """
    source_layers = {layer.name: layer for layer in _all_layers(source)}
    copied = 0
    for layer in _all_layers(target):
        if not layer.weights or layer.name in skip_layers:
            continue
        if layer.name not in source_layers:
            raise ValueError(
                f"layer {layer.name!r} of {target.name!r} has no layer of the same name in "
                f"{source.name!r}; "
                "the architectures differ"
            )
        source_weights = source_layers[layer.name].get_weights()
        target_shapes = [tuple(weight.shape) for weight in layer.weights]
        source_shapes = [tuple(array.shape) for array in source_weights]
        if target_shapes != source_shapes:
            raise ValueError(
                f"layer {layer.name!r}: weight shapes {target_shapes} in {target.name!r} but "
                f"{source_shapes} in {source.name!r}"
            )
        layer.set_weights(source_weights)
        copied += 1
    return copied


def _all_layers(model):
    """Layers of a model, looking inside nested models."""
    layers = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            layers.extend(_all_layers(layer))
        else:
            layers.append(layer)
    return layers


def load_imagenet_weights(model, application_builder, include_top, num_classes, **builder_kwargs):
    """Build `application_builder(weights="imagenet", ...)` and copy its weights into `model`.

    With include_top and num_classes != 1000 everything but the last classifier layer is loaded and
    the new classifier keeps its random initialisation (the usual transfer-learning start).
    """
    source = application_builder(weights="imagenet", include_top=include_top, **builder_kwargs)
    skip = CLASSIFIER_LAYER_NAMES if (include_top and num_classes != 1000) else ()
    copy_weights_by_name(source, model, skip_layers=skip)
    return model


# Names of the last (class-specific) layer in keras.applications models and in ours.
CLASSIFIER_LAYER_NAMES = ("predictions", "conv_preds")
