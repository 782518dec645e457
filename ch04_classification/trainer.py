"""A classifier ready for ``fit``: augmentation on the device and auxiliary losses in the train step.

``ClassifierTrainer`` wraps any network of the chapter-4 zoo. At inference it is the network's main
output; in ``train_step`` the batch is augmented inside the compiled step (``common.augment``) and
networks with auxiliary classifiers (GoogLeNet) add their losses with weight 0.3 (Szegedy et al.
2015, "Going Deeper with Convolutions", sec. 5). Used by ``train_classifier.py`` and
``transfer_learning.py``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

GOOGLENET_AUX_LOSS_WEIGHT = 0.3  # Szegedy et al. 2015, sec. 5: auxiliary losses "weighted by 0.3"


def split_outputs(outputs):
    """(main prediction, [auxiliary predictions]) from a network's output.

    A single tensor has no auxiliary outputs. A list/tuple is (main, aux1, aux2, ...). A dict uses the key
    "predictions" (or "main") for the main output; the other keys are auxiliary classifiers in key order.
    """
    if isinstance(outputs, dict):
        main_key = next((k for k in ("predictions", "main", "logits") if k in outputs), None)
        if main_key is None:
            raise ValueError(f"a dict of outputs needs a 'predictions' key, got {sorted(outputs)}")
        return outputs[main_key], [outputs[k] for k in sorted(outputs) if k != main_key]
    if isinstance(outputs, (list, tuple)):
        return outputs[0], list(outputs[1:])
    return outputs, []


class ClassifierTrainer(keras.Model):
    """Wraps a classification network for fit(): augmentation and auxiliary losses live in train_step.

    At inference (call, evaluate, predict) it is the network's main output, [batch, num_classes]
    probabilities. In train_step the batch is augmented on the device by `augmentation` (a
    common.augment.BatchAugmentation layer, or None), the network runs in training mode, and the loss is
        loss(main) + aux_loss_weight * sum(loss(aux_i))
    for networks with auxiliary classifiers (GoogLeNet). Metrics are those of the main output.
    The wrapped network itself stays a plain functional model (saved alone as model.keras).
    """

    def __init__(self, network, augmentation=None, aux_loss_weight=GOOGLENET_AUX_LOSS_WEIGHT, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.augmentation = augmentation
        self.aux_loss_weight = float(aux_loss_weight)
        # Logged as "aux_loss" only for networks with auxiliary classifiers (more than one output).
        self.aux_loss_tracker = keras.metrics.Mean(name="aux_loss") if len(network.outputs) > 1 else None

    def build(self, input_shape):
        if self.augmentation is not None:
            self.augmentation.build(input_shape)
        self.built = True

    def call(self, images, training=False):
        main, _ = split_outputs(self.network(images, training=training))
        return main

    def train_step(self, data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if self.augmentation is not None:
            images = self.augmentation(images, training=True)  # on the device, inside the compiled step
        with tf.GradientTape() as tape:
            main, auxiliary = split_outputs(self.network(images, training=True))
            # compile()'s loss on the main output, plus the regularization losses of the layers.
            loss = self._compute_loss(x=images, y=labels, y_pred=main, sample_weight=sample_weight, training=True)
            aux_loss = tf.constant(0.0)
            for aux in auxiliary:  # the same classification loss (divided by the replicas, as above)
                aux_loss += self.loss(labels, aux)
            total = loss + self.aux_loss_weight * aux_loss
        gradients = tape.gradient(total, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        # Keras' losses are already divided by the number of replicas (so the gradients sum right);
        # the logged values are not.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self._loss_tracker.update_state(total * replicas, sample_weight=tf.shape(images)[0])
        if self.aux_loss_tracker is not None:
            self.aux_loss_tracker.update_state(aux_loss * replicas)
        return self.compute_metrics(images, labels, main, sample_weight=sample_weight)

    @property
    def has_auxiliary_outputs(self):
        return self.aux_loss_tracker is not None


def accuracy_metrics(num_classes):
    """Top-1 accuracy, plus top-5 when there are more than 5 classes (with <= 5 it is always 1)."""
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5_accuracy"))
    return metrics
