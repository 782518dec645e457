"""Train a convolutional denoising autoencoder on the embedded images.

The autoencoder (``models.build_denoising_autoencoder``: encoder, bottleneck,
decoder) sees an image corrupted with Gaussian and salt-and-pepper noise and
is trained to output the clean image (Vincent et al. 2008). Quality is
measured with PSNR and SSIM (Wang et al. 2004) of the noisy input and of the
denoised output against the clean image; the gain (output minus input) must
be positive. Runs on a CPU in a few minutes; ``--fast`` in seconds.

Run from the repository root::

    python ch06_segmentation/train_denoiser.py
    python ch06_segmentation/train_denoiser.py --fast
    python ch06_segmentation/train_denoiser.py --noise gaussian --stddev 0.2
    python ch06_segmentation/train_denoiser.py --help

Writes into ``--out`` (default ``runs/train_denoiser``): ``config.json``,
``backup/`` (resume), ``logs/``, ``model.keras``, ``before_after.png``
(clean | noisy | denoised rows) and ``metrics.json`` with
``val_psnr_noisy``, ``val_psnr_denoised``, ``val_psnr_gain``, the same for
SSIM, per noise type, ``train_seconds`` and ``epochs``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import tensorflow as tf

from common import data, training, viz
from ch06_segmentation import losses, models, noise


@dataclass
class Config(training.TrainingConfig):
    """Options of train_denoiser.py (denoising autoencoder)."""

    dataset: str = field(default="shapes_segmentation", metadata={
        "help": "data set whose images are used (labels are ignored)"})
    data_dir: str | None = field(default=None, metadata={"help": "tensorflow-datasets folder"})
    image_size: int = field(default=64, metadata={"help": "square side (multiple of 4)"})
    num_train_examples: int = field(default=2000, metadata={"help": "training images"})
    num_val_examples: int = field(default=200, metadata={"help": "validation images"})
    epochs: int = field(default=8, metadata={"help": "passes over the training images"})
    batch_size: int = field(default=32, metadata={"help": "images per step, over all replicas"})
    learning_rate: float = field(default=2e-3, metadata={"help": "Adam's peak learning rate (cosine decay)"})
    filters: tuple[int, ...] = field(default=(16, 32), metadata={
        "help": "encoder widths, one stride-2 stage each"})
    bottleneck_filters: int = field(default=32, metadata={"help": "channels of the bottleneck"})
    loss: str = field(default="mse", metadata={
        "help": "mse (maximises PSNR directly) or mae", "choices": ("mse", "mae")})
    noise: str = field(default="mixed", metadata={
        "help": "training noise: gaussian, salt_and_pepper or mixed (both)", "choices": noise.NOISE_TYPES})
    stddev: float = field(default=0.1, metadata={"help": "Gaussian noise standard deviation"})
    amount: float = field(default=0.05, metadata={"help": "salt-and-pepper fraction of pixels"})
    time_budget_minutes: float = field(default=4.0, metadata={
        "help": "end after the last epoch that fits in this many minutes of training (0 = no budget)"})
    out: str = field(default="runs/train_denoiser", metadata={"help": "output folder; re-run to resume"})

    FAST: ClassVar[dict] = {"image_size": 32, "num_train_examples": 1024, "num_val_examples": 16,
                            "epochs": 3, "batch_size": 16, "time_budget_minutes": 0.0}


def check_config(config):
    for name in ("image_size", "num_train_examples", "num_val_examples", "bottleneck_filters"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.image_size % (2 ** len(config.filters)):
        raise ValueError(f"--image-size must be a multiple of {2 ** len(config.filters)} (one halving per "
                         f"--filters entry), got {config.image_size}")
    if config.stddev < 0 or not 0 <= config.amount <= 1:
        raise ValueError(f"--stddev must be >= 0 and --amount in [0, 1], got {config.stddev}, {config.amount}")


def load_images(config: Config, split: str, num_examples: int) -> tf.data.Dataset:
    """Clean images [H, W, 3] of one split, kept in memory."""
    dataset = data.load(config.dataset, split, image_size=config.image_size,
                        num_examples=num_examples, seed=config.seed, data_dir=config.data_dir)
    return dataset.map(lambda example: example["image"]).cache()


def noisy_pairs(images: tf.data.Dataset, config: Config, noise_type: str, seed: int):
    """Batched (noisy, clean) pairs; batch i gets noise seed [seed, i], so it differs per batch
    (and per epoch, whose seed differs), yet the same run always sees the same noise."""
    base = tf.constant(seed, tf.int64)

    def corrupt(index, clean):
        noisy = noise.add_noise(clean, noise_type, tf.stack([base, index]), config.stddev,
                                config.amount)
        return noisy, clean

    return images.enumerate().map(corrupt, num_parallel_calls=tf.data.AUTOTUNE)


def quality(model, clean_batches, config: Config, noise_type: str, seed: int):
    """Mean PSNR / SSIM of the noisy input and of the denoised output vs the clean image."""
    predict = tf.function(lambda images: model(images, training=False))
    scores = {"psnr_noisy": [], "psnr_denoised": [], "ssim_noisy": [], "ssim_denoised": []}
    for noisy, clean in noisy_pairs(clean_batches, config, noise_type, seed):
        denoised = predict(noisy)
        scores["psnr_noisy"].append(losses.psnr(clean, noisy).numpy())
        scores["psnr_denoised"].append(losses.psnr(clean, denoised).numpy())
        scores["ssim_noisy"].append(losses.ssim(clean, noisy).numpy())
        scores["ssim_denoised"].append(losses.ssim(clean, denoised).numpy())
    return {key: float(np.mean(np.concatenate(values))) for key, values in scores.items()}


def save_before_after(model, clean_batches, config: Config, path, rows=4):
    clean = next(iter(clean_batches.unbatch().batch(rows)))
    noisy = noise.add_noise(clean, config.noise, [config.seed, 999], config.stddev, config.amount)
    denoised = model(noisy, training=False)
    images, titles = [], []
    for index in range(len(clean)):
        for name, batch in (("clean", clean), ("noisy", noisy), ("denoised", denoised)):
            images.append(batch[index].numpy())
            psnr = float(losses.psnr(clean[index:index + 1], batch[index:index + 1])[0])
            titles.append(name if name == "clean" else f"{name} {psnr:.1f} dB")
    figure = viz.show_images(images, titles=titles, cols=3, save_path=path)
    import matplotlib.pyplot as plt
    plt.close(figure)


def main(argv=None) -> dict:
    run = training.start_run(Config, argv, check=check_config, description=__doc__.splitlines()[0])
    config, out = run.config, run.out

    train_images = load_images(config, "train", config.num_train_examples)
    val_images = load_images(config, "validation", config.num_val_examples)
    num_train = sum(int(batch.shape[0]) for batch in train_images.batch(512))  # fills the cache
    # Fresh noise every epoch and batch: seed (seed, epoch), batch index within the epoch.
    train_batches = lambda first_epoch: training.epoch_batches(  # noqa: E731
        train_images, config.batch_size, first_epoch, config.epochs, seed=config.seed,
        batch_fn=lambda images, epoch: noisy_pairs(images.batch(config.batch_size), config, config.noise,
                                                   config.seed * 100_003 + epoch))
    val_clean = val_images.batch(config.batch_size)
    val_batches = noisy_pairs(val_clean, config, config.noise, config.seed + 1).cache()
    steps_per_epoch = -(-num_train // config.batch_size)

    with run.strategy.scope():
        model = models.build_denoising_autoencoder((config.image_size, config.image_size, 3),
                                                   filters=config.filters,
                                                   bottleneck_filters=config.bottleneck_filters)
        # Squared error is what PSNR measures; absolute error ("mae") is an alternative
        # that weighs the few salt-and-pepper outliers less.
        model.compile(optimizer=run.optimizer(steps_per_epoch, "adam"), loss=config.loss, metrics=["mse"],
                      jit_compile=run.jit_compile)
    print(f"model: {model.name}, {model.count_params():,} parameters; noise {config.noise} "
          f"(stddev {config.stddev}, amount {config.amount}); {num_train} training images")
    run.fit(model, train_batches, steps_per_epoch, validation_data=val_batches,
            log_keys={"loss": "loss", "val loss": "val_loss", "val MSE": "val_mse"})

    metrics = {"num_train_examples": num_train}
    lines = []
    for noise_type in noise.NOISE_TYPES:
        scores = quality(model, val_clean, config, noise_type, config.seed + 2)
        suffix = "" if noise_type == config.noise else f"_{noise_type}"
        for measure in ("psnr", "ssim"):
            metrics[f"val_{measure}_noisy{suffix}"] = scores[f"{measure}_noisy"]
            metrics[f"val_{measure}_denoised{suffix}"] = scores[f"{measure}_denoised"]
            metrics[f"val_{measure}_gain{suffix}"] = (scores[f"{measure}_denoised"]
                                                      - scores[f"{measure}_noisy"])
        lines.append(f"  {noise_type:16s} PSNR {scores['psnr_noisy']:.2f} -> "
                     f"{scores['psnr_denoised']:.2f} dB, SSIM {scores['ssim_noisy']:.3f} -> "
                     f"{scores['ssim_denoised']:.3f}")
    model.save(out / "model.keras")
    save_before_after(model, val_clean, config, out / "before_after.png")
    metrics = run.finish(metrics, model=model, history_keys=["loss", "mse"])
    print(f"\nSummary: denoising autoencoder, {config.image_size}px, {metrics['epochs']} epochs, "
          f"{metrics['train_seconds']:.0f} s of training (trained on {config.noise} noise)\n"
          "  validation, noisy input -> denoised output:\n" + "\n".join(lines)
          + f"\n  PSNR gain {metrics['val_psnr_gain']:+.2f} dB, SSIM gain "
          f"{metrics['val_ssim_gain']:+.3f}\n  outputs in {out}/ (metrics.json, before_after.png)")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
