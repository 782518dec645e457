"""Train a Siamese face-verification network and test it on people it has never seen.

What this script teaches: verification (is this the same person?) and one-shot recognition (who of
these 20 people, from one photo each?) with a learned distance, the pieces in
ch04_classification/siamese.py:
    data        common.faces: procedurally drawn persons, disjoint between train / validation / test
    batches     P persons x K photos (siamese.pk_batches), so each batch holds positives and negatives
    encoder     a chapter-4 backbone (default resnet_small) -> Dense -> L2-normalised embedding
    loss        --loss triplet: max(0, d(A, P) - d(A, N) + margin), mined in the batch with
                --mining all | hard | semi_hard (FaceNet, Schroff et al. 2015; Hermans et al. 2017);
                --loss binary: |f(x1) - f(x2)| -> logistic unit on every pair of the batch
                (DeepFace, Taigman et al. 2014 sec. 4.2; Koch et al. 2015)
    threshold   tau chosen on the validation persons (best accuracy on balanced pairs), applied to
                the test persons
    metrics     test_verification_accuracy at tau, test_roc_auc, test_one_shot_top1 (20 persons,
                one gallery photo each, 50 draws), and the same for the nearest neighbour on raw
                pixels (test_pixel_*), the baseline a network must beat
    pictures    roc.png, distances.png (same / different distance histograms), pairs.png (the
                closest different-person and farthest same-person test pairs), history.png; the
                encoder as model.keras

Run from the repo root (CPU is fine):
    python ch04_classification/train_siamese.py                         # triplet loss, batch-all mining
    python ch04_classification/train_siamese.py --mining semi_hard --out runs/siamese_semi_hard
    python ch04_classification/train_siamese.py --loss binary --out runs/siamese_binary
    python ch04_classification/train_siamese.py --fast                  # a seconds-long smoke run
    python ch04_classification/train_siamese.py --dataset lfw           # Labeled Faces in the Wild (tfds)
    python ch04_classification/train_siamese.py --dataset my_faces/     # your photos, a folder per person

Your own photos: my_faces/<person>/<photo>.jpg (persons split 80/10/10 by a hash of the folder
name), or my_faces/train|validation|test/<person>/... to choose the split yourself. Each validation
and test person needs at least two photos (a same-person pair); --num-*-identities then cap the
persons used.

The default run (no arguments) ends within 10 minutes on a 2-core CPU: the training has an 8.5-minute
--time-budget-minutes, drawing the 9,600 faces and the evaluation take about a minute each. Measured on
this 2-core CPU shared with other jobs (load average about 12): 7 epochs (42 passes, 5,208 steps) in
305 s of training, 453 s in all; on the 100 test persons, never seen in training,
test_verification_accuracy 0.965 (tau 0.757 from the validation persons), test_roc_auc 0.993,
test_one_shot_top1 0.905 (20 persons, one photo each); the raw-pixel nearest neighbour scores 0.568,
0.590 and 0.109. The other mining strategies and the binary head are compared in
notebooks/face_verification.ipynb (section 8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from pathlib import Path

from common import data as common_data
from common import faces, training
from ch04_classification import models, siamese

LOSSES = ("triplet", "binary")


@dataclass
class SiameseConfig(training.TrainingConfig):
    """Train a Siamese encoder on the embedded faces and verify persons never seen in training."""

    dataset: str = field(default="faces", metadata={
        "help": "faces (embedded, drawn), lfw (tensorflow-datasets), or a folder with one sub-folder "
                "of photos per person"})
    data_dir: str = field(default="", metadata={"help": "tensorflow-datasets folder ('' = default)"})
    loss: str = field(default="triplet", metadata={
        "help": "triplet (margin loss on mined triplets) or binary (logistic unit on |f1 - f2|)",
        "choices": LOSSES})
    mining: str = field(default="all", metadata={
        "help": "triplet mining inside the batch: all (every triplet with a positive loss), hard "
                "(hardest positive and negative per anchor) or semi_hard (FaceNet)",
        "choices": siamese.MINING})
    margin: float = field(default=0.2, metadata={"help": "triplet margin alpha (FaceNet sec. 3.1)"})
    backbone: str = field(default="resnet_small", metadata={
        "help": "a network of ch04_classification.models, used without its classifier",
        "choices": models.MODEL_NAMES})
    embedding_dim: int = field(default=64, metadata={"help": "length of the L2-normalised embedding"})
    image_size: int = field(default=48, metadata={"help": "square side of the face images"})
    num_train_identities: int = field(default=1000, metadata={"help": "persons to train on"})
    train_images_per_identity: int = field(default=8, metadata={"help": "photos of each training person"})
    num_val_identities: int = field(default=60, metadata={
        "help": "validation persons (other people; tau is chosen on them)"})
    num_test_identities: int = field(default=100, metadata={"help": "test persons (other people again)"})
    eval_images_per_identity: int = field(default=10, metadata={
        "help": "photos of each validation and test person"})
    images_per_identity: int = field(default=4, metadata={
        "help": "K: photos of each person in a batch (--batch-size / K persons per batch)"})
    one_shot_way: int = field(default=20, metadata={"help": "persons in a one-shot gallery"})
    one_shot_episodes: int = field(default=50, metadata={"help": "random galleries averaged"})
    batch_size: int = field(default=64, metadata={"help": "photos per step (P persons x K photos)"})
    epochs: int = field(default=7, metadata={"help": "epochs of --passes-per-epoch passes over the photos"})
    passes_per_epoch: int = field(default=6, metadata={
        "help": "passes over every training photo per epoch (long epochs: the time budget's estimate "
                "after the first epoch, which also pays for compiling, stays close)"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate (Adam)"})
    warmup_epochs: float = field(default=0.25, metadata={"help": "linear warm-up from 0 over this many epochs"})
    time_budget_minutes: float = field(default=8.5, metadata={
        "help": "end after the last epoch that fits in this many minutes of training, the cosine "
                "decay shortened to match (0 = no budget)"})
    out: str = field(default="runs/train_siamese", metadata={"help": "output folder; re-use it to resume"})

    FAST: ClassVar[dict] = {"image_size": 32, "num_train_identities": 16, "train_images_per_identity": 4,
                            "num_val_identities": 20, "num_test_identities": 20,
                            "eval_images_per_identity": 3, "batch_size": 16, "epochs": 1,
                            "embedding_dim": 16, "one_shot_episodes": 5, "warmup_epochs": 0.0, "passes_per_epoch": 1,
                            "time_budget_minutes": 0.0}


def check_config(config):
    """ValueError naming the option for anything we can check before drawing data."""
    if config.dataset not in ("faces", "lfw") and not Path(config.dataset).is_dir():
        raise ValueError(f"--dataset must be faces, lfw or a folder of person sub-folders; "
                         f"{config.dataset!r} is none of them (no such folder)")
    if config.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {config.loss!r}")
    if config.mining not in siamese.MINING:
        raise ValueError(f"--mining must be one of {siamese.MINING}, got {config.mining!r}")
    if config.backbone not in models.MODEL_NAMES:
        raise ValueError(f"--backbone must be one of {models.MODEL_NAMES}, got {config.backbone!r}")
    if config.margin < 0:
        raise ValueError(f"--margin must be >= 0, got {config.margin}")
    if config.image_size < 32:
        raise ValueError(f"--image-size must be >= 32 (the backbones downsample by 32), got {config.image_size}")
    for name in ("embedding_dim", "passes_per_epoch", "num_train_identities", "train_images_per_identity", "num_val_identities",
                 "num_test_identities", "images_per_identity", "one_shot_episodes"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.eval_images_per_identity < 2:
        raise ValueError(f"--eval-images-per-identity must be >= 2 (a gallery photo and a query), got "
                         f"{config.eval_images_per_identity}")
    if config.batch_size % config.images_per_identity or config.batch_size < 2 * config.images_per_identity:
        raise ValueError(f"--batch-size ({config.batch_size}) must be a multiple of --images-per-identity "
                         f"({config.images_per_identity}) with at least two persons per batch")
    if config.dataset == "faces" and config.batch_size // config.images_per_identity > config.num_train_identities:
        raise ValueError(f"--batch-size {config.batch_size} / --images-per-identity "
                         f"{config.images_per_identity} persons per batch, but --num-train-identities is "
                         f"only {config.num_train_identities}")
    if config.one_shot_way < 2 or (config.dataset == "faces"
                                   and config.one_shot_way > config.num_test_identities):
        raise ValueError(f"--one-shot-way must be in [2, --num-test-identities = "
                         f"{config.num_test_identities}], got {config.one_shot_way}")


def _real_split(config, split):
    """(images float [N, S, S, 3], person labels [N]) of lfw or a person folder, before capping."""
    size = (config.image_size, config.image_size)
    if config.dataset == "lfw":
        options = {"data_dir": config.data_dir} if config.data_dir else {}
        examples = list(common_data.load("lfw", split, image_size=size, **options).as_numpy_iterator())
        if not examples:
            training.fail(f"--dataset lfw: no photo in split {split!r}")
        return (np.stack([e["image"] for e in examples]),
                np.asarray([e["label"] for e in examples], np.int64))
    try:
        images, labels, _ = common_data.load_person_folder(config.dataset, split, size)
    except ValueError as error:
        training.fail(f"--dataset {config.dataset}: {error}")
    return images, labels


def real_split(config, split):
    """lfw or your folder: persons renumbered 0..P-1 in order, at most --num-*-identities of them;
    validation and test keep only persons with two photos or more (a same-person pair)."""
    images, labels = _real_split(config, split)
    persons, labels = np.unique(labels, return_inverse=True)
    keep = np.ones(len(labels), bool)
    if split != "train":
        keep = np.bincount(labels)[labels] >= 2
    limit = {"train": config.num_train_identities, "validation": config.num_val_identities,
             "test": config.num_test_identities}[split]
    kept_persons = np.unique(labels[keep])[:limit]
    keep &= np.isin(labels, kept_persons)
    order = np.argsort(labels[keep], kind="stable")  # photos of a person next to each other
    images, labels = images[keep][order], labels[keep][order]
    labels = np.unique(labels, return_inverse=True)[1].astype(np.int64)
    needed = {"train": max(2, config.batch_size // config.images_per_identity),
              "validation": 2, "test": max(2, config.one_shot_way)}[split]
    found = int(labels.max()) + 1 if len(labels) else 0
    if found < needed:
        reason = {"train": f"a batch of --batch-size {config.batch_size} / --images-per-identity "
                           f"{config.images_per_identity} persons",
                  "validation": "two persons with two photos each (to choose tau)",
                  "test": f"--one-shot-way {config.one_shot_way} persons with two photos each"}[split]
        training.fail(f"--dataset {config.dataset}: the {split} split has {found} usable persons, "
                      f"fewer than {reason}; add persons or lower that option")
    return np.round(images * 255).astype(np.uint8), labels


def draw_split(config, split):
    """(images uint8 [N, S, S, 3], labels [N]) of a split, person by person."""
    if config.dataset != "faces":
        return real_split(config, split)
    count, per_person = {"train": (config.num_train_identities, config.train_images_per_identity),
                         "validation": (config.num_val_identities, config.eval_images_per_identity),
                         "test": (config.num_test_identities, config.eval_images_per_identity)}[split]
    images, labels = faces.make_faces(split, count, per_person, seed=config.seed,
                                      image_size=config.image_size)
    return np.round(images * 255).astype(np.uint8), labels


def pair_distance_functions(config, model, encoder, arrays):
    """{split: embeddings} and the pair distance of the trained model: squared L2 between embeddings
    (triplet) or minus the logistic unit's logit (binary: higher logit = more likely the same)."""
    embeddings = {split: siamese.embed(encoder, images.astype(np.float32) / 255.0)
                  for split, (images, _) in arrays.items()}
    if config.loss == "binary":
        head = model.get_layer("pair_head")
        kernel, bias = np.asarray(head.kernel, np.float64), float(np.asarray(head.bias))

        def distance(split, first, second):
            e = embeddings[split]
            return -(np.abs(e[first] - e[second]) @ kernel + bias)
        return embeddings, distance, None

    def distance(split, first, second):
        return siamese.squared_distances(embeddings[split][first], embeddings[split][second])
    return embeddings, distance, siamese.embedding_distance_fn(embeddings["test"])


def pixel_baseline(config, arrays):
    """The same evaluation with the raw pixels as the "embedding" (nearest neighbour on pixels)."""
    pixels = {split: images.reshape(len(images), -1).astype(np.float32) / 255.0
              for split, (images, _) in arrays.items()}

    def distance(split, first, second):
        return siamese.squared_distances(pixels[split][first], pixels[split][second])

    return siamese.evaluate_verification(distance, arrays["validation"][1], arrays["test"][1],
                                         seed=config.seed, way=config.one_shot_way,
                                         episodes=config.one_shot_episodes,
                                         one_shot_fn=siamese.embedding_distance_fn(pixels["test"]))


def main(argv=None):
    """Train, evaluate on the test persons, write <out>/metrics.json and pictures; returns the metrics."""
    run = training.start_run(SiameseConfig, argv, check=check_config, description=__doc__.split("\n")[0])
    config, out = run.config, run.out
    persons_per_batch = config.batch_size // config.images_per_identity

    data_start = time.perf_counter()
    arrays = {split: draw_split(config, split) for split in faces.SPLITS}
    data_seconds = time.perf_counter() - data_start
    train_images, train_labels = arrays["train"]
    # One epoch shows every training photo once: (photos per person // K) rounds over the persons.
    steps_per_epoch = len(siamese.pk_batch_indices(train_labels, persons_per_batch,
                                                   config.images_per_identity, config.seed,
                                                   passes=config.passes_per_epoch))

    input_shape = (config.image_size, config.image_size, 3)
    with run.strategy.scope():
        encoder = siamese.build_encoder(config.backbone, input_shape, config.embedding_dim)
        if config.loss == "binary":
            model, loss = siamese.build_binary_model(encoder), siamese.BinaryPairLoss()
        else:
            model, loss = encoder, siamese.TripletLoss(config.margin, config.mining)
        model.compile(optimizer=run.optimizer(steps_per_epoch), loss=loss, jit_compile=run.jit_compile)
    print(f"{config.loss}{' (' + config.mining + ' mining)' if config.loss == 'triplet' else ''} on "
          f"{config.backbone}, {config.dataset}: {len(np.unique(train_labels))} training persons, "
          f"{len(train_labels)} photos of {config.image_size}x{config.image_size}, batches of "
          f"{persons_per_batch} persons x {config.images_per_identity}; {encoder.count_params():,} "
          f"parameters; data drawn in {data_seconds:.1f} s")
    run.fit(model, lambda first_epoch: siamese.pk_batches(
                train_images, train_labels, persons_per_batch, config.images_per_identity, seed=config.seed,
                first_epoch=first_epoch, epochs=config.epochs, passes=config.passes_per_epoch),
            steps_per_epoch, log_keys={"loss": "loss"})  # validation: tau and the pairs, after training

    # Evaluation on the test persons, tau from the validation persons; the pixel baseline alike.
    eval_start = time.perf_counter()
    embeddings, distance, one_shot_fn = pair_distance_functions(config, model, encoder, arrays)
    result = siamese.evaluate_verification(distance, arrays["validation"][1], arrays["test"][1],
                                           seed=config.seed, way=config.one_shot_way,
                                           episodes=config.one_shot_episodes, one_shot_fn=one_shot_fn)
    pixels = pixel_baseline(config, arrays)
    first, second, same, test_distances = result["test_pairs"]
    test_images = arrays["test"][0]
    import matplotlib.pyplot as plt

    pixel_first, pixel_second, pixel_same, pixel_distances = pixels["test_pairs"]
    siamese.plot_roc({"network": (test_distances, same), "pixels": (pixel_distances, pixel_same)},
                     {"network": result["threshold"], "pixels": pixels["threshold"]},
                     save_path=out / "roc.png")
    siamese.plot_distance_histograms(
        {"raw pixels (test persons)": (pixel_distances, pixel_same, pixels["threshold"]),
         f"{config.loss} embedding (test persons)": (test_distances, same, result["threshold"])},
        save_path=out / "distances.png")
    siamese.show_pairs(test_images, first, second, test_distances, same, result["threshold"],
                       save_path=out / "pairs.png")
    plt.close("all")
    encoder.save(out / "model.keras")
    # How many validation triplets are already easy (no loss): the first 64 photos, ~6 persons.
    count = min(64, len(arrays["validation"][1]))
    fractions = siamese.triplet_fractions(arrays["validation"][1][:count], embeddings["validation"][:count],
                                          margin=config.margin)

    metrics = {
        "test_verification_accuracy": result["test_verification_accuracy"],
        "test_roc_auc": result["test_roc_auc"],
        "test_one_shot_top1": result["test_one_shot_top1"],
        "val_verification_accuracy": result["val_verification_accuracy"],
        "verification_threshold": result["threshold"],
        "test_pixel_verification_accuracy": pixels["test_verification_accuracy"],
        "test_pixel_roc_auc": pixels["test_roc_auc"],
        "test_pixel_one_shot_top1": pixels["test_one_shot_top1"],
        "dataset": config.dataset,
        "num_train_identities": int(len(np.unique(train_labels))),
        "num_test_identities": int(len(np.unique(arrays["test"][1]))),
        "num_test_pairs": int(len(same)),
        "image_size": config.image_size,
        "data_seconds": round(data_seconds, 2),
        "eval_seconds": round(time.perf_counter() - eval_start, 2),
        "parameters": int(encoder.count_params()),
    }
    metrics["val_easy_triplet_fraction"] = fractions["easy"]
    metrics = run.finish(metrics, history_keys=["loss"])
    print(f"Done: test persons (never seen): verification accuracy {metrics['test_verification_accuracy']:.4f} "
          f"at tau {metrics['verification_threshold']:.3f}, ROC AUC {metrics['test_roc_auc']:.4f}, "
          f"one-shot top-1 ({config.one_shot_way} persons) {metrics['test_one_shot_top1']:.4f}; raw pixels: "
          f"{metrics['test_pixel_verification_accuracy']:.4f} / {metrics['test_pixel_roc_auc']:.4f} / "
          f"{metrics['test_pixel_one_shot_top1']:.4f}. {metrics['epochs']} epochs, "
          f"{metrics['train_seconds']:.0f} s of training. Outputs in {out}/")
    return metrics


if __name__ == "__main__":
    main()
