"""Focal loss: cross-entropy that stops listening to the examples it already gets right.

Lin, Goyal, Girshick, He and Dollár 2017, "Focal Loss for Dense Object Detection", sec. 3.
A one-stage detector scores ~10^4-10^5 anchors per image and almost all of them are easy
background. Each easy negative has a small cross-entropy, but there are so many of them that
together they dominate the loss and the gradient. The focal loss multiplies the
cross-entropy by a *modulating factor* ``(1 - p_t)^gamma`` that vanishes for well-classified
examples::

    p_t     = p        if y = 1 else 1 - p           (p = sigmoid(logit))
    alpha_t = alpha    if y = 1 else 1 - alpha
    FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t)      (eq. 5; alpha = 0.25, gamma = 2, sec. 5.1)

With ``gamma = 2`` an easy negative at ``p_t = 0.9`` counts ``(1 - 0.9)^2 = 0.01`` times its
cross-entropy (and ``alpha_t = 0.75`` on top); at ``p_t = 0.968`` about 1000x less (sec. 3.2).
``gamma = 0`` gives the alpha-balanced cross-entropy (eq. 3). RetinaNet sums the loss over
all anchors and classes and divides by the number of anchors assigned to an object (sec. 4,
"Inference and Training"), not by the number of anchors: the easy negatives no longer need
a sampler.

Two ways to use it:

* ``sigmoid_focal_loss(labels, logits)``: the per-element loss (no reduction), and
  ``focal_loss(labels, logits, ...)``: summed and divided by ``max(1, number of positives)``,
  what ``retinanet.py`` calls;
* ``FocalLoss``: the same as a serializable ``keras.losses.Loss`` for ``model.compile``.

The per-element loss equals ``keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True,
alpha=alpha, gamma=gamma, from_logits=True)`` (Keras's weight is ``alpha`` for class 1 and
``1 - alpha`` for class 0, the paper's ``alpha_t``; Keras then averages over the last axis,
``tests/test_ch05_focal_loss.py`` compares element by element). It is computed from the logits
(``log p = -softplus(-x)``), so it stays exact where a probability would round to 0 or 1.

Try it::

    python -c "from ch05_detection.focal_loss import sigmoid_focal_loss as fl; \
print(fl([0.0], [-2.1972246]))"   # an easy negative, p = 0.1: 0.75 * 0.01 * -log(0.9) = 7.9e-4
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ch05_detection import targets

# Lin et al. 2017, sec. 5.1: "gamma = 2 works best ... alpha = 0.25".
DEFAULT_ALPHA = 0.25
DEFAULT_GAMMA = 2.0


def _check_options(alpha, gamma):
    if alpha is not None and not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"`alpha` must be None (no class balancing) or in [0, 1], got {alpha}")
    if float(gamma) < 0.0:
        raise ValueError(f"`gamma` must be >= 0 (0 = cross-entropy), got {gamma}")


def sigmoid_focal_loss(labels, logits, alpha=DEFAULT_ALPHA, gamma=DEFAULT_GAMMA):
    """Per-element sigmoid focal loss ``-alpha_t (1 - p_t)^gamma log(p_t)`` (Lin et al. 2017,
    eq. 5).

    Args:
        labels: ``[...]`` targets in [0, 1] (1 = this class is present, 0 = it is not).
        logits: ``[...]`` raw scores (``p = sigmoid(logits)``), the same shape.
        alpha: weight of the positives (``1 - alpha`` for the negatives); ``None`` for no
            class balancing (both weighted 1).
        gamma: focusing parameter; 0 gives (alpha-balanced) binary cross-entropy.
    Returns:
        ``[...]`` float32 loss per element.
    """
    _check_options(alpha, gamma)
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.float32)
    # Cross-entropy -log(p_t) from the logits: -log p = softplus(-x), -log(1 - p) = softplus(x).
    cross_entropy = labels * tf.nn.softplus(-logits) + (1.0 - labels) * tf.nn.softplus(logits)
    # 1 - p_t without the cancellation of 1 - (something close to 1): 1 - p = sigmoid(-x).
    one_minus_p_t = labels * tf.sigmoid(-logits) + (1.0 - labels) * tf.sigmoid(logits)
    loss = tf.pow(one_minus_p_t, float(gamma)) * cross_entropy  # 0^0 = 1: gamma = 0 is CE
    if alpha is not None:
        alpha_t = labels * alpha + (1.0 - labels) * (1.0 - alpha)
        loss = alpha_t * loss
    return loss


def positive_count(labels, weights=None):
    """Number of positive elements (``labels == 1``) of a batch, floored at 1: the normaliser.

    Averaged over the replicas under ``tf.distribute`` (``targets.mean_over_replicas``), so
    every replica divides by the same number.
    """
    positives = tf.cast(tf.equal(tf.cast(labels, tf.float32), 1.0), tf.float32)
    if weights is not None:
        positives = positives * tf.cast(weights, tf.float32)
    return tf.maximum(targets.mean_over_replicas(tf.reduce_sum(positives)), 1.0)


def focal_loss(labels, logits, alpha=DEFAULT_ALPHA, gamma=DEFAULT_GAMMA, weights=None,
               num_positives=None):
    """RetinaNet's classification loss: the focal loss summed and divided by the positives.

    Lin et al. 2017, sec. 4: "the total focal loss of an image is computed as the sum of the
    focal loss over all ~100k anchors, normalized by the number of anchors assigned to a
    ground-truth box".

    Args:
        labels: ``[...]`` targets in [0, 1] (e.g. ``[batch, anchors, classes]`` one-hot rows,
            all zeros for background anchors).
        logits: ``[...]`` the same shape.
        alpha, gamma: see ``sigmoid_focal_loss`` (``alpha=None, gamma=0``: plain BCE).
        weights: optional ``[...]`` broadcastable weights (0 for ignored anchors).
        num_positives: the normaliser; default ``max(1, number of labels equal to 1)`` (with
            one-hot rows: the positive anchors).
    Returns:
        scalar float32.
    """
    loss = sigmoid_focal_loss(labels, logits, alpha, gamma)
    if weights is not None:
        loss = loss * tf.cast(weights, tf.float32)
    if num_positives is None:
        num_positives = positive_count(labels, weights)
    return tf.reduce_sum(loss) / tf.cast(num_positives, tf.float32)


@keras.saving.register_keras_serializable(package="ch05_detection")
class FocalLoss(keras.losses.Loss):
    """The sigmoid focal loss as a Keras loss (Lin et al. 2017, eq. 5), from logits.

    ``FocalLoss()(y_true, logits)`` is ``focal_loss``: the sum over every element divided by
    ``max(1, number of y_true == 1)`` in the batch. Each element's loss is divided by that
    batch count in ``call`` and the default reduction is ``"sum"``; with ``reduction=None``
    the result is the per-element loss already divided by it (``normalize=False``: not divided).

    Args:
        alpha: weight of the positives (None: no balancing); gamma: focusing parameter.
        normalize: divide by the number of positives (RetinaNet) or not.
        reduction, name, dtype: as ``keras.losses.Loss``.
    """

    def __init__(self, alpha=DEFAULT_ALPHA, gamma=DEFAULT_GAMMA, normalize=True,
                 reduction="sum", name="focal_loss", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        _check_options(alpha, gamma)
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        loss = sigmoid_focal_loss(y_true, y_pred, self.alpha, self.gamma)
        if self.normalize:
            loss = loss / positive_count(y_true)
        return loss

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, gamma=self.gamma, normalize=self.normalize)
        return config
