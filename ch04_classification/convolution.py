"""Convolution and pooling by hand, in NumPy: what a convolutional layer computes.

What this file teaches: the operation inside every `keras.layers.Conv2D`, written out so that each
output number can be traced to the pixels it came from, with no TensorFlow inside. The tests hold it
to the library (`tf.nn.conv2d`, `keras.layers.MaxPooling2D` / `AveragePooling2D`,
`Conv2D.count_params()`, `scipy.signal.convolve2d`, `scipy.ndimage.sobel`, `cv2.Scharr`).

    conv2d(image, kernels, stride=1, padding=0)      deep learning's "convolution" (cross-correlation)
    true_convolution(image, kernels, ...)            the same with the kernel flipped (signal processing)
    pool2d(image, size, stride=None, mode="max")     max or average pooling, channel by channel
    output_size(n, f, padding=0, stride=1)           floor((n + 2p - f) / s) + 1
    conv_parameters(f, channels_in, filters)         f * f * channels_in * filters + filters
    EDGE_FILTERS, edge_filter(name)                  vertical / horizontal, Sobel, Scharr

Conventions (the course's): an image is [H, W] or [H, W, C]; a kernel is [f, f] (one channel),
[f, f, C] (one filter across all C input channels) or [f, f, C, K] (a bank of K filters, what a
Conv2D layer with K filters holds). One output element of filter k is

    out[i, j, k] = sum over (u, v, c) of padded[i * s + u, j * s + v, c] * kernels[u, v, c, k]

where `padded` is the image with p rows / columns of zeros on every side. Deep learning calls this a
convolution; a mathematician calls it cross-correlation, because the kernel is not flipped
(`true_convolution` flips it: the two agree for symmetric kernels and differ by a sign for the
antisymmetric edge filters).

Padding: an int p, "valid" (p = 0) or "same" (p = (f - 1) / 2, f odd, so that stride 1 keeps the
size). With a stride of 1 this "same" equals TensorFlow's padding="SAME"; with a larger stride
TensorFlow pads only as much as the last window needs, mostly at the bottom / right, so the windows
start at a different place. This module always pads symmetrically, as in the lecture.

The edge filters come from Sobel & Feldman, "A 3x3 isotropic gradient operator for image
processing" (1968, presented at the Stanford AI Project) and Scharr, "Optimale Operatoren in der
digitalen Bildverarbeitung" (PhD thesis, Heidelberg 2000), whose weights 3-10-3 make the gradient's
direction more accurate. Pooling and the layer arithmetic follow LeCun et al., "Gradient-Based
Learning Applied to Document Recognition" (Proc. IEEE 1998, sec. II) and Dumoulin & Visin, "A guide to
convolution arithmetic for deep learning" (2016, relationship 6: o = floor((i + 2p - k) / s) + 1).

Try it:
    python -c "from ch04_classification import convolution as c; import numpy as np; \
image = np.array([[10, 10, 10, 0, 0, 0]] * 6); print(c.conv2d(image, c.edge_filter('vertical')))"
"""

from __future__ import annotations

import numpy as np

# --------------------------------------------------------------------------------------------------
# Named 3x3 edge filters. "vertical" responds to a vertical edge (brightness changing from left to
# right): positive where the left is brighter than the right, as in the lecture's 6x6 example.
# The "horizontal" ones are the same filters turned by 90 degrees: positive where the top is brighter.
# --------------------------------------------------------------------------------------------------
_VERTICAL = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], np.float64)  # Prewitt's weights
_SOBEL = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float64)  # Sobel & Feldman 1968
_SCHARR = np.array([[3, 0, -3], [10, 0, -10], [3, 0, -3]], np.float64)  # Scharr 2000

EDGE_FILTERS = {
    "vertical": _VERTICAL,
    "horizontal": _VERTICAL.T.copy(),
    "sobel_vertical": _SOBEL,
    "sobel_horizontal": _SOBEL.T.copy(),
    "scharr_vertical": _SCHARR,
    "scharr_horizontal": _SCHARR.T.copy(),
}
for _kernel in EDGE_FILTERS.values():
    _kernel.setflags(write=False)  # shared constants: edge_filter() hands out copies
POOL_MODES = ("max", "avg")


def edge_filter(name: str, dark_to_light: bool = False) -> np.ndarray:
    """A named 3x3 edge filter as a fresh float64 [3, 3] array.

    Args:
        name: one of EDGE_FILTERS: "vertical", "horizontal", "sobel_vertical", "sobel_horizontal",
            "scharr_vertical", "scharr_horizontal".
        dark_to_light: the other direction: the negated filter, positive where brightness
            *increases* from left to right ("..._vertical") or from top to bottom ("..._horizontal").
    """
    if name not in EDGE_FILTERS:
        raise ValueError(f"name must be one of {tuple(EDGE_FILTERS)}, got {name!r}")
    kernel = EDGE_FILTERS[name].copy()
    return -kernel if dark_to_light else kernel


# --------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_positive_int(value, name):
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _as_image(image) -> np.ndarray:
    """[H, W] or [H, W, C] numbers -> float64 [H, W, C]."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or not np.issubdtype(image.dtype, np.number) or image.dtype == bool:
        raise ValueError(f"image must be a numeric array of shape [H, W] or [H, W, C], got shape "
                         f"{image.shape} and dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if min(image.shape) < 1:
        raise ValueError(f"image must not be empty, got shape {image.shape}")
    return image.astype(np.float64)


def _as_kernels(kernels, channels: int):
    """[f, f], [f, f, C] or [f, f, C, K] -> (float64 [f, f, C, K], is_single_filter)."""
    kernels = np.asarray(kernels)
    if kernels.ndim not in (2, 3, 4) or not np.issubdtype(kernels.dtype, np.number):
        raise ValueError(f"kernels must be a numeric array of shape [f, f], [f, f, C] or [f, f, C, K], "
                         f"got shape {kernels.shape}")
    if kernels.shape[0] != kernels.shape[1] or kernels.shape[0] < 1:
        raise ValueError(f"kernels must be square (f x f with f >= 1), got shape {kernels.shape}")
    single = kernels.ndim < 4
    if kernels.ndim == 2:
        kernels = kernels[:, :, None]
    if kernels.ndim == 3:
        kernels = kernels[:, :, :, None]
    if kernels.shape[2] != channels:
        deeper = "deeper than" if kernels.shape[2] > channels else "shallower than"
        raise ValueError(f"kernels has {kernels.shape[2]} channel(s), {deeper} the image's {channels}: a "
                         f"filter must span all input channels, got kernels shape {kernels.shape}")
    if kernels.shape[3] < 1:
        raise ValueError(f"kernels must hold at least one filter, got shape {kernels.shape}")
    return kernels.astype(np.float64), single


def padding_amount(f: int, padding) -> int:
    """The p of `padding` for an f x f kernel: an int p >= 0, "valid" -> 0, "same" -> (f - 1) / 2."""
    f = _check_positive_int(f, "f")
    if _is_int(padding):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        return int(padding)
    if padding == "valid":
        return 0
    if padding == "same":
        if f % 2 == 0:
            raise ValueError(f'padding="same" needs an odd kernel size f (p = (f - 1) / 2 must be a whole '
                             f"number), got f = {f}")
        return (f - 1) // 2
    raise ValueError(f'padding must be an int >= 0, "valid" or "same", got {padding!r}')


def output_size(n: int, f: int, padding=0, stride: int = 1) -> int:
    """Output side of a convolution or pooling: floor((n + 2p - f) / s) + 1.

    Args:
        n: input side (height or width), f: kernel side, padding: int p, "valid" or "same",
        stride: s >= 1.
    Returns:
        the output side (>= 1). Raises ValueError when the kernel does not fit the padded input.
    (Dumoulin & Visin 2016, relationship 6.)
    """
    n = _check_positive_int(n, "n")
    stride = _check_positive_int(stride, "stride")
    p = padding_amount(f, padding)
    if n + 2 * p < f:
        raise ValueError(f"the {f}x{f} kernel does not fit the input of side {n} with padding {p} "
                         f"({n} + 2 * {p} < {f})")
    return (n + 2 * p - f) // stride + 1


def conv_parameters(f: int, channels_in: int, filters: int, use_bias: bool = True) -> int:
    """Trainable parameters of a Conv2D layer: f * f * channels_in * filters (+ filters biases).

    Independent of the image size: the same f x f x channels_in weights slide over every position.
    """
    f = _check_positive_int(f, "f")
    channels_in = _check_positive_int(channels_in, "channels_in")
    filters = _check_positive_int(filters, "filters")
    return f * f * channels_in * filters + (filters if use_bias else 0)


# --------------------------------------------------------------------------------------------------
# Convolution and pooling
# --------------------------------------------------------------------------------------------------
def _windows(image, f, stride):
    """Every f x f window of a [H, W, C] image at the given stride: [H', W', C, f, f] (a view, no copy)."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (f, f), axis=(0, 1))  # [H-f+1, W-f+1, C, f, f]
    return windows[::stride, ::stride]


def conv2d(image, kernels, stride: int = 1, padding=0) -> np.ndarray:
    """Deep learning's 2-D convolution (cross-correlation: the kernel is not flipped).

    Args:
        image: [H, W] or [H, W, C].
        kernels: [f, f] (needs a one-channel image), [f, f, C] (one filter) or [f, f, C, K] (K filters).
        stride: step s >= 1 between windows, the same along both axes.
        padding: int p >= 0 (zeros on every side), "valid" (p = 0) or "same" (p = (f - 1) / 2, f odd).
    Returns:
        float64 [H', W'] for one filter, [H', W', K] for a bank, with
        H' = floor((H + 2p - f) / s) + 1 (see `output_size`) and likewise W'.
    """
    image = _as_image(image)
    kernels, single = _as_kernels(kernels, image.shape[2])
    f = kernels.shape[0]
    stride = _check_positive_int(stride, "stride")
    p = padding_amount(f, padding)
    out_height = output_size(image.shape[0], f, p, stride)
    out_width = output_size(image.shape[1], f, p, stride)
    padded = np.pad(image, ((p, p), (p, p), (0, 0)))  # zeros around, not across channels
    windows = _windows(padded, f, stride)[:out_height, :out_width]  # [H', W', C, f, f]
    # Multiply each window by each filter element-wise and add everything up:
    # out[i, j, k] = sum_{u, v, c} window[i, j, c, u, v] * kernels[u, v, c, k]
    output = np.einsum("ijcuv,uvck->ijk", windows, kernels)  # [H', W', K]
    return output[:, :, 0] if single else output


def true_convolution(image, kernels, stride: int = 1, padding=0) -> np.ndarray:
    """Convolution as defined in signal processing: `conv2d` with each kernel turned by 180 degrees.

    Same arguments and shapes as `conv2d`. The flip makes the operation associative
    ((I * A) * B = I * (A * B)), which deep learning does not need: a learned kernel can be stored
    flipped, so frameworks skip the flip and call cross-correlation "convolution".
    """
    kernels = np.asarray(kernels)
    if kernels.ndim < 2:
        raise ValueError(f"kernels must have shape [f, f], [f, f, C] or [f, f, C, K], got {kernels.shape}")
    return conv2d(image, kernels[::-1, ::-1], stride=stride, padding=padding)


def pool2d(image, size: int, stride: int | None = None, mode: str = "max") -> np.ndarray:
    """Max or average pooling of each channel on its own (no padding, "valid").

    Args:
        image: [H, W] or [H, W, C].
        size: side f of the pooling window.
        stride: step between windows (default: `size`, non-overlapping windows).
        mode: "max" keeps the strongest response in each window (is the feature there?),
            "avg" their mean (LeNet-5's subsampling, LeCun et al. 1998 sec. II-B).
    Returns:
        float64 [H', W'] or [H', W', C] with H' = floor((H - f) / s) + 1. Pooling has no
        parameters and keeps the number of channels.
    """
    was_2d = np.ndim(image) == 2
    image = _as_image(image)
    size = _check_positive_int(size, "size")
    stride = size if stride is None else _check_positive_int(stride, "stride")
    if mode not in POOL_MODES:
        raise ValueError(f"mode must be one of {POOL_MODES}, got {mode!r}")
    out_height = output_size(image.shape[0], size, 0, stride)
    out_width = output_size(image.shape[1], size, 0, stride)
    windows = _windows(image, size, stride)[:out_height, :out_width]  # [H', W', C, f, f]
    reduce = np.max if mode == "max" else np.mean
    output = reduce(windows, axis=(3, 4))  # [H', W', C]
    return output[:, :, 0] if was_2d else output
