"""Face verification with Siamese networks: a learned distance instead of a classifier.

What this file teaches: a softmax classifier has one output per person it was trained on, so it can
neither tell whether two photos of a *new* person match (verification, 1:1) nor recognise someone
from one gallery photo (one-shot recognition, 1:K). A Siamese network learns an embedding f(x) with
    d(x1, x2) = ||f(x1) - f(x2)||^2
small for photos of the same person and large otherwise; a threshold tau on d verifies, the nearest
gallery photo recognises. Two ways to train f (both share one encoder between the two "arms"):

* the **triplet loss** (Schroff et al. 2015, "FaceNet", eq. 1-3): for an anchor A, a positive P (same
  person) and a negative N (another person),
      L = max(0, d(A, P) - d(A, N) + alpha),
  with the triplets *mined inside the batch* (``triplet_loss``, mining "all", "hard" or "semi_hard");
* the **binary** Siamese network (Taigman et al. 2014, "DeepFace", sec. 4.2; Koch et al. 2015): the
  component-wise distance |f(x1) - f(x2)| goes into one logistic unit, trained with cross-entropy on
  same / different pairs (``PairwiseLogits`` + ``binary_pair_loss``).

Mining needs several photos of each person in a batch: ``pk_batch_indices`` draws P persons x K
photos (Hermans et al. 2017, "In Defense of the Triplet Loss for Person Re-Identification", sec. 2),
deterministically from (seed, epoch). Evaluation (``verification_pairs``, ``best_threshold``,
``roc_curve``, ``roc_auc``, ``one_shot_accuracy``) works on any distance, so the raw-pixel baseline
and both heads are scored the same way.

Use:
    encoder = build_encoder("resnet_small", (48, 48, 3), embedding_dim=64)  # images -> unit vectors
    encoder.compile("adam", loss=TripletLoss(margin=0.2, mining="semi_hard"))
    encoder.fit(pk_batches(images, labels, 16, 4, seed=0, first_epoch=0, epochs=10), ...)
    python ch04_classification/train_siamese.py --fast     # the whole recipe, see its docstring
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from ch04_classification import models

MINING = ("all", "hard", "semi_hard")


# --------------------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="ch04_classification")
class L2Normalize(keras.layers.Layer):
    """Scale each vector to unit length: [batch, dim] -> [batch, dim] with ||row||_2 = 1.

    FaceNet (Schroff et al. 2015, sec. 3) constrains the embedding to the unit hypersphere, so squared
    distances lie in [0, 4] and a margin alpha means the same thing throughout training.
    """

    def __init__(self, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs):
        squared = keras.ops.sum(keras.ops.square(inputs), axis=-1, keepdims=True)
        return inputs * keras.ops.rsqrt(keras.ops.maximum(squared, self.epsilon))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def build_encoder(backbone="resnet_small", input_shape=(48, 48, 3), embedding_dim=64, name=None,
                  **options):
    """A chapter-4 network without its classifier, pooled, projected and L2-normalised.

    images [batch, H, W, 3] in [0, 1] -> backbone (``models.get_model(include_top=False,
    pooling="avg")``) [batch, channels] -> Dense(embedding_dim) -> ``L2Normalize`` [batch, embedding_dim].

    Args:
      backbone: a name of ``models.MODEL_NAMES`` (e.g. "resnet_small", "resnet18", "mobilenet_v2").
      input_shape: (height, width, 3).
      embedding_dim: length of the embedding (FaceNet uses 128; small data need less).
      **options: passed to the backbone builder (e.g. ``weights=None``).
    """
    if backbone not in models.MODEL_NAMES:
        raise ValueError(f"backbone must be one of {models.MODEL_NAMES}, got {backbone!r}")
    if not isinstance(embedding_dim, (int, np.integer)) or embedding_dim < 1:
        raise ValueError(f"embedding_dim must be a positive int, got {embedding_dim!r}")
    features = models.get_model(backbone, input_shape, None, include_top=False, pooling="avg",
                                **options)
    x = keras.layers.Dense(int(embedding_dim), name="embedding_projection")(features.output)
    embeddings = L2Normalize(name="embedding")(x)  # [batch, embedding_dim], unit length
    return keras.Model(features.input, embeddings, name=name or f"{backbone}_encoder")


# --------------------------------------------------------------------------------------------------
# Distances and the triplet loss
# --------------------------------------------------------------------------------------------------

def pairwise_squared_distances(embeddings):
    """[batch, dim] -> [batch, batch] with entry (i, j) = ||e_i - e_j||^2 (>= 0, exactly 0 on the
    diagonal), from ||a||^2 - 2 a.b + ||b||^2."""
    embeddings = tf.convert_to_tensor(embeddings)
    dot = tf.matmul(embeddings, embeddings, transpose_b=True)
    squared_norms = tf.linalg.diag_part(dot)
    distances = squared_norms[:, None] - 2.0 * dot + squared_norms[None, :]
    distances = tf.maximum(distances, 0.0)  # round-off can make it slightly negative
    return distances * (1.0 - tf.eye(tf.shape(embeddings)[0], dtype=distances.dtype))


def _check_mining(mining):
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}")


def triplet_loss(labels, embeddings, margin=0.2, mining="all"):
    """The triplet loss with the triplets mined inside the batch; a scalar.

    For anchor a, positive p (same label, p != a) and negative n (other label), with d the squared L2
    distance: l(a, p, n) = max(0, d(a, p) - d(a, n) + margin) (FaceNet, eq. 1-3). Which triplets count:

    * ``"all"`` (batch-all, Hermans et al. 2017 sec. 2): every valid triplet; the mean is taken over the
      triplets whose loss is positive (the easy ones would only dilute it).
    * ``"hard"`` (batch-hard, Hermans et al. 2017 eq. 5): per anchor, its farthest positive and its nearest
      negative; the mean over anchors that have both.
    * ``"semi_hard"`` (FaceNet sec. 3.2): per (anchor, positive) pair, the nearest negative that is
      still farther than the positive but inside the margin, d(a, p) < d(a, n) < d(a, p) + margin; the
      mean over the pairs that have one. Negatives nearer than the positive are skipped (they can
      collapse training early on, FaceNet sec. 3.2).

    A batch without a valid triplet (one person, or every person once) gives 0, never NaN.

    Args:
      labels: int [batch] (or [batch, 1]) person ids.
      embeddings: float [batch, dim].
      margin: alpha >= 0.
      mining: "all", "hard" or "semi_hard".
    Returns:
      float scalar.
    """
    _check_mining(mining)
    embeddings = tf.convert_to_tensor(embeddings)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    distances = pairwise_squared_distances(embeddings)  # [B, B]
    dtype = distances.dtype
    margin = tf.cast(margin, dtype)
    batch = tf.shape(labels)[0]
    same = tf.equal(labels[:, None], labels[None, :])
    not_self = tf.logical_not(tf.eye(batch, dtype=tf.bool))
    positive = tf.logical_and(same, not_self)  # [B, B]: (a, p)
    negative = tf.logical_not(same)            # [B, B]: (a, n)

    if mining == "all":
        # [a, p, n] = d(a, p) - d(a, n) + margin over every valid triplet.
        losses = distances[:, :, None] - distances[:, None, :] + margin
        valid = tf.logical_and(positive[:, :, None], negative[:, None, :])
        losses = tf.where(valid, tf.nn.relu(losses), tf.zeros_like(losses))
        count = tf.reduce_sum(tf.cast(losses > 1e-16, dtype))
        return tf.math.divide_no_nan(tf.reduce_sum(losses), count)

    if mining == "hard":
        hardest_positive = tf.reduce_max(tf.where(positive, distances, tf.zeros_like(distances)), axis=1)
        infinity = tf.fill(tf.shape(distances), tf.cast(np.inf, dtype))
        hardest_negative = tf.reduce_min(tf.where(negative, distances, infinity), axis=1)
        valid = tf.logical_and(tf.reduce_any(positive, axis=1), tf.reduce_any(negative, axis=1))
        losses = tf.nn.relu(hardest_positive - tf.where(valid, hardest_negative,
                                                        tf.zeros_like(hardest_negative)) + margin)
        losses = tf.where(valid, losses, tf.zeros_like(losses))
        return tf.math.divide_no_nan(tf.reduce_sum(losses), tf.reduce_sum(tf.cast(valid, dtype)))

    # semi_hard: [a, p, n] candidates with d(a, p) < d(a, n) < d(a, p) + margin.
    d_ap = distances[:, :, None]
    d_an = distances[:, None, :]
    candidate = tf.logical_and(tf.logical_and(positive[:, :, None], negative[:, None, :]),
                               tf.logical_and(d_an > d_ap, d_an < d_ap + margin))
    infinity = tf.fill(tf.shape(candidate), tf.cast(np.inf, dtype))
    nearest = tf.reduce_min(tf.where(candidate, tf.broadcast_to(d_an, tf.shape(candidate)), infinity),
                            axis=2)                                     # [a, p]
    kept = tf.reduce_any(candidate, axis=2)                             # [a, p]
    losses = tf.where(kept, distances - tf.where(kept, nearest, tf.zeros_like(nearest)) + margin,
                      tf.zeros_like(distances))
    return tf.math.divide_no_nan(tf.reduce_sum(losses), tf.reduce_sum(tf.cast(kept, dtype)))


def triplet_fractions(labels, embeddings, margin=0.2):
    """How hard the triplets of a batch are (FaceNet sec. 3.2), as fractions of all valid triplets.

    Returns a dict: "easy" (d(a, n) >= d(a, p) + margin: no loss), "semi_hard" (d(a, p) < d(a, n) <
    d(a, p) + margin) and "hard" (d(a, n) <= d(a, p)), plus "triplets" (their number).
    """
    labels = np.reshape(np.asarray(labels), [-1])
    distances = pairwise_squared_distances(np.asarray(embeddings, np.float32)).numpy()
    same = labels[:, None] == labels[None, :]
    positive = same & ~np.eye(len(labels), dtype=bool)
    valid = positive[:, :, None] & ~same[:, None, :]
    d_ap, d_an = distances[:, :, None], distances[:, None, :]
    count = int(valid.sum())
    fractions = {"easy": valid & (d_an >= d_ap + margin),
                 "semi_hard": valid & (d_an > d_ap) & (d_an < d_ap + margin),
                 "hard": valid & (d_an <= d_ap)}
    result = {name: float(mask.sum()) / max(count, 1) for name, mask in fractions.items()}
    result["triplets"] = count
    return result


@keras.saving.register_keras_serializable(package="ch04_classification")
class TripletLoss(keras.losses.Loss):
    """``triplet_loss`` as a Keras loss: ``y_true`` = person ids [batch], ``y_pred`` = embeddings
    [batch, dim]; the batch's one value (the mining happens across the batch)."""

    def __init__(self, margin=0.2, mining="all", name="triplet_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        _check_mining(mining)
        if float(margin) < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        self.margin, self.mining = float(margin), mining

    def call(self, y_true, y_pred):
        return triplet_loss(tf.cast(y_true, tf.int32), y_pred, self.margin, self.mining)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin, "mining": self.mining}


# --------------------------------------------------------------------------------------------------
# The binary alternative: |f(x1) - f(x2)| -> logistic unit
# --------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="ch04_classification")
class PairwiseLogits(keras.layers.Layer):
    """The logistic unit of a binary Siamese network on every pair of a batch.

    logit(i, j) = w . |e_i - e_j| + b (DeepFace, Taigman et al. 2014, sec. 4.2, the weighted chi^2-free
    L1 variant; Koch et al. 2015 eq. 1). p(same) = sigmoid(logit). Learned w are typically negative: a
    larger difference means less likely the same person.

    Input embeddings [batch, dim] -> logits [batch, batch]. ``pair_logits(a, b)`` scores given pairs
    [n, dim] x [n, dim] -> [n].
    """

    def build(self, input_shape):
        dim = int(input_shape[-1])
        self.kernel = self.add_weight(name="kernel", shape=(dim,),
                                      initializer=keras.initializers.Constant(-1.0))
        self.bias = self.add_weight(name="bias", shape=(), initializer="zeros")

    def pair_logits(self, first, second):
        return keras.ops.sum(keras.ops.abs(first - second) * self.kernel, axis=-1) + self.bias

    def call(self, embeddings):
        difference = keras.ops.abs(embeddings[:, None, :] - embeddings[None, :, :])  # [B, B, dim]
        return keras.ops.sum(difference * self.kernel, axis=-1) + self.bias

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[0])


def binary_pair_loss(labels, logits):
    """Binary cross-entropy of the logistic unit on every pair (i < j) of a batch; a scalar.

    Target 1 for the same person, 0 otherwise. The batch has far more different than same pairs, so
    each class of pairs is averaged separately and the two means are averaged (balanced). A batch with
    no pair of one kind just uses the other; no pair at all gives 0.

    Args: labels int [batch]; logits float [batch, batch] (``PairwiseLogits``).
    """
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    logits = tf.convert_to_tensor(logits)
    batch = tf.shape(labels)[0]
    same = tf.cast(tf.equal(labels[:, None], labels[None, :]), logits.dtype)
    upper = tf.linalg.band_part(tf.ones([batch, batch], logits.dtype), 0, -1) - tf.eye(batch,
                                                                                         dtype=logits.dtype)
    losses = tf.nn.sigmoid_cross_entropy_with_logits(labels=same, logits=logits)
    positives, negatives = upper * same, upper * (1.0 - same)
    positive_mean = tf.math.divide_no_nan(tf.reduce_sum(losses * positives), tf.reduce_sum(positives))
    negative_mean = tf.math.divide_no_nan(tf.reduce_sum(losses * negatives), tf.reduce_sum(negatives))
    kinds = tf.cast(tf.reduce_sum(positives) > 0, logits.dtype) + tf.cast(tf.reduce_sum(negatives) > 0,
                                                                           logits.dtype)
    return tf.math.divide_no_nan(positive_mean + negative_mean, kinds)


@keras.saving.register_keras_serializable(package="ch04_classification")
class BinaryPairLoss(keras.losses.Loss):
    """``binary_pair_loss`` as a Keras loss: ``y_true`` person ids [batch], ``y_pred`` logits [batch, batch]."""

    def __init__(self, name="binary_pair_loss", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return binary_pair_loss(tf.cast(y_true, tf.int32), y_pred)


def build_binary_model(encoder, name="binary_siamese"):
    """images [batch, H, W, 3] -> logits [batch, batch] of "same person" for every pair of the batch:
    the shared ``encoder`` then ``PairwiseLogits`` (the layer is named "pair_head")."""
    logits = PairwiseLogits(name="pair_head")(encoder.output)
    return keras.Model(encoder.input, logits, name=name)


# --------------------------------------------------------------------------------------------------
# P persons x K photos per batch
# --------------------------------------------------------------------------------------------------

def pk_batch_indices(labels, identities_per_batch, images_per_identity, seed=0, epoch=0, passes=1):
    """One epoch of batches of P persons x K photos each, as indices into ``labels``.

    A pass shows every photo once: each person's photos are shuffled and cut into groups of K, and
    in round r (r = 0 .. fewest photos of a person // K - 1) every person contributes its r-th group,
    the persons shuffled and grouped P at a time (the last incomplete batch of a round dropped). A
    person with fewer than K photos gets some twice (one round). An epoch is ``passes`` passes, each
    grouped anew. A pure function of (labels, P, K, seed, epoch, passes), so a resumed run sees the
    same batches.

    Returns int64 [passes * rounds * (num_persons // P), P * K], the K photos of a person next to
    each other.
    """
    if not isinstance(passes, (int, np.integer)) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
    if passes > 1:
        return np.concatenate([pk_batch_indices(labels, identities_per_batch, images_per_identity, seed,
                                                epoch * passes + p) for p in range(passes)])
    labels = np.reshape(np.asarray(labels), [-1])
    for name, value in (("identities_per_batch", identities_per_batch),
                        ("images_per_identity", images_per_identity)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    persons = np.unique(labels)
    if len(persons) < identities_per_batch:
        raise ValueError(f"identities_per_batch={identities_per_batch} but the labels hold only "
                         f"{len(persons)} persons")
    rng = np.random.default_rng([int(seed), 5, int(epoch)])
    photos = {}
    for person in persons:
        own = rng.permutation(np.flatnonzero(labels == person))
        if len(own) < images_per_identity:
            own = np.concatenate([own, rng.choice(own, images_per_identity - len(own))])
        photos[person] = own
    rounds = min(len(own) for own in photos.values()) // images_per_identity
    per_round = len(persons) // identities_per_batch
    batches = np.zeros((rounds * per_round, identities_per_batch * images_per_identity), np.int64)
    for r in range(rounds):
        order = rng.permutation(persons)
        for step in range(per_round):
            chosen = order[step * identities_per_batch:(step + 1) * identities_per_batch]
            batches[r * per_round + step] = np.concatenate(
                [photos[p][r * images_per_identity:(r + 1) * images_per_identity] for p in chosen])
    return batches


def pk_batches(images, labels, identities_per_batch, images_per_identity, seed=0, first_epoch=0,
               epochs=1, passes=1):
    """A ``tf.data`` stream of (images [P*K, H, W, 3] float32, labels [P*K] int32) batches for epochs
    ``first_epoch .. epochs - 1`` (``pk_batch_indices`` of each epoch, ``passes`` passes each, chained). ``images`` uint8 or
    float32 [N, H, W, 3] (uint8 is divided by 255)."""
    indices = np.concatenate([pk_batch_indices(labels, identities_per_batch, images_per_identity,
                                               seed, epoch, passes)
                              for epoch in range(int(first_epoch), max(int(epochs), int(first_epoch) + 1))])
    images = tf.constant(images)
    labels = tf.constant(np.asarray(labels, np.int32))

    def gather(batch):
        batch_images = tf.gather(images, batch)
        if batch_images.dtype == tf.uint8:
            batch_images = tf.cast(batch_images, tf.float32) / 255.0
        return batch_images, tf.gather(labels, batch)

    return tf.data.Dataset.from_tensor_slices(indices).map(gather).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------------
# Evaluation: pairs, thresholds, ROC, one-shot recognition
# --------------------------------------------------------------------------------------------------

def embed(encoder, images, batch_size=256):
    """The encoder's embeddings of ``images`` [N, H, W, 3] as a NumPy array [N, dim]."""
    outputs = [np.asarray(encoder(images[start:start + batch_size], training=False))
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


def verification_pairs(labels, seed=0, max_positive_pairs=None):
    """A balanced set of pairs, as in LFW's protocol: every same-person pair (or at most
    ``max_positive_pairs`` of them) and as many different-person pairs drawn at random.

    Returns (first [n] int, second [n] int, same [n] bool), indices into ``labels``.
    """
    labels = np.reshape(np.asarray(labels), [-1])
    rng = np.random.default_rng([int(seed), 13])
    first, second = np.triu_indices(len(labels), k=1)
    same = labels[first] == labels[second]
    positives = np.flatnonzero(same)
    if max_positive_pairs is not None and len(positives) > max_positive_pairs:
        positives = rng.choice(positives, max_positive_pairs, replace=False)
    negatives = np.flatnonzero(~same)
    negatives = rng.choice(negatives, min(len(positives), len(negatives)), replace=False)
    chosen = np.sort(np.concatenate([positives, negatives]))
    return first[chosen], second[chosen], same[chosen]


def squared_distances(first, second):
    """Row-wise ||first_i - second_i||^2 of two [n, dim] arrays -> [n]."""
    difference = np.asarray(first, np.float64) - np.asarray(second, np.float64)
    return np.sum(difference * difference, axis=-1)


def best_threshold(distances, same):
    """The threshold tau (predict "same" when distance <= tau) with the highest accuracy on these
    pairs; returns (tau, accuracy). Candidates: midpoints between consecutive sorted distances."""
    distances = np.asarray(distances, np.float64)
    same = np.asarray(same, bool)
    if distances.size == 0:
        raise ValueError("distances must not be empty")
    order = np.argsort(distances, kind="stable")
    sorted_distances, sorted_same = distances[order], same[order]
    # Accepting the first k pairs: correct = same among them + different among the rest.
    accepted_same = np.concatenate([[0], np.cumsum(sorted_same)])
    accepted = np.arange(len(distances) + 1)
    correct = accepted_same + (np.sum(~same) - (accepted - accepted_same))
    # Only cut between distinct values.
    cuts = np.concatenate([[True], sorted_distances[1:] > sorted_distances[:-1], [True]])
    correct = np.where(cuts, correct, -1)
    k = int(np.argmax(correct))
    if k == 0:
        tau = sorted_distances[0] - 1e-6
    elif k == len(distances):
        tau = sorted_distances[-1] + 1e-6
    else:
        tau = 0.5 * (sorted_distances[k - 1] + sorted_distances[k])
    return float(tau), float(correct[k]) / len(distances)


def verification_accuracy(distances, same, threshold):
    """Fraction of pairs decided right by "same person when distance <= threshold"."""
    return float(np.mean((np.asarray(distances) <= threshold) == np.asarray(same, bool)))


def roc_curve(distances, same):
    """False- and true-positive rates of "same when distance <= tau" as tau grows over every
    distinct distance: (false_positive_rate [m], true_positive_rate [m], thresholds [m]), from (0, 0)."""
    distances = np.asarray(distances, np.float64)
    same = np.asarray(same, bool)
    if same.all() or not same.any():
        raise ValueError("same must contain both same-person and different-person pairs")
    order = np.argsort(distances, kind="stable")
    sorted_distances, sorted_same = distances[order], same[order]
    last_of_value = np.concatenate([sorted_distances[1:] > sorted_distances[:-1], [True]])
    true_positives = np.cumsum(sorted_same)[last_of_value]
    false_positives = np.cumsum(~sorted_same)[last_of_value]
    fpr = np.concatenate([[0.0], false_positives / np.sum(~same)])
    tpr = np.concatenate([[0.0], true_positives / np.sum(same)])
    thresholds = np.concatenate([[-np.inf], sorted_distances[last_of_value]])
    return fpr, tpr, thresholds


def roc_auc(distances, same):
    """Area under the ROC curve (trapezoids; ties count one half): the probability that a random
    same-person pair is closer than a random different-person pair."""
    fpr, tpr, _ = roc_curve(distances, same)
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2.0))


def one_shot_accuracy(distance_fn, labels, way=20, episodes=50, seed=0):
    """One-shot recognition, top-1: ``way`` persons each with one gallery photo; every other photo of
    them is a query, recognised as the person of its nearest gallery photo. Mean over ``episodes``
    random draws of persons and gallery photos.

    Args:
      distance_fn: (query_indices [q], gallery_indices [g]) -> distances [q, g].
      labels: [N] person ids (each of the persons drawn needs at least 2 photos).
      way: persons per episode.
    """
    labels = np.reshape(np.asarray(labels), [-1])
    persons, counts = np.unique(labels, return_counts=True)
    persons = persons[counts >= 2]
    if len(persons) < way:
        raise ValueError(f"way={way} needs at least {way} persons with two photos, got {len(persons)}")
    rng = np.random.default_rng([int(seed), 17])
    correct = total = 0
    for _ in range(int(episodes)):
        chosen = rng.choice(persons, way, replace=False)
        gallery = np.array([rng.choice(np.flatnonzero(labels == person)) for person in chosen])
        queries = np.flatnonzero(np.isin(labels, chosen) & ~np.isin(np.arange(len(labels)), gallery))
        distances = np.asarray(distance_fn(queries, gallery))
        predicted = chosen[np.argmin(distances, axis=1)]
        correct += int(np.sum(predicted == labels[queries]))
        total += len(queries)
    return correct / max(total, 1)


def embedding_distance_fn(embeddings):
    """``distance_fn`` for ``one_shot_accuracy``: squared L2 between rows of ``embeddings``."""
    embeddings = np.asarray(embeddings, np.float64)

    def distances(queries, gallery):
        q, g = embeddings[queries], embeddings[gallery]
        return np.maximum((q * q).sum(1)[:, None] - 2 * q @ g.T + (g * g).sum(1)[None, :], 0.0)

    return distances


def evaluate_verification(pair_distance_fn, val_labels, test_labels, seed=0, way=20, episodes=50,
                          one_shot_fn=None):
    """Every verification number of one method: tau chosen on the validation persons, then accuracy,
    ROC AUC and one-shot top-1 on the test persons.

    ``pair_distance_fn(split, first, second) -> [n]`` scores pairs of photo indices of "validation" or
    "test"; ``one_shot_fn(queries, gallery) -> [q, g]`` scores test photos (default: built from
    ``pair_distance_fn``). Returns a dict with threshold, val/test accuracy, test_roc_auc,
    test_one_shot_top1 and the test pairs' distances and labels (for plots).
    """
    a, b, same = verification_pairs(val_labels, seed)
    tau, val_accuracy = best_threshold(pair_distance_fn("validation", a, b), same)
    ta, tb, test_same = verification_pairs(test_labels, seed + 1)
    test_distances = np.asarray(pair_distance_fn("test", ta, tb))
    if one_shot_fn is None:
        def one_shot_fn(queries, gallery):
            q = np.repeat(queries, len(gallery))
            g = np.tile(gallery, len(queries))
            return np.asarray(pair_distance_fn("test", q, g)).reshape(len(queries), len(gallery))
    return {
        "threshold": tau,
        "val_verification_accuracy": val_accuracy,
        "test_verification_accuracy": verification_accuracy(test_distances, test_same, tau),
        "test_roc_auc": roc_auc(test_distances, test_same),
        "test_one_shot_top1": one_shot_accuracy(one_shot_fn, test_labels, way, episodes, seed),
        "test_pairs": (ta, tb, test_same, test_distances),
    }


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------

def plot_roc(curves: dict, operating_points: dict | None = None, save_path=None):
    """ROC curves {name: (distances, same)} in one plot, each labelled with its AUC; optional
    ``operating_points`` {name: threshold} marked with a dot. Returns the figure."""
    import matplotlib.pyplot as plt

    from common import viz

    figure, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, (distances, same) in curves.items():
        fpr, tpr, thresholds = roc_curve(distances, same)
        line, = ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc(distances, same):.3f})")
        if operating_points and name in operating_points:
            k = max(0, np.searchsorted(thresholds, operating_points[name], side="right") - 1)
            ax.plot(fpr[k], tpr[k], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false accept rate (different persons accepted)")
    ax.set_ylabel("true accept rate (same person accepted)")
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return viz.save_figure(figure, save_path)


def plot_distance_histograms(panels: dict, save_path=None, bins=40):
    """Histograms of same- vs different-person distances, one panel per {title: (distances, same,
    threshold or None)}. Returns the figure."""
    import matplotlib.pyplot as plt

    from common import viz

    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, (distances, same, threshold)) in zip(axes[0], panels.items()):
        distances, same = np.asarray(distances), np.asarray(same, bool)
        edges = np.linspace(distances.min(), distances.max(), bins + 1)
        ax.hist(distances[same], edges, alpha=0.6, label="same person", density=True)
        ax.hist(distances[~same], edges, alpha=0.6, label="different persons", density=True)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", label=f"tau = {threshold:.3g}")
        ax.set_title(title)
        ax.set_xlabel("distance")
        ax.legend(fontsize=7)
    figure.tight_layout()
    return viz.save_figure(figure, save_path)


def show_pairs(images, first, second, distances, same, threshold, count=6, save_path=None):
    """Two rows of photo pairs: the closest pairs of *different* persons and the farthest pairs of the
    *same* person, the ones a threshold gets wrong first. Titles: distance, and "x" when the decision
    at ``threshold`` is wrong. Returns the figure."""
    from common import viz

    distances, same = np.asarray(distances), np.asarray(same, bool)
    different = np.flatnonzero(~same)
    positives = np.flatnonzero(same)
    closest_different = different[np.argsort(distances[different])[:count]]
    farthest_same = positives[np.argsort(-distances[positives])[:count]]
    tiles, titles = [], []
    for kind, chosen in (("different", closest_different), ("same", farthest_same)):
        for k in chosen:
            tiles.append(np.concatenate([images[first[k]], images[second[k]]], axis=1))
            wrong = (distances[k] <= threshold) != same[k]
            titles.append(f"{'x ' if wrong else ''}{kind} d={distances[k]:.2f}")
    return viz.show_images(np.stack(tiles), titles=titles, cols=count, save_path=save_path)
