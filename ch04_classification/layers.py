"""Custom layers of the chapter-4 model zoo.

What this file teaches:
- `ImageNetPreprocessing`: the input conventions that ImageNet weights were trained with ("caffe"
  BGR mean subtraction for ResNet/VGG, "tf" scaling to [-1, 1] for MobileNet, "torch"
  standardization for EfficientNet), written as a layer so a model built for our data contract (RGB
  images in [0, 1]) can use those weights.
- `LocalResponseNormalization`: AlexNet's brightness normalization across neighbouring channels
  (Krizhevsky, Sutskever & Hinton 2012, sec. 3.3).
- LeNet-5's own layers (LeCun et al. 1998): `ScaledTanh`, `TrainableSubsampling` (S2/S4),
  `ConnectionTableConv2D` (C3 with the partial connections of Table I) and `EuclideanRBF`
  (the output layer).

All layers are registered for `.keras` serialization and work under `tf.function`/XLA.
Run the tests with `python -m pytest -q tests/test_ch04_models.py`.
"""

import keras
import numpy as np
import tensorflow as tf

PACKAGE = "ch04_classification"

# Per-channel statistics used by keras.applications.imagenet_utils.preprocess_input.
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)  # on the 0-255 scale, BGR order
_TORCH_RGB_MEAN = (0.485, 0.456, 0.406)
_TORCH_RGB_STD = (0.229, 0.224, 0.225)

PREPROCESSING_MODES = ("caffe", "tf", "torch", "scale_255", "none")


@keras.saving.register_keras_serializable(package=PACKAGE)
class ImageNetPreprocessing(keras.layers.Layer):
    """Map RGB images in [0, 1] to the input range that ImageNet weights expect.

    Input:  float [batch, height, width, 3], RGB in [0, 1] (the repo's classification contract).
    Output: float [batch, height, width, 3] in the convention of `mode`:
      - "caffe": BGR, 0-255, ImageNet mean subtracted (ResNet v1, VGG; He et al. 2016 and
        Simonyan & Zisserman 2015 trained in Caffe);
      - "tf": RGB scaled to [-1, 1] (MobileNet v1/v2);
      - "torch": RGB standardized with the ImageNet mean/std;
      - "torch": also EfficientNet (keras.applications normalizes inside its model; ours does not);
      - "scale_255": RGB 0-255;
      - "none": unchanged.
    Equal to `keras.applications.imagenet_utils.preprocess_input(255 * images, mode=...)`.
    """

    def __init__(self, mode="caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(f"mode must be one of {PREPROCESSING_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, images):
        images = tf.cast(images, self.compute_dtype)
        if self.mode == "caffe":
            bgr = images[..., ::-1] * 255.0
            return bgr - tf.constant(_CAFFE_BGR_MEAN, dtype=bgr.dtype)
        if self.mode == "tf":
            return images * 2.0 - 1.0
        if self.mode == "torch":
            mean = tf.constant(_TORCH_RGB_MEAN, dtype=images.dtype)
            std = tf.constant(_TORCH_RGB_STD, dtype=images.dtype)
            return (images - mean) / std
        if self.mode == "scale_255":
            return images * 255.0
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class LocalResponseNormalization(keras.layers.Layer):
    """Local response normalization across channels (Krizhevsky et al. 2012, sec. 3.3).

    b[c] = a[c] / (k + alpha * sum_{c' = c - n/2 .. c + n/2} a[c']^2) ** beta

    with the paper's constants k=2, n=5, alpha=1e-4, beta=0.75. The sum runs over `depth` = n
    neighbouring channels (clipped at the ends), i.e. `n // 2` channels on each side.

    Mapping to `tf.nn.local_response_normalization(x, depth_radius, bias, alpha, beta)`, which
    computes x / (bias + alpha * sum_{d - depth_radius .. d + depth_radius} x^2) ** beta:
    depth_radius = n // 2 = 2, bias = k, alpha = alpha (the paper does not divide alpha by n;
    Caffe does).

    Input and output: float [batch, height, width, channels]. No weights.
    """

    def __init__(self, depth=5, bias=2.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        if int(depth) != depth or depth < 1 or depth % 2 == 0:
            raise ValueError(
                f"depth must be a positive odd integer (the paper's n=5), got {depth!r}"
            )
        self.depth = int(depth)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        # Written out (instead of calling tf.nn.local_response_normalization) so the lesson is
        # visible; the tests check it against the TF op. Sum of squares over a window of channels =
        # a 1-D "box filter" along the channel axis, done here with a cumulative sum.
        squared = tf.square(inputs)  # [batch, height, width, channels]
        radius = self.depth // 2
        padded = tf.pad(squared, [[0, 0], [0, 0], [0, 0], [radius + 1, radius]])
        cumulative = tf.cumsum(padded, axis=-1)  # [batch, height, width, channels + 2 * radius + 1]
        # [b, h, w, channels]
        window_sum = cumulative[..., self.depth:] - cumulative[..., : -self.depth]
        return inputs / tf.pow(self.bias + self.alpha * window_sum, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"depth": self.depth, "bias": self.bias, "alpha": self.alpha, "beta": self.beta}
        )
        return config


# --------------------------------------------------------------------------------------------------
# LeNet-5 (LeCun, Bottou, Bengio & Haffner, "Gradient-Based Learning Applied to Document
# Recognition", Proc. IEEE 1998, sec. II-B and Appendix A)
# --------------------------------------------------------------------------------------------------

# Table I: which S2 feature maps (rows 0-5) feed each C3 feature map (columns 0-15). Breaking
# the symmetry makes different maps extract different features and keeps the connections few.
LENET_C3_CONNECTIONS = (
    (0, 1, 2), (1, 2, 3), (2, 3, 4), (3, 4, 5), (4, 5, 0), (5, 0, 1),
    (0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 0), (4, 5, 0, 1), (5, 0, 1, 2),
    (0, 1, 3, 4), (1, 2, 4, 5), (0, 2, 3, 5),
    (0, 1, 2, 3, 4, 5),
)  # fmt: skip


@keras.saving.register_keras_serializable(package=PACKAGE)
class ScaledTanh(keras.layers.Layer):
    """LeNet-5's squashing function f(a) = A tanh(S a), A = 1.7159, S = 2/3 (LeCun 1998, App. A).

    A is chosen so that f(1) = 1 and f(-1) = -1. Input and output: any shape. No weights.
    """

    def __init__(self, amplitude=1.7159, slope=2.0 / 3.0, **kwargs):
        super().__init__(**kwargs)
        self.amplitude = float(amplitude)
        self.slope = float(slope)

    def call(self, inputs):
        return self.amplitude * tf.tanh(self.slope * inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"amplitude": self.amplitude, "slope": self.slope})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class TrainableSubsampling(keras.layers.Layer):
    """LeNet-5's subsampling layers S2/S4 (LeCun et al. 1998, sec. II-B).

    "The four inputs to a unit in S2 are added, then multiplied by a trainable coefficient, and
    added to a trainable bias": y[c] = coefficient[c] * sum_{2x2} x[c] + bias[c]; 2 parameters per
    feature map. (The squashing function is a separate ScaledTanh layer.) Input [batch, H, W, C] ->
    output [batch, H/2, W/2, C].
    """

    def __init__(self, pool_size=2, **kwargs):
        super().__init__(**kwargs)
        self.pool_size = int(pool_size)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.coefficient = self.add_weight(
            name="coefficient", shape=(channels,), initializer="ones"
        )
        self.bias = self.add_weight(name="bias", shape=(channels,), initializer="zeros")

    def call(self, inputs):
        window = self.pool_size
        # sum of the window
        summed = tf.nn.avg_pool2d(inputs, window, window, "VALID") * float(window * window)
        return summed * self.coefficient + self.bias

    def compute_output_shape(self, input_shape):
        height, width = input_shape[1], input_shape[2]
        return (
            input_shape[0],
            None if height is None else height // self.pool_size,
            None if width is None else width // self.pool_size,
            input_shape[3],
        )

    def get_config(self):
        config = super().get_config()
        config.update({"pool_size": self.pool_size})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConnectionTableConv2D(keras.layers.Layer):
    """LeNet-5's C3: a "valid" convolution in which output map i sees only `connections[i]`.

    Holds one kernel [k, k, len(connections[i]), 1] and one bias per output map, so the parameter
    count is that of the paper: sum_i (k * k * len(connections[i]) + 1) = 1,516 for C3 (Table I,
    sec. II-B). Input [batch, H, W, C_in] -> output [batch, H - k + 1, W - k + 1, len(connections)].
    """

    def __init__(self, connections=LENET_C3_CONNECTIONS, kernel_size=5, **kwargs):
        super().__init__(**kwargs)
        self.connections = tuple(tuple(int(index) for index in inputs) for inputs in connections)
        self.kernel_size = int(kernel_size)

    def build(self, input_shape):
        input_channels = input_shape[-1]
        if any(
            index < 0 or index >= input_channels for inputs in self.connections for index in inputs
        ):
            raise ValueError(
                f"connections refer to input maps outside 0..{input_channels - 1}: "
                f"{self.connections}",
            )
        self.kernels = [
            self.add_weight(
                name=f"kernel_{output_index}",
                shape=(self.kernel_size, self.kernel_size, len(inputs), 1),
                initializer="glorot_uniform",
            )
            for output_index, inputs in enumerate(self.connections)
        ]
        self.bias = self.add_weight(
            name="bias", shape=(len(self.connections),), initializer="zeros"
        )

    def call(self, inputs):
        outputs = []
        for kernel, input_indices in zip(self.kernels, self.connections):
            selected = tf.gather(inputs, input_indices, axis=-1)  # [b, H, W, len(input_indices)]
            # [b, H-k+1, W-k+1, 1]
            outputs.append(tf.nn.conv2d(selected, kernel, strides=1, padding="VALID"))
        return tf.concat(outputs, axis=-1) + self.bias

    def compute_output_shape(self, input_shape):
        shrink = self.kernel_size - 1
        height, width = input_shape[1], input_shape[2]
        return (
            input_shape[0],
            None if height is None else height - shrink,
            None if width is None else width - shrink,
            len(self.connections),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "connections": [list(inputs) for inputs in self.connections],
                "kernel_size": self.kernel_size,
            },
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class EuclideanRBF(keras.layers.Layer):
    """LeNet-5's output: one Euclidean radial basis function unit per class (sec. II-B, eq. 7).

    y_i = sum_j (x_j - w_ij)^2, the distance between the 84-d F6 output and the class's fixed code
    w_i (the paper draws the codes as stylized 7x12 bitmaps of +1/-1; here a seeded random +1/-1
    code, also fixed, i.e. non-trainable). This layer returns -y / 2 so that larger means "more
    likely" and a softmax on it can be trained with cross-entropy (the paper used its own MAP
    criterion, sec. II-C). Input [batch, features] -> output [batch, num_classes].
    """

    def __init__(self, num_classes, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.seed = int(seed)

    def build(self, input_shape):
        features = input_shape[-1]
        codes = np.random.default_rng(self.seed).choice(
            [-1.0, 1.0], size=(features, self.num_classes)
        )
        self.codes = self.add_weight(
            name="codes", shape=(
                features, self.num_classes
            ), initializer=keras.initializers.Constant(codes),
            trainable=False,
        )

    def call(self, inputs):
        # ||x - w||^2 = ||x||^2 - 2 x.w + ||w||^2, for all classes at once.
        squared_distance = (
            tf.reduce_sum(tf.square(inputs), axis=-1, keepdims=True)
            - 2.0 * tf.matmul(inputs, self.codes)
            + tf.reduce_sum(tf.square(self.codes), axis=0)
        )  # [batch, num_classes]
        return -0.5 * squared_distance

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "seed": self.seed})
        return config
