"""Keras callbacks shared by every training script.

* ``SimpleLogCallback`` prints one compact line per logged epoch, e.g.::

      Epoch  1/20  loss 1.2345  acc 0.5120  val acc 0.6010  (3.2 s)

  It logs the first epoch, the last epoch and every ``log_frequency``-th
  epoch, numbering epochs from 1 as a reader counts them.
* ``epoch_log_callbacks`` writes TensorBoard logs and a CSV of the epochs.
"""

from __future__ import annotations

import time
from pathlib import Path

import keras


@keras.saving.register_keras_serializable(package="common")
class SimpleLogCallback(keras.callbacks.Callback):
    """One line per logged epoch with the metrics you choose.

    Args:
      metrics_dict: maps the name to print to the key in Keras' ``logs``,
        e.g. ``{"loss": "loss", "acc": "accuracy", "val acc": "val_accuracy"}``.
        Keys missing from the logs of an epoch are skipped.
      num_epochs: total number of epochs of the run (for "Epoch 3/20").
      log_frequency: print every this many epochs; the first and the last
        epoch are always printed.
      print_fn: where lines go (``print`` by default; tests capture it).
    """

    def __init__(self, metrics_dict: dict, num_epochs: int, log_frequency: int = 1,
                 print_fn=print):
        super().__init__()
        if not isinstance(metrics_dict, dict) or not metrics_dict:
            raise ValueError(f"metrics_dict must be a non-empty dict of name -> logs key, got {metrics_dict!r}")
        if int(num_epochs) < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        if int(log_frequency) < 1:
            raise ValueError(f"log_frequency must be >= 1, got {log_frequency}")
        self.metrics_dict = dict(metrics_dict)
        self.num_epochs = int(num_epochs)
        self.log_frequency = int(log_frequency)
        self.print_fn = print_fn
        self._epoch_start = None

    def should_log(self, epoch_number: int) -> bool:
        """Whether 1-based ``epoch_number`` is printed."""
        return (epoch_number == 1 or epoch_number == self.num_epochs
                or epoch_number % self.log_frequency == 0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def format_line(self, epoch_number: int, logs: dict, seconds: float | None = None) -> str:
        width = len(str(self.num_epochs))
        parts = [f"Epoch {epoch_number:>{width}}/{self.num_epochs}"]
        for name, key in self.metrics_dict.items():
            if key in logs:
                parts.append(f"{name} {float(logs[key]):.4f}")
        if seconds is not None:
            parts.append(f"({seconds:.1f} s)")
        return "  ".join(parts)

    def on_epoch_end(self, epoch, logs=None):
        epoch_number = epoch + 1  # Keras counts from 0, readers from 1
        if self.should_log(epoch_number):
            seconds = None if self._epoch_start is None else time.perf_counter() - self._epoch_start
            self.print_fn(self.format_line(epoch_number, logs or {}, seconds))

    def get_config(self):
        return {"metrics_dict": self.metrics_dict, "num_epochs": self.num_epochs,
                "log_frequency": self.log_frequency}


def epoch_log_callbacks(log_dir, csv_name: str = "epochs.csv") -> list:
    """TensorBoard logs in ``log_dir`` plus ``log_dir/<csv_name>``, one row per epoch.

    The CSV is appended to, so a resumed run adds its epochs after the first
    run's. TensorBoard needs the ``tensorboard`` package (in requirements.txt);
    if it is missing the CSV alone is written, so a run never fails for want
    of a viewer. View with ``tensorboard --logdir <out>/logs``.
    """
    import importlib.util

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [keras.callbacks.CSVLogger(str(log_dir / csv_name), append=True)]
    if importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(str(log_dir), write_graph=False, profile_batch=0))
    else:
        print("(tensorboard is not installed: epoch logs go to the CSV only)")
    return callbacks
