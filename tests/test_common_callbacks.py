"""common.callbacks: SimpleLogCallback's numbering and the TensorBoard + CSV epoch logs."""

import re

import keras
import numpy as np
import pytest

from common.callbacks import SimpleLogCallback


def tiny_fit(callbacks, epochs):
    keras.utils.set_random_seed(0)
    x = np.random.rand(32, 4).astype("float32")
    y = (x.sum(axis=1) > 2).astype("int32")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=16, verbose=0,
                     callbacks=callbacks)


def test_logs_first_last_and_every_nth_epoch_with_the_logged_values():
    lines = []
    callback = SimpleLogCallback({"loss": "loss", "val acc": "val_accuracy"}, num_epochs=7,
                                 log_frequency=3, print_fn=lines.append)
    history = tiny_fit([callback], epochs=7)
    numbers = [int(re.match(r"Epoch\s+(\d+)/7", line).group(1)) for line in lines]
    assert numbers == [1, 3, 6, 7]
    for number, line in zip(numbers, lines):
        loss = float(re.search(r"loss (\d+\.\d+)", line).group(1))
        val_acc = float(re.search(r"val acc (\d+\.\d+)", line).group(1))
        assert loss == pytest.approx(history.history["loss"][number - 1], abs=1e-4)
        assert val_acc == pytest.approx(history.history["val_accuracy"][number - 1], abs=1e-4)


def test_prints_to_stdout_by_default(capsys):
    tiny_fit([SimpleLogCallback({"loss": "loss"}, num_epochs=2)], epochs=2)
    out = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[1] for line in out] == ["1/2", "2/2"]


def test_missing_keys_are_skipped_and_config_round_trips():
    callback = SimpleLogCallback({"loss": "loss", "iou": "mean_iou"}, num_epochs=10, log_frequency=5)
    assert "iou" not in callback.format_line(1, {"loss": 0.5})
    clone = SimpleLogCallback(**callback.get_config())
    assert clone.get_config() == callback.get_config()


@pytest.mark.parametrize("kwargs", [{"metrics_dict": {}, "num_epochs": 3},
                                    {"metrics_dict": {"a": "a"}, "num_epochs": 0},
                                    {"metrics_dict": {"a": "a"}, "num_epochs": 3, "log_frequency": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SimpleLogCallback(**kwargs)


def test_epoch_log_callbacks_write_tensorboard_and_an_appended_csv(tmp_path):
    from common.callbacks import epoch_log_callbacks

    tiny_fit(epoch_log_callbacks(tmp_path / "logs"), epochs=2)
    tiny_fit(epoch_log_callbacks(tmp_path / "logs"), epochs=1)  # a resumed run appends
    rows = (tmp_path / "logs" / "epochs.csv").read_text().splitlines()
    assert rows[0].startswith("epoch") and [r.split(",")[0] for r in rows[1:]] == ["0", "1", "0"]
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*")), "TensorBoard event files"
