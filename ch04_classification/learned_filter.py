"""A filter learned instead of designed: gradient descent finds the Sobel filter on real photographs.

What this file teaches: the nine numbers of a 3x3 filter need not be chosen by hand (Sobel & Feldman
1968). Treat them as parameters, show the network the response you want, and back-propagation finds
them: here one 3x3 convolution (tf.nn.conv2d, no bias) starts from random weights and is trained by
gradient descent with momentum to minimise the mean squared difference between its output and the
Sobel response (computed by the NumPy `convolution.conv2d`) on scikit-learn's two bundled photographs
(china.jpg, flower.jpg, in grayscale; no download). Because the target is exactly a 3x3 filter's
output, the least-squares problem has the Sobel kernel as its solution, and the learned kernel ends
with a cosine similarity above 0.999 to it after a few hundred steps (about a second on a CPU). This is
the idea behind every convolutional layer in this repo: LeCun et al., "Backpropagation Applied to
Handwritten Zip Code Recognition" (Neural Computation 1989) learned their filters the same way.

Try it:
    python -m ch04_classification.learned_filter          # prints the learned kernel and its cosine
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from ch04_classification import convolution

SAMPLE_IMAGES = ("china.jpg", "flower.jpg")  # bundled with scikit-learn (sklearn.datasets)
# ITU-R BT.601 luma weights, the usual RGB -> gray conversion (also tf.image.rgb_to_grayscale's).
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


def grayscale_sample_images(names=SAMPLE_IMAGES, downsample: int = 4) -> list:
    """scikit-learn's sample photographs as grayscale float32 [H, W] arrays in [0, 1].

    Args:
        names: file names known to `sklearn.datasets.load_sample_image` ("china.jpg", "flower.jpg").
        downsample: keep every n-th pixel along both axes (the originals are 427 x 640); 1 keeps all.
    """
    from sklearn.datasets import load_sample_image  # bundled with scikit-learn, no download

    if isinstance(downsample, bool) or not isinstance(downsample, (int, np.integer)) or downsample < 1:
        raise ValueError(f"downsample must be a positive int, got {downsample!r}")
    if isinstance(names, str):
        names = (names,)
    images = []
    for name in names:
        if name not in SAMPLE_IMAGES:
            raise ValueError(f"names must be among {SAMPLE_IMAGES}, got {name!r}")
        rgb = load_sample_image(name).astype(np.float32) / 255.0  # [427, 640, 3]
        images.append((rgb @ LUMA_WEIGHTS)[::downsample, ::downsample])
    return images


def cosine_similarity(a, b) -> float:
    """cos(angle) between two arrays seen as vectors: 1 for the same direction, whatever the scale."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same number of elements, got {a.size} and {b.size}")
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else 0.0


def learn_filter(images, target_kernel, steps: int = 300, learning_rate: float = 0.5,
                 momentum: float = 0.9, seed: int = 0) -> dict:
    """Train one f x f convolution (no bias) to reproduce `target_kernel`'s response on `images`.

    Args:
        images: list of grayscale [H, W] arrays (or one [N, H, W] array) of the same size.
        target_kernel: [f, f], the designed filter whose output is the training target.
        steps: full-batch gradient-descent steps.
        learning_rate, momentum: of `keras.optimizers.SGD` (heavy-ball momentum, Polyak 1964).
        seed: seed of the random initial kernel (normal, std 0.1).
    Returns:
        {"kernel": learned [f, f] float64, "initial_kernel": [f, f], "losses": [steps] mean squared
        errors, "cosine": cosine similarity of the learned kernel to the target,
        "initial_cosine": the same before training}.
    """
    import keras

    target_kernel = np.asarray(target_kernel, np.float64)
    if target_kernel.ndim != 2 or target_kernel.shape[0] != target_kernel.shape[1]:
        raise ValueError(f"target_kernel must be a square [f, f] array, got shape {target_kernel.shape}")
    images = np.asarray(images, np.float32)
    if images.ndim != 3 or min(images.shape[1:]) < target_kernel.shape[0]:
        raise ValueError(f"images must be grayscale images of one size ([N, H, W], H and W >= f), "
                         f"got shape {images.shape}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    f = target_kernel.shape[0]
    # The target: what the designed filter gives, by the hand-written NumPy convolution.
    targets = np.stack([convolution.conv2d(image, target_kernel) for image in images])  # [N, H', W']
    inputs = tf.constant(images[..., None])  # [N, H, W, 1]
    targets = tf.constant(targets[..., None], tf.float32)  # [N, H - f + 1, W - f + 1, 1]

    initial = np.random.default_rng(seed).normal(0.0, 0.1, size=(f, f)).astype(np.float32)
    kernel = tf.Variable(initial[:, :, None, None])  # [f, f, in 1, out 1]: one filter, nine weights for f = 3
    optimizer = keras.optimizers.SGD(learning_rate, momentum=momentum)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            response = tf.nn.conv2d(inputs, kernel, strides=1, padding="VALID")
            loss = tf.reduce_mean(tf.square(response - targets))
        optimizer.apply_gradients([(tape.gradient(loss, kernel), kernel)])
        return loss

    losses = [float(train_step()) for _ in range(int(steps))]
    learned = kernel.numpy()[:, :, 0, 0].astype(np.float64)
    return {"kernel": learned, "initial_kernel": initial.astype(np.float64), "losses": np.array(losses),
            "cosine": cosine_similarity(learned, target_kernel),
            "initial_cosine": cosine_similarity(initial, target_kernel)}


if __name__ == "__main__":
    result = learn_filter(grayscale_sample_images(), convolution.edge_filter("sobel_vertical"))
    print("learned kernel:\n", np.round(result["kernel"], 3))
    print(f"cosine similarity to Sobel: {result['initial_cosine']:.3f} at the start, "
          f"{result['cosine']:.5f} after {len(result['losses'])} steps "
          f"(mean squared error {result['losses'][0]:.4f} -> {result['losses'][-1]:.2e})")
