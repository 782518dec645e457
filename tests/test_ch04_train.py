"""Tests of ch04_classification/train_classifier.py: FAST runs in-process, resume, errors, GoogLeNet's aux losses.

- The learning-rate schedule equals Keras' own CosineDecay (with warm-up) and PiecewiseConstantDecay.
- A FAST run writes every output; its val_accuracy equals the accuracy recomputed independently
  (scikit-learn) from the saved model.keras on the same validation images; re-running with the same
  --out and more epochs continues at the next epoch (log lines and the CSV history prove it).
- With more than 5 classes top-5 accuracy is reported and equals scikit-learn's top_k_accuracy_score.
- Unknown model / data set names give a ValueError naming the option.
- GoogLeNet's auxiliary classifiers are trained through their weighted losses (their weights move only
  when the auxiliary loss weight is not zero), and a FAST googlenet run works end to end.
Run: `python -m pytest -q tests/test_ch04_train.py`.
"""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import accuracy_score, top_k_accuracy_score

from common import data
from ch04_classification import models, train_classifier
from ch04_classification.train_classifier import ClassifierTrainer, WarmupSchedule


def validation_arrays(dataset, num_examples, image_size, seed=0):
    images, labels = [], []
    for image, label in data.to_supervised(data.load(dataset, "validation", image_size=image_size,
                                                     num_examples=num_examples, seed=seed)):
        images.append(image.numpy())
        labels.append(int(label))
    return np.stack(images), np.array(labels)


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------

def test_cosine_schedule_with_warmup_equals_keras_cosine_decay():
    total, warmup, peak = 100, 10, 0.01
    ours = WarmupSchedule("cosine", peak, total, warmup, final_fraction=0.05)
    reference = keras.optimizers.schedules.CosineDecay(0.0, total - warmup, alpha=0.05, warmup_target=peak,
                                                       warmup_steps=warmup)
    steps = [0, 1, 5, 9, 10, 11, 37, 60, 99, 100, 150]
    np.testing.assert_allclose([float(ours(s)) for s in steps], [float(reference(s)) for s in steps],
                               rtol=1e-5, atol=1e-9)


def test_step_schedule_equals_piecewise_constant_decay():
    total, peak = 40, 0.1
    ours = WarmupSchedule("step", peak, total, warmup_steps=0)
    # Our boundaries are at 50 % and 75 %: the drop happens *at* step 20 and 30; Keras' boundary b keeps
    # the old value at step b, so its boundaries are 19 and 29 for integer steps.
    reference = keras.optimizers.schedules.PiecewiseConstantDecay([19, 29], [peak, peak * 0.1, peak * 0.01])
    steps = range(0, 45)
    np.testing.assert_allclose([float(ours(s)) for s in steps], [float(reference(s)) for s in steps], rtol=1e-6)
    constant = WarmupSchedule("constant", peak, total, warmup_steps=4)
    np.testing.assert_allclose([float(constant(s)) for s in (0, 2, 4, 39)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6)


def test_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        WarmupSchedule("linear", 0.1, 10)
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupSchedule("cosine", 0.1, 10, warmup_steps=20)


# --------------------------------------------------------------------------------------------------
# The script, in-process
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fast_run_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    common_args = ["--fast", "--out", str(out), "--num-train-examples", "64", "--num-val-examples", "48"]
    metrics = train_classifier.main(common_args + ["--epochs", "1"])
    for name in ("metrics.json", "config.json", "confusion_matrix.png", "predictions.png", "model.keras"):
        assert (out / name).is_file(), name
    assert (out / "logs").is_dir() and (out / "backup").is_dir()
    written = json.loads((out / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert {"val_accuracy", "train_seconds", "epochs"} <= set(written)
    assert "val_top5_accuracy" not in written  # 5 classes: top-5 would always be 1
    assert written["epochs"] == 1 and json.loads((out / "config.json").read_text())["epochs"] == 1

    # Independent check of val_accuracy: reload the saved network, predict, score with scikit-learn.
    images, labels = validation_arrays("shapes_classification", 48, written["image_size"])
    network = keras.saving.load_model(out / "model.keras")
    predicted = np.asarray(network(images, training=False)).argmax(axis=-1)
    assert written["val_accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)

    # Same --out, two epochs in total: training continues with epoch 2, it does not start again.
    capsys.readouterr()
    resumed = train_classifier.main(common_args + ["--epochs", "2"])
    printed = capsys.readouterr().out
    assert "Epoch 2/2" in printed and "Epoch 1/2" not in printed
    assert resumed["initial_epoch"] == 1 and resumed["epochs_this_run"] == 1 and resumed["epochs"] == 2
    # The CSV epoch log is appended to: one row per epoch ever trained, none twice.
    rows = (out / "logs" / "history.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in rows] == [0, 1]


@pytest.mark.slow
def test_top5_accuracy_with_more_than_five_classes(tmp_path):
    out = tmp_path / "digits"
    metrics = train_classifier.main(["--fast", "--dataset", "digits", "--out", str(out), "--epochs", "1",
                                     "--no-augment"])
    assert 0.0 <= metrics["val_accuracy"] <= metrics["val_top5_accuracy"] <= 1.0
    images, labels = validation_arrays("digits", 64, metrics["image_size"])
    network = keras.saving.load_model(out / "model.keras")
    probabilities = np.asarray(network(images, training=False))
    assert metrics["val_top5_accuracy"] == pytest.approx(
        top_k_accuracy_score(labels, probabilities, k=5, labels=np.arange(10)), abs=1e-6)


@pytest.mark.parametrize("argv, option", [
    (["--model", "resnet9000"], "--model"),
    (["--dataset", "no_such_data_set"], "--dataset"),
    (["--epochs", "0"], "--epochs"),
    (["--weights", "places365"], "--weights"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, argv, option):
    with pytest.raises(ValueError, match=option):
        train_classifier.main(["--fast", "--out", str(tmp_path)] + argv)


def test_detection_data_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--dataset"):
        train_classifier.main(["--fast", "--out", str(tmp_path), "--dataset", "shapes"])


# --------------------------------------------------------------------------------------------------
# GoogLeNet's auxiliary classifiers
# --------------------------------------------------------------------------------------------------

def _aux_kernels(network):
    return {layer.name: layer.get_weights()[0].copy() for layer in network.layers
            if layer.name.startswith("aux") and layer.weights}


@pytest.mark.parametrize("aux_loss_weight, aux_should_move", [(0.3, True), (0.0, False)])
def test_googlenet_auxiliary_losses_train_the_auxiliary_heads(aux_loss_weight, aux_should_move):
    keras.utils.set_random_seed(0)
    network = models.get_model("googlenet", (80, 80, 3), 4, aux_classifiers=True)
    trainer = ClassifierTrainer(network, augmentation=None, aux_loss_weight=aux_loss_weight)
    trainer.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(),
                    metrics=train_classifier.accuracy_metrics(4), jit_compile=False)
    images = np.random.default_rng(0).uniform(size=(4, 80, 80, 3)).astype("float32")
    labels = np.array([0, 1, 2, 3])
    before = _aux_kernels(network)
    assert before, "GoogLeNet has auxiliary classifier layers"
    logs = trainer.train_on_batch(images, labels, return_dict=True)
    after = _aux_kernels(network)
    moved = any(not np.array_equal(before[name], after[name]) for name in before)
    assert moved == aux_should_move
    assert "aux_loss" in logs and logs["aux_loss"] > 0  # two cross-entropies of a 4-class guess, ~2 ln 4
    # At inference the trainer is the main classifier only: [batch, classes].
    assert tuple(trainer(images).shape) == (4, 4)


@pytest.mark.slow
def test_googlenet_fast_run(tmp_path):
    metrics = train_classifier.main(["--fast", "--model", "googlenet", "--out", str(tmp_path), "--epochs", "1",
                                     "--num-train-examples", "32", "--num-val-examples", "16", "--batch-size", "16"])
    assert metrics["image_size"] == 80  # raised from FAST's 32 to what the auxiliary classifiers need
    assert np.isfinite(metrics["val_loss"])
    assert "aux_loss" in (tmp_path / "logs" / "history.csv").read_text().splitlines()[0]
