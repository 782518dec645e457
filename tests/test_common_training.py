"""Tests of common/training.py, the one training harness (small models, in-process).

- The schedule is Keras' own CosineDecay (with warm-up) to the step, and shortening it equals a
  CosineDecay planned with the shorter length from the start.
- The data order of an epoch is a pure function of (seed, epoch): the same whether the stream starts at
  epoch 0 or resumes at epoch 2; epochs differ from each other.
- A checkpoint restores every model variable (including random-seed states) and optimizer variable; a
  write killed half-way leaves the previous checkpoint readable.
- --out: unwritable folders, resumes with other options and --overwrite give clear outcomes.
- The time budget ends the run early and shortens the learning-rate decay to end with it.
- Ctrl-C prints how to resume; a '%' in help text does not break --help; 'None' parses for optional
  options.
Run: `python -m pytest -q tests/test_common_training.py`.
"""

import json
import time
from dataclasses import dataclass, field
from typing import ClassVar

import keras
import numpy as np
import pytest
import tensorflow as tf

from common import config as config_lib
from common import training


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------

def test_schedule_is_keras_cosine_decay_with_warmup():
    ours = training.shortenable_cosine_decay(0.01, 90, warmup_steps=10, alpha=0.05)
    reference = keras.optimizers.schedules.CosineDecay(0.0, 90, alpha=0.05, warmup_target=0.01,
                                                       warmup_steps=10)
    steps = [0, 1, 5, 9, 10, 11, 37, 60, 99, 100, 150]
    np.testing.assert_allclose([float(ours(s)) for s in steps], [float(reference(s)) for s in steps],
                               rtol=1e-6, atol=1e-10)


def test_shortened_schedule_equals_one_planned_shorter():
    ours = training.shortenable_cosine_decay(0.01, 90, warmup_steps=10)
    ours.set_total_steps(50)  # warm-up 10 + decay 40
    reference = keras.optimizers.schedules.CosineDecay(0.0, 40, warmup_target=0.01, warmup_steps=10)
    steps = [0, 5, 10, 20, 35, 49, 50, 80]
    np.testing.assert_allclose([float(ours(s)) for s in steps], [float(reference(s)) for s in steps],
                               rtol=1e-6, atol=1e-10)
    assert ours.get_config()["decay_steps"] == 40


def test_constant_schedule_after_warmup():
    constant = training.shortenable_cosine_decay(0.1, 36, warmup_steps=4, alpha=1.0)
    np.testing.assert_allclose([float(constant(s)) for s in (0, 2, 4, 39)], [0.0, 0.05, 0.1, 0.1], rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------

def _batches(stream):
    return [b.numpy().tolist() for b in stream]


def test_epoch_order_depends_only_on_seed_and_epoch():
    examples = tf.data.Dataset.range(12)
    whole = _batches(training.epoch_batches(examples, 4, 0, 4, seed=3))  # 4 epochs x 3 batches
    resumed = _batches(training.epoch_batches(examples, 4, 2, 4, seed=3))
    assert resumed == whole[6:]
    epochs = [sorted(sum(whole[3 * e:3 * e + 3], [])) for e in range(4)]
    assert all(e == list(range(12)) for e in epochs)  # every example once per epoch
    orders = {tuple(sum(whole[3 * e:3 * e + 3], [])) for e in range(4)}
    assert len(orders) == 4  # and a new order every epoch
    other_seed = _batches(training.epoch_batches(examples, 4, 0, 4, seed=4))
    assert other_seed != whole


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def _small_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(8, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.3)(x)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    model.compile(optimizer=keras.optimizers.Adam(training.shortenable_cosine_decay(1e-2, 100)),
                  loss=keras.losses.MeanSquaredError())
    return model


def test_checkpoint_round_trip_restores_weights_seeds_and_optimizer(tmp_path):
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")
    model = _small_model()
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    training.save_checkpoint(tmp_path, model, {"epoch": 2})
    other = _small_model(seed=5)
    other.optimizer.build(other.trainable_variables)
    state = training.restore_checkpoint(tmp_path, other)
    assert state == {"epoch": 2}
    for a, b in zip(model.variables + model.optimizer.variables, other.variables + other.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The restored model continues exactly like the original (same dropout masks, same Adam moments).
    model.fit(x, y, epochs=1, batch_size=4, verbose=0, shuffle=False)
    other.fit(x, y, epochs=1, batch_size=4, verbose=0, shuffle=False)
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_a_write_killed_half_way_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    model = _small_model()
    model.optimizer.build(model.trainable_variables)
    training.save_checkpoint(tmp_path, model, {"epoch": 1})
    real_replace = training.os.replace

    def dies_before_rename(src, dst):
        raise KeyboardInterrupt  # the process dies after writing the temporary file, before the rename

    monkeypatch.setattr(training.os, "replace", dies_before_rename)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(tmp_path, model, {"epoch": 2})
    monkeypatch.setattr(training.os, "replace", real_replace)
    assert training.read_checkpoint_state(tmp_path) == {"epoch": 1}


def test_checkpoint_of_another_model_is_refused(tmp_path):
    model = _small_model()
    training.save_checkpoint(tmp_path, model, {})
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(training.RunError, match="another model"):
        training.restore_checkpoint(tmp_path, other)


# --------------------------------------------------------------------------------------------------
# Options and the --out folder
# --------------------------------------------------------------------------------------------------

@dataclass
class ToyConfig(training.TrainingConfig):
    """A toy script's options."""

    width: int = field(default=8, metadata={"help": "hidden units (25% of them are dropped)"})
    image_size: int | None = field(default=32, metadata={"help": "None: native size"})
    out: str = field(default="runs/toy", metadata={"help": "output folder"})
    FAST: ClassVar[dict] = {"epochs": 1}


def test_percent_in_help_and_none_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_lib.parse_config(ToyConfig, ["--help"])
    assert exit_info.value.code == 0
    assert "25% of them" in capsys.readouterr().out
    assert config_lib.parse_config(ToyConfig, ["--image-size", "None"]).image_size is None
    assert config_lib.parse_config(ToyConfig, ["--image-size", "64"]).image_size == 64


def test_unwritable_out_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(training.RunError, match="--out"):
        training.start_run(ToyConfig, ["--out", str(blocker / "run")])


def test_other_options_refuse_and_overwrite_starts_again(tmp_path):
    out = tmp_path / "run"
    run = training.start_run(ToyConfig, ["--out", str(out), "--width", "8"])
    training.save_checkpoint(run.checkpoint_dir, _small_model(), {"stages": {}, "train_seconds": 1.0,
                                                                  "stage_seconds": {}, "history": []})
    with pytest.raises(training.RunError) as error:
        training.start_run(ToyConfig, ["--out", str(out), "--width", "16", "--seed", "1"])
    message = str(error.value)
    assert "--width: earlier run 8, now 16" in message and "--seed: earlier run 0, now 1" in message
    assert "--overwrite" in message and "new --out" in message
    # Same options (the log frequency does not count): resumes.
    again = training.start_run(ToyConfig, ["--out", str(out), "--width", "8", "--log-frequency", "3"])
    assert again.resumed
    fresh = training.start_run(ToyConfig, ["--out", str(out), "--width", "16", "--overwrite"])
    assert not fresh.resumed and not (out / "checkpoint").exists()
    assert json.loads((out / "config.json").read_text())["width"] == 16


@pytest.mark.parametrize("argv, flag", [(["--epochs", "0"], "--epochs"), (["--batch-size", "-1"], "--batch-size"),
                                        (["--cpu-replicas", "2"], "--cpu-replicas"),
                                        (["--learning-rate", "0"], "--learning-rate")])
def test_shared_options_are_checked(tmp_path, argv, flag):
    with pytest.raises(training.RunError, match=flag):
        training.start_run(ToyConfig, ["--out", str(tmp_path)] + argv)


# --------------------------------------------------------------------------------------------------
# fit: time budget, Ctrl-C, record
# --------------------------------------------------------------------------------------------------

class _Slow(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        time.sleep(0.3)


def test_time_budget_stops_early_and_shortens_the_decay(tmp_path):
    run = training.start_run(ToyConfig, ["--out", str(tmp_path), "--epochs", "50"])
    model = _small_model()
    steps = 4
    model.compile(optimizer=run.optimizer(steps), loss="mse")
    data = tf.data.Dataset.from_tensor_slices((np.zeros((16, 4), "float32"), np.zeros((16, 2), "float32")))
    model.fit(data.batch(4), epochs=1, verbose=0)  # trace the step first: epochs then cost ~0.3 s
    model.optimizer.iterations.assign(0)
    run.fit(model, lambda first: training.epoch_batches(data, 4, first, 50), steps, callbacks=[_Slow()],
            budget_seconds=1.5)
    done = run.state["stages"]["main"]["epochs_done"]
    assert 2 <= done < 10
    schedule = model.optimizer._learning_rate
    # The decay now ends at the last epoch that fit: the learning rate there is ~0.
    assert float(schedule(done * steps)) == pytest.approx(0.0, abs=1e-9)
    record = run.finish({"val_x": 1.0}, model=model)
    assert record["epochs"] == done and record["stopped_by_time_budget"] is True
    assert record["train_seconds"] >= 1.5 * 0.5


class _SlowFirstValidation(keras.callbacks.Callback):
    """The first validation step of a process is slow (as tracing it is), later ones are not."""

    def on_test_batch_begin(self, batch, logs=None):
        if not getattr(self, "_done", False):
            self._done = True
            time.sleep(1.0)


def test_time_budget_does_not_count_the_tracing_of_the_validation_step(tmp_path):
    run = training.start_run(ToyConfig, ["--out", str(tmp_path), "--epochs", "8"])
    model = _small_model()
    steps = 4
    model.compile(optimizer=run.optimizer(steps), loss="mse")
    data = tf.data.Dataset.from_tensor_slices((np.zeros((16, 4), "float32"), np.zeros((16, 2), "float32")))
    model.fit(data.batch(4), epochs=1, verbose=0)  # trace the training step first
    model.optimizer.iterations.assign(0)
    # Epoch 1 costs ~1 s (the slow first validation step), the others a few ms: all 8 epochs fit in
    # 3 s. Taking epoch 1 as the cost of every epoch would end the run after epoch 2 or 3.
    run.fit(model, lambda first: training.epoch_batches(data, 4, first, 8), steps,
            validation_data=data.batch(4), callbacks=[_SlowFirstValidation()], budget_seconds=3.0)
    assert run.state["stages"]["main"]["epochs_done"] == 8


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


def test_ctrl_c_says_how_to_resume(tmp_path, capsys):
    run = training.start_run(ToyConfig, ["--out", str(tmp_path), "--epochs", "5"])
    model = _small_model()
    model.compile(optimizer=run.optimizer(4), loss="mse")
    data = tf.data.Dataset.from_tensor_slices((np.zeros((16, 4), "float32"), np.zeros((16, 2), "float32")))
    with pytest.raises(SystemExit) as exit_info:
        run.fit(model, lambda first: training.epoch_batches(data, 4, first, 5), 4, callbacks=[_Interrupt()])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted after epoch" in err and "re-run the same command to resume" in err
    assert "Traceback" not in err


def test_fewer_examples_than_one_batch_is_refused(tmp_path):
    run = training.start_run(ToyConfig, ["--out", str(tmp_path)])
    model = _small_model()
    with pytest.raises(training.RunError, match="--batch-size"):
        run.fit(model, tf.data.Dataset.range(1), 0)


def test_jit_compile_auto_follows_the_measured_verdict(tmp_path, monkeypatch):
    """--jit-compile auto: the benchmark's verdict for a measured model, Keras' "auto" otherwise;
    on / off are obeyed whatever was measured."""
    monkeypatch.setitem(training.JIT_MEASURED_FASTER, "fast_model", True)
    assert training.JIT_MEASURED_FASTER["faster_rcnn"] is False  # measured slower on the CPU
    for flag, expected in [("auto", (False, True, "auto")), ("on", (True, True, True)),
                           ("off", (False, False, False))]:
        run = training.start_run(ToyConfig, ["--out", str(tmp_path / flag), "--jit-compile", flag,
                                             "--no-deterministic"])
        got = tuple(run.jit_compile_for(name) for name in ("faster_rcnn", "fast_model", "unmeasured"))
        assert got == expected, flag
    # A step that cannot compile refuses "on" with its reason (auto and off give False).
    assert run.no_jit_compile("no kernel") is False  # run of the last flag, "off"
    run_on = training.start_run(ToyConfig, ["--out", str(tmp_path / "on2"), "--jit-compile", "on",
                                            "--no-deterministic"])
    with pytest.raises(training.RunError, match="--jit-compile on: no kernel; use --jit-compile auto or off"):
        run_on.no_jit_compile("no kernel")
    # Keras keeps XLA off under op determinism (on by default): "on" with it is refused, not ignored.
    with pytest.raises(training.RunError, match="--jit-compile on needs --no-deterministic"):
        training.start_run(ToyConfig, ["--out", str(tmp_path / "det"), "--jit-compile", "on"])
