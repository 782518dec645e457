"""The one training harness: everything a training script needs besides its data, model and pictures.

Every ``train_*.py`` in the repo reads top to bottom as *data -> model -> fit -> evaluate -> pictures*;
the plumbing around ``fit`` lives here, written once:

* **options**: ``TrainingConfig`` holds the options every script shares (``--epochs``, ``--batch-size``,
  ``--learning-rate``, ``--time-budget-minutes``, ``--strategy`` ...). A script subclasses it and adds
  its own; ``common.config`` turns the dataclass into the command line.
* **the run folder** (``--out``): ``config.json`` (the resolved options), ``checkpoint/`` (the state to
  resume from), ``logs/`` (TensorBoard and ``epochs.csv``), ``metrics.json`` and the script's pictures.
  A re-run with the same ``--out`` resumes; a re-run with *different* options refuses and lists them.
* **exact resume**: after every epoch one file, ``checkpoint/state.npz``, is written atomically (to a
  temporary file, flushed, then renamed over the old one, so a kill at any moment leaves either the old
  or the new checkpoint, never a broken one). It holds every variable of the model (weights, batch-norm
  statistics, the random-seed states of dropout and augmentation layers), every optimizer variable
  (step counter, Adam's moments), the learning-rate schedule's length, the stage of a multi-stage
  schedule and the whole history. The training data order is a pure function of ``(seed, epoch)``
  (``epoch_batches``), so a killed run re-run with the same command ends with the same weights as a run
  that was never interrupted.
* **learning rate**: Keras' own ``CosineDecay`` with linear warm-up (Goyal et al. 2017, sec. 2.2;
  Loshchilov & Hutter 2017); ``ShortenableCosineDecay`` only keeps its length in a variable so the time
  budget can shorten the decay without retracing the train step.
* **time budget** (``--time-budget-minutes``): after each epoch, if the remaining epochs will not fit,
  the run plans to stop after the last epoch that fits and shortens the decay to end there, so a slower
  machine ends on time with a fully decayed learning rate.
* **logging**: ``SimpleLogCallback`` lines, TensorBoard, a CSV; Ctrl-C prints how to resume.
* **distribution** (``--strategy``): ``default``, ``mirrored`` (several GPUs, or several CPU devices with
  ``--cpu-replicas N``). Models are built and compiled inside ``run.strategy.scope()`` and
  ``--batch-size`` is the *global* batch. ``multi_worker_mirrored`` (several machines) is refused with
  the reason: Keras 3.15's ``fit`` fails under it (keras-team/keras#20585).
* **XLA** (``--jit-compile auto|on|off``); for a model a benchmark timed both ways, ``auto`` follows
  the measurement (``JIT_MEASURED_FASTER``, ``run.jit_compile_for(name)``).
* **determinism** (``--deterministic``, on by default): seeded, and TensorFlow's deterministic kernels,
  so the same command gives the same weights, and a resumed run the uninterrupted one's. On this CPU
  it costs a few percent of step time.
* **the record**: ``run.finish(metrics)`` writes ``metrics.json`` with the script's keys plus
  ``train_seconds`` (summed over every resume), ``epochs``, ``replicas`` and ``parameters``, and
  ``history.png`` of every epoch.

Use (see any ``train_*.py``)::

    run = training.start_run(Config, argv, check=check_config)
    with run.strategy.scope():
        model = build_model(...)
        model.compile(optimizer=run.optimizer(steps_per_epoch), loss=..., jit_compile=run.jit_compile)
    run.fit(model, lambda first_epoch: training.epoch_batches(examples, ...), steps_per_epoch, ...)
    run.finish({"val_accuracy": ...}, model=model)
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import keras
import numpy as np
import tensorflow as tf

from common import callbacks as common_callbacks
from common import config as config_lib

STRATEGIES = ("default", "mirrored", "multi_worker_mirrored")
JIT_CHOICES = ("auto", "on", "off")
# What `--jit-compile auto` does for a model that a benchmark timed with and without XLA on this
# repo's reference machine (a 2-core CPU): True = XLA measured faster, so auto turns it on. Faster
# R-CNN: bench/bench_faster_rcnn_xla.py measured the XLA-compiled step slower (bench/RESULTS.md,
# "Faster R-CNN with XLA"). Re-run the benchmark on a GPU and change the entry there if it wins.
JIT_MEASURED_FASTER = {"faster_rcnn": False}
OPTIMIZERS = ("adam", "sgd", "adamw")
SCHEDULES = ("cosine", "constant")
# Options that may differ between a run and its resumption: they change nothing that is computed.
RESUMABLE_OPTIONS = ("out", "overwrite", "log_frequency", "fast")
CHECKPOINT_FILE = "state.npz"


@dataclass
class TrainingConfig:
    """Options shared by every training script (a script subclasses this and adds its own)."""

    epochs: int = field(default=10, metadata={"help": "passes over the training examples"})
    batch_size: int = field(default=32, metadata={
        "help": "examples per step, over all replicas (the global batch)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup_epochs: float = field(default=0.0, metadata={
        "help": "linear warm-up from 0 over this many epochs (Goyal et al. 2017)"})
    time_budget_minutes: float = field(default=0.0, metadata={
        "help": "end after the last epoch that fits in this many minutes of training, with the "
                "learning-rate decay shortened to match (0 = no budget)"})
    strategy: str = field(default="default", metadata={
        "help": "tf.distribute strategy: default (one device), mirrored (all local GPUs, or "
                "--cpu-replicas CPU devices); multi_worker_mirrored is refused until Keras' fit runs "
                "under it (keras-team/keras#20585)",
        "choices": STRATEGIES})
    cpu_replicas: int = field(default=1, metadata={
        "help": "split the CPU into this many logical devices (to run --strategy mirrored without GPUs)"})
    jit_compile: str = field(default="auto", metadata={
        "help": "XLA-compile the train step: auto (when the model says it can), on, off",
        "choices": JIT_CHOICES})
    seed: int = field(default=0, metadata={"help": "random seed (data, weights, order, augmentation)"})
    deterministic: bool = field(default=True, metadata={
        "help": "deterministic kernels (tf.config.experimental.enable_op_determinism), so a re-run or a "
                "resumed run gives the same weights; a few GPU kernels have no deterministic version, "
                "so turn it off there if TensorFlow says so"})
    out: str = field(default="runs/train", metadata={"help": "output folder; re-run with it to resume"})
    overwrite: bool = field(default=False, metadata={
        "help": "start again in --out, deleting the checkpoint and record of an earlier run there"})
    log_frequency: int = field(default=1, metadata={"help": "print every this many epochs"})
    fast: bool = field(default=False, metadata={"help": "tiny sizes for a smoke run (also env CVTF_FAST=1)"})

    FAST: ClassVar[dict] = {}


class RunError(SystemExit):
    """A problem with the options or the ``--out`` folder: printed as one message, exit status 2."""

    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message


def fail(message):
    """Stop the script with ``message`` on stderr (no traceback), exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise RunError(message)


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------

def check_shared_options(config):
    """Errors naming the flag for the options every script shares."""
    def positive(name, allow_zero=False):
        value = getattr(config, name)
        if value is None or (value < 0 if allow_zero else value <= 0):
            fail(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    for name in ("epochs", "batch_size", "learning_rate", "cpu_replicas", "log_frequency"):
        if hasattr(config, name):
            positive(name)
    for name in ("warmup_epochs", "time_budget_minutes"):
        if hasattr(config, name):
            positive(name, allow_zero=True)
    if config.strategy not in STRATEGIES:
        fail(f"--strategy must be one of {STRATEGIES}, got {config.strategy!r}")
    if config.jit_compile not in JIT_CHOICES:
        fail(f"--jit-compile must be one of {JIT_CHOICES}, got {config.jit_compile!r}")
    if config.jit_compile == "on" and getattr(config, "deterministic", False):
        # Keras turns XLA off without a word while TensorFlow's op determinism is on (not every
        # op has a deterministic XLA kernel): say so instead of training without it.
        fail("--jit-compile on needs --no-deterministic: Keras keeps XLA off while op determinism "
             "is on")
    if config.strategy == "multi_worker_mirrored":
        # Tried here with two worker processes on localhost: Keras 3.15's fit fails under
        # MultiWorkerMirroredStrategy, first in its symbolic build (a PerReplica batch it cannot
        # convert), then in reducing the step's logs across workers (keras-team/keras#20585, open).
        fail("--strategy multi_worker_mirrored: Keras 3's model.fit does not run under TensorFlow's "
             "MultiWorkerMirroredStrategy yet (keras-team/keras issue 20585), so training on several "
             "machines is not available; use --strategy mirrored for all the GPUs of one machine")
    if config.cpu_replicas > 1 and config.strategy == "default":
        fail("--cpu-replicas N > 1 needs --strategy mirrored")


def differing_options(saved: dict, current: dict) -> list[str]:
    """Names of the options (except RESUMABLE_OPTIONS) whose values differ between two configs."""
    names = sorted((set(saved) | set(current)) - set(RESUMABLE_OPTIONS))
    return [name for name in names if saved.get(name, "<absent>") != current.get(name, "<absent>")]


def prepare_out(config) -> Path:
    """Create ``--out``; refuse politely to resume a run made with other options.

    The first run writes ``config.json``. A re-run compares its options with it: equal (except
    RESUMABLE_OPTIONS) means resume; different means stop with the list of differences, unless
    ``--overwrite`` asks to start again (the old checkpoint, logs and record are deleted).
    """
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        fail(f"--out {str(out)!r}: cannot create or write the output folder ({error.strerror or error})")
    current = config_lib.config_to_dict(config)
    saved_path = out / "config.json"
    if saved_path.exists():
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, ValueError):
            saved = None
        differences = None if saved is None else differing_options(saved, current)
        if saved is None or differences:
            if getattr(config, "overwrite", False):
                print(f"--overwrite: starting again in {out} (deleting the earlier run's checkpoint, "
                      f"logs and metrics)")
                for name in ("checkpoint", "logs", "metrics.json", "history.png"):
                    path = out / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            elif saved is None:
                fail(f"--out {str(out)!r} has an unreadable config.json; choose a new --out or add "
                     f"--overwrite")
            else:
                lines = "\n".join(f"  --{n.replace('_', '-')}: earlier run {saved.get(n, '<absent>')!r}, "
                                  f"now {current.get(n, '<absent>')!r}" for n in differences)
                fail(f"--out {str(out)!r} holds a run made with other options, so it cannot be resumed:\n"
                     f"{lines}\nChoose a new --out, re-run with the earlier options to resume, or add "
                     f"--overwrite to start again there.")
    config_lib.save_config(config, out)
    return out


# --------------------------------------------------------------------------------------------------
# Distribution
# --------------------------------------------------------------------------------------------------

def split_cpu(replicas: int):
    """Split the CPU into ``replicas`` logical devices (must run before TensorFlow starts)."""
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError as error:
        fail(f"--cpu-replicas {replicas}: TensorFlow had already started in this process, so the CPU "
             f"cannot be split any more ({error}); pass it on the command line of a fresh process")


def make_strategy(name: str = "default", cpu_replicas: int = 1):
    """The ``tf.distribute`` strategy of ``--strategy`` (see ``TrainingConfig``)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if cpu_replicas > 1:
        split_cpu(cpu_replicas)
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        if gpus and cpu_replicas == 1:
            return tf.distribute.MirroredStrategy()
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
        # One CPU device has nothing to mirror to; the strategy still runs (one replica).
        return tf.distribute.MirroredStrategy(devices=devices)
    raise ValueError("multi_worker_mirrored: Keras 3's fit does not run under it (keras-team/keras#20585)")


def synchronize_batchnorm(model):
    """A copy of a functional ``model`` whose BatchNormalization layers use the statistics of the whole
    global batch across replicas (``synchronized=True``; Keras all-reduces the moments), so 2 replicas
    of 32 images normalise exactly as 1 replica of 64. Call it inside ``strategy.scope()`` before
    training."""

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            config = layer.get_config()
            config["synchronized"] = True
            return keras.layers.BatchNormalization.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())  # same names, same weights: only the statistics change
    return copy


# --------------------------------------------------------------------------------------------------
# Learning rate and optimizers
# --------------------------------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="common")
class ShortenableCosineDecay(keras.optimizers.schedules.CosineDecay):
    """``keras.optimizers.schedules.CosineDecay`` whose ``decay_steps`` can change while training.

    Keras' formula unchanged (warm-up, then cosine decay to ``alpha`` times the peak); ``decay_steps``
    is kept in a variable so the time budget can shorten the decay (``set_total_steps``) without
    retracing the compiled train step. ``get_config`` stores it as a number.
    """

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name="CosineDecay",
                 warmup_target=None, warmup_steps=0):
        super().__init__(initial_learning_rate, max(1, int(decay_steps)), alpha=alpha, name=name,
                         warmup_target=warmup_target, warmup_steps=int(warmup_steps))
        with tf.init_scope():
            self.decay_steps = tf.Variable(float(max(1, int(decay_steps))), trainable=False,
                                           dtype=tf.float32, name="decay_steps")

    def set_total_steps(self, total_steps):
        """Make the schedule end at ``total_steps`` (warm-up included)."""
        self.decay_steps.assign(float(max(1, int(total_steps) - int(self.warmup_steps))))

    def get_config(self):
        config = super().get_config()
        config["decay_steps"] = int(round(float(self.decay_steps.numpy())))
        return config


def shortenable_cosine_decay(peak, decay_steps, warmup_steps=0, alpha=0.0):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then a cosine decay to ``alpha * peak``
    over ``decay_steps`` (``alpha=1`` keeps the rate constant after warm-up): a ``ShortenableCosineDecay``.
    """
    return ShortenableCosineDecay(0.0 if warmup_steps else peak, decay_steps, alpha=alpha,
                                  warmup_target=peak if warmup_steps else None,
                                  warmup_steps=warmup_steps)


def make_optimizer(name, learning_rate, weight_decay=None, clipnorm=None):
    """Adam, SGD (momentum 0.9, Nesterov; He et al. 2016 sec. 3.4) or AdamW (Loshchilov & Hutter 2019).

    ``learning_rate`` is a float or a schedule; ``weight_decay`` is Keras' decoupled decay (None = 0 for
    Adam and SGD, 0.05 for AdamW); ``clipnorm`` clips the global gradient norm.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if weight_decay is None:
        weight_decay = 0.05 if name == "adamw" else 0.0
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    options = {"global_clipnorm": clipnorm} if clipnorm else {}
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True,
                                    weight_decay=weight_decay or None, **options)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=weight_decay, **options)
    return keras.optimizers.Adam(learning_rate, weight_decay=weight_decay or None, **options)


# --------------------------------------------------------------------------------------------------
# Data order
# --------------------------------------------------------------------------------------------------

def epoch_batches(dataset, batch_size, first_epoch, epochs, seed=0, shuffle_buffer=None,
                  drop_remainder=False, batch_fn=None):
    """Batches for epochs ``first_epoch .. epochs - 1`` in one stream, each epoch's order a pure function
    of ``(seed, epoch)``, so a resumed run sees exactly the batches an uninterrupted run would.

    ``dataset`` yields examples (cache it first: it is read once per epoch). ``batch_fn(dataset, epoch)``
    replaces ``dataset.batch(batch_size, drop_remainder)`` (e.g. padded detection batches, or noise
    seeded by the epoch). Pass ``steps_per_epoch`` to ``fit``: the stream does not end at epoch
    boundaries.
    """
    count = int(dataset.cardinality())
    buffer = shuffle_buffer or (count if count > 0 else 10000)

    def one_epoch(epoch):
        order_seed = (int(seed) * 1_000_003 + int(epoch)) % (2**31 - 1)  # one order per (seed, epoch)
        shuffled = dataset.shuffle(buffer, seed=order_seed, reshuffle_each_iteration=False)
        if batch_fn is not None:
            return batch_fn(shuffled, epoch)
        return shuffled.batch(batch_size, drop_remainder=drop_remainder)

    # One dataset per epoch, chained: the seeds stay Python numbers (tf.data takes no symbolic seed
    # when the global seed is set).
    stream = None
    for epoch in range(int(first_epoch), max(int(epochs), int(first_epoch) + 1)):
        stream = one_epoch(epoch) if stream is None else stream.concatenate(one_epoch(epoch))
    return stream.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def _variables(model):
    """The model's variables and its optimizer's, in a fixed order, with their names."""
    named = [(f"model/{v.path}", v) for v in model.variables]
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        named += [(f"optimizer/{v.path}", v) for v in optimizer.variables]
    schedule = getattr(optimizer, "learning_rate", None) if optimizer is not None else None
    schedule = getattr(optimizer, "_learning_rate", schedule)
    decay = getattr(schedule, "decay_steps", None)
    if decay is not None and hasattr(decay, "assign"):
        named.append(("schedule/decay_steps", decay))
    return named


def write_atomically(path: Path, payload: bytes):
    """Write ``payload`` to ``path`` so that a kill at any moment leaves the old or the new file."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    try:  # make the rename itself durable
        directory = os.open(path.parent, os.O_RDONLY)
        os.fsync(directory)
        os.close(directory)
    except OSError:
        pass


def save_checkpoint(directory, model, state: dict):
    """``directory/state.npz``: every model and optimizer variable plus ``state`` (JSON), atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for index, (name, variable) in enumerate(_variables(model)):
        arrays[f"{index:05d}|{name}"] = np.asarray(variable.numpy())
    arrays["__state__"] = np.frombuffer(json.dumps(state).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(directory / CHECKPOINT_FILE, buffer.getvalue())


def read_checkpoint_state(directory) -> dict | None:
    """The JSON state of ``directory/state.npz`` (None if there is no checkpoint)."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        with np.load(path) as saved:
            return json.loads(bytes(saved["__state__"]).decode())
    except (OSError, ValueError, KeyError) as error:
        fail(f"the checkpoint {path} cannot be read ({error}); choose a new --out or add --overwrite")


def restore_checkpoint(directory, model, with_optimizer=True) -> dict | None:
    """Assign the saved variables to ``model`` (and its optimizer); returns the saved state or None.

    The optimizer must be built (``model.optimizer.build(model.trainable_variables)``) for its
    variables to be restored. Raises a clear error when the checkpoint holds another model.
    """
    path = Path(directory) / CHECKPOINT_FILE
    state = read_checkpoint_state(directory)
    if state is None:
        return None
    with np.load(path) as saved:
        keys = sorted(k for k in saved.files if k != "__state__")
        stored = [(key.split("|", 1)[1], saved[key]) for key in keys]
    # Matched by position (layer names depend on what else the process built), checked by kind and shape.
    saved_model = [(n, v) for n, v in stored if n.startswith("model/")]
    saved_optimizer = [(n, v) for n, v in stored if n.startswith("optimizer/")]
    saved_schedule = [(n, v) for n, v in stored if n.startswith("schedule/")]
    current = _variables(model)
    current_model = [(n, v) for n, v in current if n.startswith("model/")]
    current_optimizer = [(n, v) for n, v in current if n.startswith("optimizer/")]
    current_schedule = [(n, v) for n, v in current if n.startswith("schedule/")]
    pairs = list(zip(current_model, saved_model))
    if len(current_model) != len(saved_model):
        fail(f"the checkpoint in {directory} was written by another model ({len(saved_model)} variables, "
             f"the model has {len(current_model)}); choose a new --out or add --overwrite")
    if with_optimizer and len(current_optimizer) == len(saved_optimizer):
        pairs += list(zip(current_optimizer, saved_optimizer))
    if len(current_schedule) == len(saved_schedule):
        pairs += list(zip(current_schedule, saved_schedule))
    for (name, variable), (saved_name, value) in pairs:
        if tuple(value.shape) != tuple(variable.shape):
            fail(f"the checkpoint in {directory} was written by another model ({saved_name} has shape "
                 f"{value.shape}, the model's {name} {tuple(variable.shape)}); choose a new --out or add "
                 f"--overwrite")
    for (name, variable), (saved_name, value) in pairs:
        variable.assign(value)
    return state


# --------------------------------------------------------------------------------------------------
# Callbacks of the harness
# --------------------------------------------------------------------------------------------------

def _make_recorder(run, stage, planned_epochs, steps_per_epoch, budget_seconds, schedule):
    class EpochRecorder(keras.callbacks.Callback):
        """After each epoch: add its seconds and logs to the record, apply the time budget, checkpoint."""

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()
            self._first_batch_seconds = None
            self._first_test_batch_seconds = None

        def on_train_batch_end(self, batch, logs=None):
            # The first step of a process also traces (and compiles) the step: time it apart.
            if batch == 0 and not getattr(self, "_traced", False):
                self._first_batch_seconds = time.perf_counter() - self._start
                self._traced = True

        def on_test_begin(self, logs=None):
            self._test_start = time.perf_counter()

        def on_test_batch_end(self, batch, logs=None):
            # So does the first validation step (inside the first epoch's seconds): time it apart too.
            if batch == 0 and not getattr(self, "_test_traced", False):
                self._first_test_batch_seconds = time.perf_counter() - self._test_start
                self._test_traced = True

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self._start
            state = run.state
            stage_state = state["stages"].setdefault(stage, {"epochs_done": 0,
                                                             "last_epoch": planned_epochs})
            stage_state["epochs_done"] = epoch + 1
            state["train_seconds"] += seconds
            state["stage_seconds"][stage] = state["stage_seconds"].get(stage, 0.0) + seconds
            record = {"stage": stage, "epoch": epoch + 1, "seconds": round(seconds, 3)}
            record.update({k: float(v) for k, v in (logs or {}).items()
                           if isinstance(v, (int, float, np.floating, np.integer)) or hasattr(v, "numpy")})
            state["history"].append(record)
            if budget_seconds:
                done = epoch + 1
                spent = state["stage_seconds"][stage]
                # The cost of the next epochs: the last epoch's, without the tracing of the first
                # training and validation steps (each counted as one ordinary training step).
                per_epoch = seconds
                traced = [t for t in (self._first_batch_seconds, self._first_test_batch_seconds)
                          if t is not None]
                if traced and steps_per_epoch > len(traced):
                    rest = max(seconds - sum(traced), 0.0)
                    per_epoch = rest * steps_per_epoch / (steps_per_epoch - len(traced))
                affordable = done + int(max(0.0, budget_seconds - spent) // max(per_epoch, 1e-9))
                if affordable < stage_state["last_epoch"]:
                    stage_state["last_epoch"] = max(done, affordable)
                    if schedule is not None and hasattr(schedule, "set_total_steps"):
                        schedule.set_total_steps(stage_state["last_epoch"] * steps_per_epoch)
                    print(f"time budget: {per_epoch:.1f} s per epoch, so this run ends after epoch "
                          f"{stage_state['last_epoch']} of {planned_epochs} (learning-rate decay "
                          f"shortened to match)")
                if done >= stage_state["last_epoch"]:
                    self.model.stop_training = True
                    stage_state["stopped_by_budget"] = done < planned_epochs
            run.save(self.model)

    return EpochRecorder()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

class Run:
    """One training run: its config, ``--out`` folder, strategy, checkpoint state and record.

    Made by ``start_run``. ``state`` (saved in every checkpoint) holds ``stages`` ({stage: epochs done,
    planned last epoch}), ``train_seconds`` (summed over all resumes), ``stage_seconds`` and
    ``history`` (one dict of logs per epoch, in order).
    """

    def __init__(self, config, out: Path, strategy, script: str):
        self.config = config
        self.out = out
        self.strategy = strategy
        self.script = script
        self.checkpoint_dir = out / "checkpoint"
        self.start_time = time.perf_counter()
        saved = read_checkpoint_state(self.checkpoint_dir)
        self.state = saved or {"stages": {}, "train_seconds": 0.0, "stage_seconds": {},
                               "history": [], "current_stage": None}
        self.resumed = saved is not None
        self.epochs_this_run = 0
        if saved is not None:
            stages = ", ".join(f"{name} {value.get('epochs_done', 0)}" for name, value in saved["stages"].items())
            print(f"resuming from {self.checkpoint_dir}: epochs done {stages or 'none'}, "
                  f"{saved['train_seconds']:.0f} s of training so far")

    # ----------------------------------------------------------------- facts
    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def jit_compile(self):
        """``compile(jit_compile=...)``: "auto" for ``auto`` (Keras decides per model), else a bool."""
        return {"auto": "auto", "on": True, "off": False}[self.config.jit_compile]

    def no_jit_compile(self, reason: str):
        """``compile(jit_compile=False)`` for a step that cannot compile: ``--jit-compile on`` is
        refused with ``reason`` (instead of being ignored), ``auto`` and ``off`` give False."""
        if self.config.jit_compile == "on":
            fail(f"--jit-compile on: {reason}; use --jit-compile auto or off")
        return False

    def jit_compile_for(self, model_name: str):
        """``compile(jit_compile=...)`` for a model with a measured XLA verdict.

        ``on`` / ``off`` as asked; ``auto``: ``JIT_MEASURED_FASTER[model_name]`` (XLA only where a
        benchmark found the compiled step faster), or Keras' own rule ("auto": XLA only on a GPU)
        for a model with no entry. Keras keeps XLA off while op determinism is on, so
        ``--jit-compile on`` needs ``--no-deterministic``.
        """
        if self.config.jit_compile != "auto" or model_name not in JIT_MEASURED_FASTER:
            return self.jit_compile
        return bool(JIT_MEASURED_FASTER[model_name])

    def initial_epoch(self, stage: str = "main") -> int:
        return int(self.state["stages"].get(stage, {}).get("epochs_done", 0))

    def stage_finished(self, stage: str, epochs: int) -> bool:
        stage_state = self.state["stages"].get(stage, {})
        done = int(stage_state.get("epochs_done", 0))
        return done >= min(epochs, int(stage_state.get("last_epoch", epochs)))

    # ----------------------------------------------------------------- optimizer
    def schedule(self, steps_per_epoch: int, epochs: int | None = None, learning_rate=None,
                 warmup_epochs=None, kind: str = "cosine", alpha: float = 0.0):
        """Cosine decay (or ``kind="constant"``) with warm-up over the planned steps of one stage."""
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        epochs = self.config.epochs if epochs is None else epochs
        peak = self.config.learning_rate if learning_rate is None else learning_rate
        warmup_epochs = getattr(self.config, "warmup_epochs", 0.0) if warmup_epochs is None \
            else warmup_epochs
        total = max(1, int(steps_per_epoch) * int(epochs))
        warmup = min(int(round(warmup_epochs * steps_per_epoch)), total - 1)
        return shortenable_cosine_decay(peak, total - warmup, warmup_steps=warmup,
                                        alpha=1.0 if kind == "constant" else alpha)

    def optimizer(self, steps_per_epoch: int, name: str = "adam", epochs: int | None = None,
                  learning_rate=None, weight_decay=None, clipnorm=None, kind="cosine", alpha=0.0):
        """An optimizer on ``schedule(...)``; build it inside ``strategy.scope()``."""
        return make_optimizer(name, self.schedule(steps_per_epoch, epochs, learning_rate, kind=kind,
                                                  alpha=alpha),
                              weight_decay=weight_decay, clipnorm=clipnorm)

    # ----------------------------------------------------------------- checkpoints
    def save(self, model):
        save_checkpoint(self.checkpoint_dir, model, self.state)

    def restore(self, model, stage: str | None):
        """Load the checkpoint into ``model`` (and its optimizer when it was saved in the same stage;
        ``stage=None`` loads the model's variables only, e.g. to evaluate a run finished earlier)."""
        saved = read_checkpoint_state(self.checkpoint_dir)
        if saved is None:
            return False
        optimizer = getattr(model, "optimizer", None)
        same_stage = saved.get("current_stage") == stage
        if optimizer is not None and same_stage:
            with self.strategy.scope():
                if not optimizer.built:
                    optimizer.build(model.trainable_variables)
        restore_checkpoint(self.checkpoint_dir, model, with_optimizer=same_stage)
        return True

    # ----------------------------------------------------------------- fit
    def fit(self, model, train_data, steps_per_epoch: int, *, validation_data=None,
            log_keys: dict | None = None, callbacks=(), stage: str = "main", epochs: int | None = None,
            budget_seconds: float | None = None, validation_freq: int = 1, after_restore=None):
        """``model.fit`` for one stage, resumable exactly. Returns the history of this call's epochs.

        ``train_data`` is a dataset of batches or ``train_data(first_epoch) -> dataset`` (use
        ``epoch_batches``, so the order does not depend on where a run resumed). ``budget_seconds``
        defaults to ``--time-budget-minutes``; a multi-stage script passes each stage its share.
        ``after_restore()`` runs after the checkpoint is loaded (e.g. to re-tie shared weights).
        """
        epochs = self.config.epochs if epochs is None else int(epochs)
        if steps_per_epoch < 1:
            fail(f"there are fewer training examples than one batch of --batch-size "
                 f"{self.config.batch_size}; lower --batch-size or add training examples")
        if self.restore(model, stage) and after_restore is not None:
            after_restore()
        first_epoch = self.initial_epoch(stage)
        self.state["current_stage"] = stage
        stage_state = self.state["stages"].setdefault(stage, {"epochs_done": first_epoch,
                                                              "last_epoch": epochs})
        last_epoch = min(epochs, int(stage_state.get("last_epoch", epochs)))
        optimizer = getattr(model, "optimizer", None)
        schedule = getattr(optimizer, "_learning_rate", None)
        if schedule is not None and hasattr(schedule, "set_total_steps") and last_epoch < epochs:
            schedule.set_total_steps(last_epoch * steps_per_epoch)  # as the budget had shortened it
        if first_epoch >= last_epoch:
            print(f"{stage if stage != 'main' else 'training'}: all {first_epoch} epochs already done "
                  f"in {self.out} (re-run with a new --out to train again)")
            return {}
        data = train_data(first_epoch) if callable(train_data) else train_data
        budget = 60.0 * self.config.time_budget_minutes if budget_seconds is None else budget_seconds
        recorder = _make_recorder(self, stage, epochs, steps_per_epoch, budget, schedule)
        log_dir = self.out / "logs" if stage == "main" else self.out / "logs" / stage
        fit_callbacks = [recorder, *callbacks]
        if log_keys:
            fit_callbacks.append(common_callbacks.SimpleLogCallback(
                log_keys, last_epoch, getattr(self.config, "log_frequency", 1)))
        fit_callbacks += common_callbacks.epoch_log_callbacks(log_dir, "epochs.csv")
        try:
            history = model.fit(data, epochs=last_epoch, initial_epoch=first_epoch,
                                steps_per_epoch=steps_per_epoch, validation_data=validation_data,
                                validation_freq=validation_freq, callbacks=fit_callbacks, verbose=0,
                                shuffle=False)  # the order is epoch_batches' business
        except KeyboardInterrupt:
            done = self.initial_epoch(stage)
            print(f"\ninterrupted after epoch {done} of {last_epoch}"
                  f"{'' if stage == 'main' else f' (stage {stage})'}; re-run the same command to "
                  f"resume from there (the checkpoint is in {self.checkpoint_dir})", file=sys.stderr)
            raise SystemExit(130) from None
        self.epochs_this_run += len(history.epoch)
        return history.history

    # ----------------------------------------------------------------- record
    @property
    def epochs_done(self) -> int:
        return int(sum(s.get("epochs_done", 0) for s in self.state["stages"].values()))

    def history(self, stage: str | None = None) -> dict:
        """{key: [value per epoch]} over every epoch of the run (all resumes), optionally one stage."""
        rows = [h for h in self.state["history"] if stage is None or h["stage"] == stage]
        keys = [k for k in dict.fromkeys(k for row in rows for k in row)
                if k not in ("stage", "epoch", "seconds")]
        return {k: [row.get(k, float("nan")) for row in rows] for k in keys}

    def finish(self, metrics: dict, model=None, history_keys=None) -> dict:
        """Write ``metrics.json`` (the script's keys plus the run's record) and ``history.png``."""
        record = dict(metrics)
        record.setdefault("train_seconds", round(float(self.state["train_seconds"]), 2))
        record.setdefault("epochs", self.epochs_done)
        record["epochs_this_run"] = self.epochs_this_run
        record["replicas"] = self.replicas
        record["total_seconds_this_run"] = round(time.perf_counter() - self.start_time, 2)
        if model is not None:
            record.setdefault("parameters", int(model.count_params()))
        stopped = [s for s, v in self.state["stages"].items() if v.get("stopped_by_budget")]
        if stopped:
            record["stopped_by_time_budget"] = True
        config_lib.write_metrics(record, self.out)
        history = self.history()
        if history_keys:
            history = {k: v for k, v in history.items() if k in history_keys
                       or k.removeprefix("val_") in history_keys}
        if history:
            from common import viz
            import matplotlib.pyplot as plt

            plt.close(viz.plot_history(history, save_path=self.out / "history.png"))
        return record


def start_run(config_cls, argv=None, *, check=None, description: str | None = None,
              script: str | None = None) -> Run:
    """Parse the options, check them, prepare ``--out``, seed, and set up the strategy.

    ``check(config)`` is the script's own option check (raise ValueError naming the flag; it is printed
    as a one-line error). Returns the ``Run``.
    """
    try:
        config = config_lib.parse_config(config_cls, argv, description=description)
    except ValueError as error:
        fail(str(error))
    if check is not None:  # first: it may resolve script defaults (e.g. a learning rate per optimizer)
        try:
            check(config)
        except ValueError as error:
            fail(str(error))
    check_shared_options(config)
    out = prepare_out(config)
    strategy = make_strategy(config.strategy, config.cpu_replicas)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        # Without it, thread-order differences of ~1e-7 in a CPU kernel can flip a top-k or NMS choice
        # and send a Faster R-CNN run elsewhere by 0.05 in a few steps: a resumed run would not be the
        # run it resumed.
        tf.config.experimental.enable_op_determinism()
    script = script or Path(sys.argv[0]).stem
    return Run(config, out, strategy, script)
