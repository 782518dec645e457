"""Tests of ch04_classification/transfer_learning.py.

- A FAST run prints the advice matrix and a table with every strategy, and writes it to metrics.json.
- The trainable-parameter counts of the table are right, checked against counts made by hand from the
  layer shapes: feature extraction trains only the new head (channels x classes + classes), fine-tuning
  the top trains the head plus ResNet's conv5 stage, scratch and fine-tune-all train everything.
- Freezing modes and bad options.
Run: `python -m pytest -q tests/test_ch04_transfer.py`.
"""

import json

import numpy as np
import pytest

from ch04_classification import transfer_learning as transfer


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    import contextlib
    import io

    out = tmp_path_factory.mktemp("transfer")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        metrics = transfer.main(["--fast", "--out", str(out)])
    return metrics, printed.getvalue(), out


@pytest.mark.slow
def test_fast_run_prints_table_with_every_strategy(fast_run):
    metrics, printed, out = fast_run
    table_start = printed.index("strategy")
    for strategy in transfer.STRATEGIES:
        assert strategy in printed[table_start:], strategy
    for amount, similarity in transfer.ADVICE:
        assert amount in printed and similarity in printed
    written = json.loads((out / "metrics.json").read_text())
    assert [row["strategy"] for row in written["table"]] == list(transfer.STRATEGIES)
    assert {"train_seconds", "epochs", "val_accuracy"} <= set(written)
    for row in written["table"]:
        assert 0.0 <= row["val_accuracy"] <= row["val_top5_accuracy"] <= 1.0  # digits: 10 classes
    assert (out / "transfer_table.png").is_file()


def _layer_parameters(model, prefix):
    return sum(int(np.prod(w.shape)) for layer in model.layers if layer.name.startswith(prefix)
               for w in layer.weights if w.trainable)


@pytest.mark.slow
def test_trainable_parameter_counts_match_hand_counts(fast_run):
    metrics, _, _ = fast_run
    rows = {row["strategy"]: row for row in metrics["table"]}
    num_classes = 10
    backbone = transfer.build_backbone("resnet_small", 32)
    channels = backbone.output_shape[-1]
    head = channels * num_classes + num_classes  # dense kernel + bias
    everything = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights) + head
    assert rows["feature_extraction"]["trainable_parameters"] == head
    assert rows["scratch"]["trainable_parameters"] == everything
    assert rows["fine_tune_all"]["trainable_parameters"] == everything
    assert rows["fine_tune_all_low_lr"]["trainable_parameters"] == everything
    assert rows["fine_tune_top"]["trainable_parameters"] == head + _layer_parameters(backbone, "conv5_")
    assert rows["fine_tune_all_low_lr"]["learning_rate"] == pytest.approx(
        0.1 * rows["fine_tune_all"]["learning_rate"])


def test_set_trainable_modes():
    backbone = transfer.build_backbone("resnet_small", 32)
    top = transfer.top_layer_names(backbone, "resnet_small")
    assert top and all(name.startswith("conv5_") for name in top)
    transfer.set_trainable(backbone, "none")
    assert not backbone.trainable_weights
    transfer.set_trainable(backbone, "top", top)
    trainable_layers = {layer.name for layer in backbone.layers if layer.trainable and layer.weights}
    assert trainable_layers == {name for name in top if backbone.get_layer(name).weights}
    transfer.set_trainable(backbone, "all")
    assert len(backbone.trainable_weights) > 0 and all(layer.trainable for layer in backbone.layers)
    # Non-ResNet backbones: the last quarter of the weighted layers.
    mobilenet = transfer.build_backbone("mobilenet_v1", 32)
    weighted = [layer.name for layer in mobilenet.layers if layer.weights]
    assert transfer.top_layer_names(mobilenet, "mobilenet_v1") == weighted[int(0.75 * len(weighted)):]
    with pytest.raises(ValueError, match="mode"):
        transfer.set_trainable(backbone, "some")


def test_few_labels_is_balanced():
    labels = np.repeat(np.arange(4), 10)
    images = np.arange(40)
    chosen_images, chosen_labels = transfer.few_labels(images, labels, per_class=3)
    assert np.bincount(chosen_labels).tolist() == [3, 3, 3, 3]
    assert np.array_equal(labels[chosen_images], chosen_labels)


@pytest.mark.parametrize("argv, option", [
    (["--backbone", "resnet9000"], "--backbone"),
    (["--strategies", "scratch,magic"], "--strategies"),
    (["--labels-per-class", "0"], "--labels-per-class"),
])
def test_bad_arguments(tmp_path, argv, option):
    with pytest.raises(ValueError, match=option):
        transfer.main(["--fast", "--out", str(tmp_path)] + argv)
