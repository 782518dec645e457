"""Tests of ch04_classification/train_classifier.py: FAST runs in-process, resume, errors, GoogLeNet's aux losses.

- A FAST run writes every output; its val_accuracy equals the accuracy recomputed independently
  (scikit-learn) from the saved model.keras on the same validation images; re-running the finished
  run keeps its record (train_seconds, history) instead of overwriting it; re-running with other
  options refuses and names them.
- A run killed with SIGKILL and re-run ends with exactly the weights of an uninterrupted run.
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
from sklearn.metrics import accuracy_score, top_k_accuracy_score

from common import data
from ch04_classification import models, train_classifier
from ch04_classification.trainer import ClassifierTrainer
from common.training import RunError


def validation_arrays(dataset, num_examples, image_size, seed=0):
    images, labels = [], []
    for image, label in data.to_supervised(data.load(dataset, "validation", image_size=image_size,
                                                     num_examples=num_examples, seed=seed)):
        images.append(image.numpy())
        labels.append(int(label))
    return np.stack(images), np.array(labels)


# --------------------------------------------------------------------------------------------------
# The script, in-process
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fast_run_writes_outputs_and_keeps_its_record(tmp_path, capsys):
    out = tmp_path / "run"
    common_args = ["--fast", "--out", str(out), "--num-train-examples", "64", "--num-val-examples", "48",
                   "--epochs", "2"]
    metrics = train_classifier.main(common_args)
    for name in ("metrics.json", "config.json", "confusion_matrix.png", "predictions.png", "model.keras",
                 "history.png", "class_names.json", "checkpoint/state.npz"):
        assert (out / name).is_file(), name
    written = json.loads((out / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert {"val_accuracy", "train_seconds", "epochs", "parameters", "replicas"} <= set(written)
    assert "val_top5_accuracy" not in written  # 5 classes: top-5 would always be 1
    assert written["epochs"] == 2 and written["replicas"] == 1

    # Independent check of val_accuracy: reload the saved network, predict, score with scikit-learn.
    images, labels = validation_arrays("shapes_classification", 48, written["image_size"])
    network = keras.saving.load_model(out / "model.keras")
    predicted = np.asarray(network(images, training=False)).argmax(axis=-1)
    assert written["val_accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-6)

    # Re-running the finished run trains nothing and keeps the record of the run that trained.
    capsys.readouterr()
    again = train_classifier.main(common_args)
    assert "already done" in capsys.readouterr().out
    assert again["train_seconds"] == written["train_seconds"] and again["epochs"] == 2
    assert again["epochs_this_run"] == 0
    assert again["val_accuracy"] == pytest.approx(written["val_accuracy"])
    rows = (out / "logs" / "epochs.csv").read_text().splitlines()[1:]
    assert [int(line.split(",")[0]) for line in rows] == [0, 1]  # one CSV row per epoch ever trained

    # Other options into the same --out: refused, naming the options.
    with pytest.raises(RunError, match="--epochs: earlier run 2, now 3"):
        train_classifier.main(common_args[:-1] + ["3"])


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


def test_tta_reports_both_accuracies_and_flips_only_where_training_did(tmp_path):
    from ch04_classification import tta

    out = tmp_path / "digits_tta"
    metrics = train_classifier.main(["--fast", "--dataset", "digits", "--out", str(out), "--epochs", "1",
                                     "--tta"])
    # The plain view of the TTA pass is the script's own evaluation; no flips for digits: 3 scales.
    assert metrics["val_accuracy_tta_plain"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert metrics["tta_views"] == 3 and 0.0 <= metrics["val_accuracy_tta"] <= 1.0
    images, labels = validation_arrays("digits", 64, metrics["image_size"])
    network = keras.saving.load_model(out / "model.keras")
    averaged = tta.predict_tta(network, images, flips=False)
    assert metrics["val_accuracy_tta"] == pytest.approx(float(np.mean(averaged.argmax(-1) == labels)),
                                                        abs=1e-6)


@pytest.mark.parametrize("argv, option", [
    (["--model", "resnet9000"], "--model"),
    (["--dataset", "no_such_data_set"], "--dataset"),
    (["--epochs", "0"], "--epochs"),
    (["--weights", "places365"], "--weights"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, capsys, argv, option):
    with pytest.raises(SystemExit) as exit_info:  # argparse or the harness: a message, no traceback
        train_classifier.main(["--fast", "--out", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    assert option in capsys.readouterr().err


def test_detection_data_set_is_refused(tmp_path):
    with pytest.raises(RunError, match="--dataset"):
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
    assert "aux_loss" in (tmp_path / "logs" / "epochs.csv").read_text().splitlines()[0]
