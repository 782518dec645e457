"""Encoder-decoder networks for pixel-level outputs.

This file teaches how a network that shrinks an image into features can grow
those features back into an image, or into one class label per pixel:

* ``transposed_conv2d_by_hand``: the transposed ("fractionally strided")
  convolution in plain NumPy, the upsampling operation every decoder below
  uses. Each input value scatters a scaled copy of the kernel into the
  output (Dumoulin & Visin 2016, "A guide to convolution arithmetic for deep
  learning", sec. 4). ``tests/test_ch06_models.py`` checks it equals
  ``keras.layers.Conv2DTranspose``.
* ``build_denoising_autoencoder``: a convolutional autoencoder (encoder,
  bottleneck, decoder) trained to map a noisy image to the clean one
  (Vincent et al. 2008, "Extracting and composing robust features with
  denoising autoencoders").
* ``build_fcn8s``: the fully convolutional network of Long, Shelhamer &
  Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation"
  (CVPR), with class scores predicted at strides 32, 16 and 8 and fused by
  learned 2x upsampling (sec. 4.2, Fig. 3), on a chapter-4 backbone.
* ``build_unet``: U-Net of Ronneberger, Fischer & Brox 2015, "U-Net:
  Convolutional Networks for Biomedical Image Segmentation" (MICCAI): a
  contracting path, an expanding path and skip concatenations at every scale
  (sec. 2, Fig. 1), here with "same" padding so the output has the input size.

Models are found by name through ``get_model(name, input_shape, num_classes)``
(``"unet"``, ``"fcn8s"``, ``"fcn8s_vgg16"``), which is what
``train_unet.py --model`` reads.

Run the tests: ``python -m pytest -q tests/test_ch06_models.py``.
"""

from __future__ import annotations

import numpy as np
import keras
from keras import layers

PACKAGE = "ch06_segmentation"


# ---------------------------------------------------------------------------
# Transposed convolution, by hand
# ---------------------------------------------------------------------------

def transposed_conv_output_size(input_size: int, kernel_size: int, stride: int,
                                padding: str) -> int:
    """Length of one spatial axis after a transposed convolution (Keras' convention).

    "valid": input value ``i`` writes a kernel copy starting at ``i * stride``,
    so the copies span ``(input_size - 1) * stride + kernel_size`` pixels; when
    the stride is larger than the kernel, Keras also keeps the empty gap
    after the last copy, so the length is ``(input_size - 1) * stride +
    max(kernel_size, stride)``. "same": exactly ``input_size * stride`` (the
    inverse of a "same" strided convolution, which divides by ``stride``).
    """
    if padding == "valid":
        return (input_size - 1) * stride + max(kernel_size, stride)
    if padding == "same":
        return input_size * stride
    raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")


def transposed_conv2d_by_hand(inputs, kernel, strides=1, padding="valid", bias=None):
    """Transposed 2-D convolution computed by scattering kernels, in NumPy.

    The operation reads like this: for every input pixel ``(i, j)`` and input
    channel, take the kernel, multiply it by the input value, and *add* it
    into the output with its top-left corner at ``(i * stride, j * stride)``.
    Where copies overlap (kernel larger than stride) they sum up; where the
    stride is larger than the kernel, gaps stay zero. That is exactly the
    gradient of an ordinary strided convolution with respect to its input,
    which is why it is called "transposed": as a matrix, it is the transpose
    of the convolution's matrix (Dumoulin & Visin 2016, sec. 4).

    Args:
      inputs: [batch, height, width, in_channels] (or [height, width,
        in_channels]) array.
      kernel: [kernel_height, kernel_width, out_channels, in_channels], the
        layout of ``keras.layers.Conv2DTranspose.kernel``.
      strides: int or (stride_y, stride_x).
      padding: "valid" (keep every scattered copy) or "same" (crop to
        ``input_size * stride``, removing ``max(kernel - stride, 0) // 2``
        pixels at the top/left and the rest at the bottom/right, as
        TensorFlow does).
      bias: optional [out_channels] added to every output pixel.

    Returns:
      [batch, out_height, out_width, out_channels] float64 array (no batch
      axis if ``inputs`` had none); sizes from ``transposed_conv_output_size``.
    """
    if padding not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    inputs = np.asarray(inputs, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    squeeze = inputs.ndim == 3
    if squeeze:
        inputs = inputs[None]
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be [batch, height, width, channels], got shape {inputs.shape}")
    if kernel.ndim != 4 or kernel.shape[3] != inputs.shape[3]:
        raise ValueError(
            "kernel must be [kernel_height, kernel_width, out_channels, in_channels] with "
            f"in_channels={inputs.shape[3]}, got shape {kernel.shape}")
    stride_y, stride_x = (strides, strides) if isinstance(strides, int) else tuple(strides)
    batch, height, width, in_channels = inputs.shape
    kernel_height, kernel_width, out_channels, _ = kernel.shape

    # 1. Scatter: every input value adds a scaled kernel copy at (i*stride, j*stride).
    full = np.zeros((batch,
                     transposed_conv_output_size(height, kernel_height, stride_y, "valid"),
                     transposed_conv_output_size(width, kernel_width, stride_x, "valid"),
                     out_channels))
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                top, left = i * stride_y, j * stride_x
                for c in range(in_channels):
                    # A copy of the kernel, scaled by one input value: [kh, kw, out_channels]
                    full[b, top:top + kernel_height, left:left + kernel_width, :] += (
                        inputs[b, i, j, c] * kernel[:, :, :, c])

    # 2. "same": crop what the forward "same" convolution would have padded,
    # max(kernel - stride, 0) pixels per axis, the smaller half at the top/left.
    if padding == "same":
        crop_top = max(kernel_height - stride_y, 0) // 2
        crop_left = max(kernel_width - stride_x, 0) // 2
        full = full[:, crop_top:crop_top + height * stride_y, crop_left:crop_left + width * stride_x]
    outputs = full

    if bias is not None:
        outputs = outputs + np.asarray(bias, np.float64).reshape(1, 1, 1, out_channels)
    return outputs[0] if squeeze else outputs


@keras.saving.register_keras_serializable(package=PACKAGE)
class BilinearUpsampleInitializer(keras.initializers.Initializer):
    """Initialises a ``Conv2DTranspose`` kernel to bilinear interpolation.

    FCN initialises its in-network upsampling layers to bilinear
    interpolation and then lets them learn (Long et al. 2015, sec. 3.3). Each
    output channel is interpolated from the same input channel only (the
    kernel is diagonal over channels). For a factor-``f`` upsampling use
    ``kernel_size = 2 * f`` and ``strides = f`` with "same" padding.

    Kernel shape: [kernel_height, kernel_width, out_channels, in_channels].
    """

    def __call__(self, shape, dtype=None):
        kernel_height, kernel_width, out_channels, in_channels = shape
        def weights_1d(size):
            factor = (size + 1) // 2
            center = factor - 1 if size % 2 == 1 else factor - 0.5
            return 1.0 - np.abs(np.arange(size) - center) / factor
        filt = np.outer(weights_1d(kernel_height), weights_1d(kernel_width))
        kernel = np.zeros(shape, np.float32)
        for channel in range(min(out_channels, in_channels)):
            kernel[:, :, channel, channel] = filt
        return keras.ops.convert_to_tensor(kernel, dtype=dtype or "float32")

    def get_config(self):
        return {}


# ---------------------------------------------------------------------------
# Denoising autoencoder
# ---------------------------------------------------------------------------

def _conv_bn_relu(x, filters, name, strides=1, transpose=False, batch_norm=True):
    """3x3 (transposed) convolution, optional batch norm, ReLU."""
    conv = layers.Conv2DTranspose if transpose else layers.Conv2D
    x = conv(filters, 3, strides=strides, padding="same", use_bias=not batch_norm, name=name)(x)
    if batch_norm:
        # momentum 0.9: the moving statistics used at inference settle within a
        # few hundred steps (Keras' 0.99 needs thousands, longer than a CPU run).
        x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def build_denoising_autoencoder(input_shape=(64, 64, 3), filters=(32, 64), bottleneck_filters=64,
                                batch_norm=True, name="denoising_autoencoder") -> keras.Model:
    """A convolutional denoising autoencoder.

    Encoder: per entry of ``filters``, a 3x3 convolution followed by a
    stride-2 convolution (halves the size). Bottleneck: a 3x3 convolution
    with ``bottleneck_filters`` channels at 1/2**len(filters) resolution,
    the only path from input to output (no skips, so the network must
    summarise the image). Decoder: mirrored, each stage a stride-2
    ``Conv2DTranspose`` (doubles the size) and a 3x3 convolution. Every
    convolution is followed by batch normalisation (Ioffe & Szegedy 2015;
    it makes this plain stack train several times faster) and ReLU; a final
    3x3 convolution with a sigmoid keeps the output in [0, 1]. Trained with
    noisy input and clean target (Vincent et al. 2008), it learns to remove
    the noise.

    Input: [batch, H, W, C] in [0, 1] with H, W divisible by
    2**len(filters). Output: [batch, H, W, C] in [0, 1].
    """
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), got {tuple(input_shape)}")
    check_divisible(input_shape, 2 ** len(filters), "the denoising autoencoder")
    channels = input_shape[-1]
    inputs = keras.Input(shape=input_shape, name="noisy_image")
    x = inputs
    for level, width in enumerate(filters):
        x = _conv_bn_relu(x, width, f"encoder{level}_conv", batch_norm=batch_norm)
        x = _conv_bn_relu(x, width, f"encoder{level}_down", strides=2,
                          batch_norm=batch_norm)  # [batch, H/2**(level+1), W/2**(level+1), width]
    x = _conv_bn_relu(x, bottleneck_filters, "bottleneck", batch_norm=batch_norm)
    for level, width in reversed(list(enumerate(filters))):
        x = _conv_bn_relu(x, width, f"decoder{level}_up", strides=2, transpose=True,
                          batch_norm=batch_norm)  # doubles height and width
        x = _conv_bn_relu(x, width, f"decoder{level}_conv", batch_norm=batch_norm)
    outputs = layers.Conv2D(channels, 3, padding="same", activation="sigmoid", name="denoised_image")(x)
    return keras.Model(inputs, outputs, name=name)


# ---------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------

def check_divisible(input_shape, factor: int, model_name: str, argument: str = "input_shape"):
    """ValueError unless the static height and width are multiples of ``factor``."""
    if len(input_shape) != 3:
        raise ValueError(f"{argument} must be (height, width, channels), got {tuple(input_shape)}")
    for axis_name, size in zip(("height", "width"), input_shape[:2]):
        if size is not None and (size <= 0 or size % factor):
            raise ValueError(
                f"{model_name} needs {argument} height and width divisible by {factor}; "
                f"got {axis_name}={size} in {argument}={tuple(input_shape)}. "
                f"Resize or pad the images to a multiple of {factor} (e.g. "
                f"{max(factor, (size // factor) * factor)}).")


def unet_conv_block(x, filters: int, name: str, batch_norm: bool = True):
    """Two 3x3 convolutions, each followed by (batch norm and) ReLU.

    The U-Net unit of Ronneberger et al. 2015, sec. 2; batch normalisation
    (Ioffe & Szegedy 2015) is a later addition that makes training faster.
    [batch, H, W, C] -> [batch, H, W, filters].
    """
    for index in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm,
                          name=f"{name}_conv{index}")(x)
        if batch_norm:
            x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
        x = layers.ReLU(name=f"{name}_relu{index}")(x)
    return x


def build_unet(input_shape=(64, 64, 3), num_classes=6, depth=4, base_filters=64,
               batch_norm=True, dropout=0.0, name="unet") -> keras.Model:
    """U-Net (Ronneberger et al. 2015, Fig. 1) with configurable depth and width.

    Contracting path: ``depth`` levels, each a conv block then 2x2 max
    pooling; the number of filters doubles at each level (``base_filters``,
    2x, 4x, ...; the paper uses 64 and depth 4). Bottleneck: a conv block with
    ``base_filters * 2**depth`` filters. Expanding path: per level a 2x2
    stride-2 transposed convolution ("up-convolution") halving the filters,
    concatenation with the encoder feature map of the same size (the skip
    that brings back the fine detail pooling threw away), and a conv block.
    A 1x1 convolution gives the class scores.

    The paper uses unpadded convolutions and crops the skips; here every
    convolution uses "same" padding so the output has the input's size, which
    requires height and width divisible by ``2**depth`` (ValueError
    otherwise).

    Input: [batch, H, W, C]. Output: logits [batch, H, W, num_classes].
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if base_filters < 1:
        raise ValueError(f"base_filters must be >= 1, got {base_filters}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    check_divisible(input_shape, 2 ** depth, f"U-Net of depth {depth}")

    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    skips = []
    for level in range(depth):
        x = unet_conv_block(x, base_filters * 2 ** level, f"down{level}", batch_norm)
        skips.append(x)  # [batch, H/2**level, W/2**level, base_filters*2**level]
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    x = unet_conv_block(x, base_filters * 2 ** depth, "bottleneck", batch_norm)
    if dropout:
        # The paper puts dropout at the end of the contracting path (sec. 3.1).
        x = layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        filters = base_filters * 2 ** level
        x = layers.Conv2DTranspose(filters, 2, strides=2, padding="same",
                                   name=f"up{level}_upconv")(x)  # [batch, H/2**level, W/2**level, filters]
        x = layers.Concatenate(name=f"up{level}_concat")([skips[level], x])  # 2 * filters channels
        x = unet_conv_block(x, filters, f"up{level}", batch_norm)
    logits = layers.Conv2D(num_classes, 1, name="class_logits")(x)  # [batch, H, W, num_classes]
    return keras.Model(inputs, logits, name=name)


# ---------------------------------------------------------------------------
# FCN-8s
# ---------------------------------------------------------------------------

# Layer names of the paper's skip taps in chapter 4's VGG-16 (keras.applications
# naming): pool3 (stride 8), pool4 (stride 16), pool5 (stride 32).
VGG_FCN_TAPS = ("block3_pool", "block4_pool", "block5_pool")


def get_fcn_features(backbone: str, input_shape, **options) -> keras.Model:
    """A chapter-4 backbone as image -> [stride-8, stride-16, stride-32] feature maps.

    VGG-16/19: the paper's taps pool3, pool4 and pool5, taken by name from
    ``ch04_classification.models.get_model(name, include_top=False)``.
    Other backbones (``resnet_small``, ``resnet18``, ``mobilenet_v2``, ...):
    ``get_feature_pyramid(name, strides=(8, 16, 32))``, the deepest layer at
    each stride. ``options`` go to the chapter-4 builder (e.g.
    ``weights="imagenet"``, or ``filters=(16, 32, 64, 128)`` for resnet_small).
    """
    from ch04_classification import models as ch04_models

    if backbone in ("vgg16", "vgg19"):
        vgg = ch04_models.get_model(backbone, input_shape, None, include_top=False, **options)
        taps = [vgg.get_layer(name).output for name in VGG_FCN_TAPS]
        return keras.Model(vgg.input, taps, name=f"{backbone}_fcn_taps")
    if backbone not in ch04_models.BACKBONE_NAMES:
        raise ValueError(f"backbone must be one of {ch04_models.BACKBONE_NAMES}, got {backbone!r}")
    pyramid = ch04_models.get_feature_pyramid(backbone, input_shape, strides=(8, 16, 32), **options)
    taps = [pyramid.output[f"stride_{stride}"] for stride in (8, 16, 32)]
    return keras.Model(pyramid.input, taps, name=f"{backbone}_fcn_taps")


def build_fcn8s(input_shape=(64, 64, 3), num_classes=6, backbone="resnet_small", head_filters=None,
                dropout=0.5, name="fcn8s", **backbone_options) -> keras.Model:
    """FCN-8s (Long, Shelhamer & Darrell 2015, sec. 4.2 and Fig. 3).

    1. A classification backbone turned fully convolutional gives features at
       strides 8 (pool3), 16 (pool4) and 32 (pool5).
    2. On pool5, the classifier's fully connected layers become convolutions
       ("fc6" 7x7 and "fc7" 1x1, 4096 filters in the paper; ``head_filters``
       here, 7x7 shrunk to 3x3 for small inputs) and a 1x1 convolution scores
       every class: the coarse stride-32 prediction (FCN-32s).
    3. 1/32 -> 1/16: the scores are upsampled 2x by a learned transposed
       convolution (initialised to bilinear) and added to 1x1 class scores
       computed from pool4 (FCN-16s).
    4. 1/16 -> 1/8: the same with pool3 (FCN-8s).
    5. A fixed 8x bilinear upsampling brings the stride-8 scores to the
       input resolution (sec. 3.3: the last upsampling stays bilinear).

    The pool3/pool4 score layers start at zero, as in the paper, so training
    starts from the coarse prediction and learns how much detail to add.

    Input: [batch, H, W, C], H and W divisible by 32. Output: logits
    [batch, H, W, num_classes].
    """
    check_divisible(input_shape, 32, "FCN-8s")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if head_filters is None:
        head_filters = 4096 if backbone in ("vgg16", "vgg19") else 256
    # The backbone's own graph is extended (not wrapped as a sub-model), so
    # every layer of the FCN is visible in model.summary().
    features = get_fcn_features(backbone, input_shape, **backbone_options)
    inputs = features.input
    pool3, pool4, pool5 = features.output  # strides 8, 16, 32
    fc6_size = 7 if backbone in ("vgg16", "vgg19") and (input_shape[0] or 224) >= 224 else 3
    x = layers.Conv2D(head_filters, fc6_size, padding="same", activation="relu", name="fc6")(pool5)
    x = layers.Dropout(dropout, name="drop6")(x)
    x = layers.Conv2D(head_filters, 1, activation="relu", name="fc7")(x)
    x = layers.Dropout(dropout, name="drop7")(x)
    score32 = layers.Conv2D(num_classes, 1, name="score_fr")(x)  # [batch, H/32, W/32, classes]

    upscore2 = layers.Conv2DTranspose(num_classes, 4, strides=2, padding="same", use_bias=False,
                                      kernel_initializer=BilinearUpsampleInitializer(),
                                      name="upscore2")(score32)  # [batch, H/16, W/16, classes]
    score_pool4 = layers.Conv2D(num_classes, 1, kernel_initializer="zeros",
                                name="score_pool4")(pool4)
    fuse16 = layers.Add(name="fuse_pool4")([upscore2, score_pool4])

    upscore_pool4 = layers.Conv2DTranspose(num_classes, 4, strides=2, padding="same", use_bias=False,
                                           kernel_initializer=BilinearUpsampleInitializer(),
                                           name="upscore_pool4")(fuse16)  # [batch, H/8, W/8, classes]
    score_pool3 = layers.Conv2D(num_classes, 1, kernel_initializer="zeros",
                                name="score_pool3")(pool3)
    fuse8 = layers.Add(name="fuse_pool3")([upscore_pool4, score_pool3])

    # The paper fixes the final upsampling to bilinear and learns the others (sec. 3.3).
    logits = layers.Conv2DTranspose(num_classes, 16, strides=8, padding="same", use_bias=False,
                                    kernel_initializer=BilinearUpsampleInitializer(), trainable=False,
                                    name="upscore8")(fuse8)  # [batch, H, W, classes]
    return keras.Model(inputs, logits, name=name)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

MODEL_NAMES = ("unet", "fcn8s", "fcn8s_vgg16", "denoising_autoencoder")


def get_model(name: str, input_shape, num_classes: int = 6, **options) -> keras.Model:
    """Build a chapter-6 model by name.

    "unet" -> ``build_unet``; "fcn8s" -> ``build_fcn8s`` with the small CPU
    backbone (``backbone=`` picks another); "fcn8s_vgg16" -> FCN-8s on VGG-16
    as in the paper; "denoising_autoencoder" -> ``build_denoising_autoencoder``
    (``num_classes`` ignored).
    """
    if name == "unet":
        return build_unet(input_shape, num_classes, **options)
    if name == "fcn8s":
        return build_fcn8s(input_shape, num_classes, **options)
    if name == "fcn8s_vgg16":
        options.setdefault("backbone", "vgg16")
        return build_fcn8s(input_shape, num_classes, **options)
    if name == "denoising_autoencoder":
        return build_denoising_autoencoder(input_shape, **options)
    raise ValueError(f"model name must be one of {MODEL_NAMES}, got {name!r}")
