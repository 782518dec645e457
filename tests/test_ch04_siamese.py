"""Tests of ch04_classification/siamese.py and train_siamese.py.

- Every triplet mining strategy equals a NumPy brute force over all triplets (random embeddings and
  labels, a batch of a single person, a batch where every person appears once), under tf.function too,
  and its gradient is finite even where no triplet is valid.
- The binary head (|f1 - f2| -> logistic unit) and its balanced pair loss equal NumPy.
- ROC AUC equals scikit-learn's; the chosen threshold is the best of a brute-force search; one-shot
  accuracy on hand-made distances; P x K batches are deterministic and have K photos of P persons.
- Layers and losses survive a get_config / from_config round trip and a saved encoder reloads.
- A FAST train_siamese run writes metrics.json with the issue's keys and the pictures.
Run: `python -m pytest -q tests/test_ch04_siamese.py`.
"""

import json
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from ch04_classification import siamese


def numpy_triplet_loss(labels, embeddings, margin, mining):
    """Brute force over every (anchor, positive, negative) of the batch."""
    labels = np.asarray(labels)
    distances = ((embeddings[:, None, :] - embeddings[None, :, :]) ** 2).sum(-1)
    n = len(labels)
    kept = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [q for q in range(n) if labels[q] != labels[a]]
        if mining == "all":
            for p, q in itertools.product(positives, negatives):
                loss = max(0.0, distances[a, p] - distances[a, q] + margin)
                if loss > 1e-16:
                    kept.append(loss)
        elif mining == "hard":
            if positives and negatives:
                hardest_p = max(distances[a, p] for p in positives)
                hardest_n = min(distances[a, q] for q in negatives)
                kept.append(max(0.0, hardest_p - hardest_n + margin))
        else:
            for p in positives:
                semi = [distances[a, q] for q in negatives
                        if distances[a, p] < distances[a, q] < distances[a, p] + margin]
                if semi:
                    kept.append(distances[a, p] - min(semi) + margin)
    return float(np.mean(kept)) if kept else 0.0


def random_batch(rng, size, persons, dim=8, normalise=True):
    labels = rng.integers(0, persons, size)
    embeddings = rng.normal(size=(size, dim))
    if normalise:
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return labels, embeddings


@pytest.mark.parametrize("mining", siamese.MINING)
def test_triplet_loss_matches_numpy_brute_force(mining):
    rng = np.random.default_rng(0)
    for trial in range(6):
        labels, embeddings = random_batch(rng, size=int(rng.integers(4, 20)), persons=int(rng.integers(2, 6)),
                                          normalise=trial % 2 == 0)
        margin = float(rng.choice([0.0, 0.2, 0.5, 1.5]))
        expected = numpy_triplet_loss(labels, embeddings, margin, mining)
        got = float(siamese.triplet_loss(labels, tf.constant(embeddings), margin, mining))
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (trial, margin)
        compiled = tf.function(lambda l, e: siamese.triplet_loss(l, e, margin, mining))
        assert float(compiled(tf.constant(labels), tf.constant(embeddings))) == pytest.approx(expected,
                                                                                                rel=1e-9)


@pytest.mark.parametrize("mining", siamese.MINING)
@pytest.mark.parametrize("labels", [[3, 3, 3, 3, 3], [0, 1, 2, 3, 4], [7]], ids=["one_person", "all_distinct",
                                                                                  "one_image"])
def test_batch_without_valid_triplet_gives_zero_and_finite_gradient(mining, labels):
    embeddings = tf.Variable(np.random.default_rng(1).normal(size=(len(labels), 4)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = siamese.triplet_loss(tf.constant(labels), siamese.L2Normalize()(embeddings), 0.2, mining)
    gradient = tape.gradient(loss, embeddings)
    assert float(loss) == 0.0
    assert gradient is None or np.all(np.isfinite(gradient.numpy()))
    assert numpy_triplet_loss(np.array(labels), embeddings.numpy(), 0.2, mining) == 0.0


def test_triplet_gradients_are_finite_with_identical_embeddings():
    """Equal embeddings make distances exactly 0 (the sqrt-free loss has no NaN there)."""
    embeddings = tf.Variable(np.ones((6, 4), np.float32))
    for mining in siamese.MINING:
        with tf.GradientTape() as tape:
            loss = siamese.triplet_loss(tf.constant([0, 0, 1, 1, 2, 2]), embeddings, 0.3, mining)
        assert np.all(np.isfinite(tape.gradient(loss, embeddings).numpy())), mining
        assert float(loss) == pytest.approx(0.3 if mining != "semi_hard" else 0.0)


def test_pairwise_distances_and_triplet_fractions():
    rng = np.random.default_rng(2)
    labels, embeddings = random_batch(rng, 12, 3)
    distances = siamese.pairwise_squared_distances(embeddings.astype(np.float32)).numpy()
    expected = ((embeddings[:, None] - embeddings[None]) ** 2).sum(-1)
    np.testing.assert_allclose(distances, expected, atol=1e-5)
    assert np.all(np.diag(distances) == 0)
    fractions = siamese.triplet_fractions(labels, embeddings, margin=0.4)
    assert fractions["easy"] + fractions["semi_hard"] + fractions["hard"] == pytest.approx(1.0)
    count = sum(1 for a, p, n in itertools.product(range(12), repeat=3)
                if a != p and labels[a] == labels[p] and labels[n] != labels[a])
    assert fractions["triplets"] == count


def test_keras_losses_layers_round_trip_and_reject_bad_arguments(tmp_path):
    loss = siamese.TripletLoss(margin=0.3, mining="hard")
    clone = siamese.TripletLoss.from_config(loss.get_config())
    assert (clone.margin, clone.mining) == (0.3, "hard")
    rng = np.random.default_rng(3)
    labels, embeddings = random_batch(rng, 10, 3)
    assert float(loss(labels, embeddings.astype(np.float32))) == pytest.approx(
        numpy_triplet_loss(labels, embeddings, 0.3, "hard"), rel=1e-4)
    with pytest.raises(ValueError, match="mining"):
        siamese.TripletLoss(mining="easy")
    with pytest.raises(ValueError, match="mining"):
        siamese.triplet_loss(labels, embeddings, 0.2, "random")
    with pytest.raises(ValueError, match="margin"):
        siamese.TripletLoss(margin=-1)
    with pytest.raises(ValueError, match="backbone"):
        siamese.build_encoder("no_such_net")
    layer = siamese.L2Normalize(epsilon=1e-6)
    assert siamese.L2Normalize.from_config(layer.get_config()).epsilon == 1e-6
    np.testing.assert_allclose(layer(tf.constant([[3.0, 4.0]])).numpy(), [[0.6, 0.8]], rtol=1e-6)

    encoder = siamese.build_encoder("resnet_small", (32, 32, 3), embedding_dim=16)
    images = rng.uniform(size=(3, 32, 32, 3)).astype(np.float32)
    out = encoder(images).numpy()
    assert out.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    model = siamese.build_binary_model(encoder)
    model.save(tmp_path / "binary.keras")
    reloaded = keras.saving.load_model(tmp_path / "binary.keras")
    np.testing.assert_allclose(reloaded(images).numpy(), model(images).numpy(), rtol=1e-5, atol=1e-6)


def test_binary_head_and_pair_loss_match_numpy():
    rng = np.random.default_rng(4)
    labels, embeddings = random_batch(rng, 9, 3)
    head = siamese.PairwiseLogits()
    head.build((None, 8))
    kernel, bias = rng.normal(size=8), 0.7
    head.kernel.assign(kernel.astype(np.float32))
    head.bias.assign(bias)
    logits = head(tf.constant(embeddings, tf.float32)).numpy()
    expected = np.abs(embeddings[:, None] - embeddings[None]) @ kernel + bias
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(head.pair_logits(embeddings[:3].astype(np.float32),
                                                embeddings[3:6].astype(np.float32)).numpy(),
                               expected[[0, 1, 2], [3, 4, 5]], rtol=1e-5, atol=1e-5)
    # Balanced binary cross-entropy over i < j, by hand.
    same_losses, different_losses = [], []
    for i, j in itertools.combinations(range(9), 2):
        p = 1 / (1 + np.exp(-expected[i, j]))
        target = labels[i] == labels[j]
        (same_losses if target else different_losses).append(-np.log(p if target else 1 - p))
    reference = (np.mean(same_losses) + np.mean(different_losses)) / 2
    assert float(siamese.binary_pair_loss(labels, tf.constant(expected))) == pytest.approx(reference, rel=1e-6)
    # Only different pairs (all persons distinct): the mean over them; one photo: 0.
    distinct = siamese.binary_pair_loss(np.arange(4), tf.constant(expected[:4, :4]))
    by_hand = np.mean([np.log1p(np.exp(expected[i, j])) for i, j in itertools.combinations(range(4), 2)])
    assert float(distinct) == pytest.approx(by_hand, rel=1e-6)
    assert float(siamese.binary_pair_loss([1], tf.zeros((1, 1)))) == 0.0


def test_roc_auc_threshold_and_one_shot_against_references():
    rng = np.random.default_rng(5)
    same = rng.random(300) < 0.5
    distances = np.round(rng.normal(size=300) + np.where(same, 0.0, 1.2), 1)  # with ties
    assert siamese.roc_auc(distances, same) == pytest.approx(roc_auc_score(same, -distances), abs=1e-12)
    tau, accuracy = siamese.best_threshold(distances, same)
    brute = max(np.mean((distances <= t) == same) for t in np.concatenate([[-np.inf], distances]))
    assert accuracy == pytest.approx(brute)
    assert siamese.verification_accuracy(distances, same, tau) == pytest.approx(accuracy)
    with pytest.raises(ValueError, match="same"):
        siamese.roc_curve(distances, np.ones(300, bool))

    # One-shot: distance = 0 to the right person except for queries of person 0 (always wrong).
    labels = np.repeat(np.arange(5), 3)

    def distance_fn(queries, gallery):
        d = (labels[queries][:, None] != labels[gallery][None, :]).astype(float)
        d[labels[queries] == 0] = 1.0 - d[labels[queries] == 0]
        return d

    assert siamese.one_shot_accuracy(distance_fn, labels, way=5, episodes=3) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="way"):
        siamese.one_shot_accuracy(distance_fn, labels, way=6)

    a, b, pair_same = siamese.verification_pairs(labels, seed=0)
    assert pair_same.sum() == 5 * 3 and (~pair_same).sum() == 15
    assert np.all((labels[a] == labels[b]) == pair_same) and np.all(a < b)


def test_pk_batches_are_deterministic_and_hold_k_photos_of_p_persons():
    labels = np.repeat(np.arange(10), 6)
    batches = siamese.pk_batch_indices(labels, 4, 3, seed=1, epoch=2)
    assert batches.shape == (2 * 2, 12)  # 6 // 3 = 2 rounds of 10 // 4 = 2 batches
    np.testing.assert_array_equal(batches, siamese.pk_batch_indices(labels, 4, 3, seed=1, epoch=2))
    assert not np.array_equal(batches, siamese.pk_batch_indices(labels, 4, 3, seed=1, epoch=3))
    for batch in batches:
        persons, counts = np.unique(labels[batch], return_counts=True)
        assert len(persons) == 4 and np.all(counts == 3)
    assert len(set(batches.ravel())) == batches.size  # no photo twice in an epoch
    for r in range(2):  # each person at most once per round
        persons = labels[batches[2 * r:2 * r + 2].ravel()]
        assert len(set(persons)) == 8
    # A person with fewer than K photos repeats some; the order of the labels does not matter.
    few = siamese.pk_batch_indices(np.array([0, 1, 1, 0, 2, 2]), 2, 3, seed=0)
    assert few.shape == (1, 6)
    images = np.arange(60, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    stream = list(siamese.pk_batches(images, labels, 4, 3, seed=1, first_epoch=2, epochs=4))
    assert len(stream) == 8
    np.testing.assert_allclose(stream[0][0].numpy()[:, 0, 0, 0], batches[0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(stream[1][1].numpy(), labels[batches[1]])
    with pytest.raises(ValueError, match="identities_per_batch"):
        siamese.pk_batch_indices(labels, 11, 2)
    # An epoch of several passes: the passes are epochs of one pass, numbered on.
    two = siamese.pk_batch_indices(labels, 4, 3, seed=1, epoch=1, passes=2)
    np.testing.assert_array_equal(two, np.concatenate([siamese.pk_batch_indices(labels, 4, 3, seed=1, epoch=2),
                                                       siamese.pk_batch_indices(labels, 4, 3, seed=1, epoch=3)]))
    with pytest.raises(ValueError, match="passes"):
        siamese.pk_batch_indices(labels, 4, 3, passes=0)


# --------------------------------------------------------------------------------------------------
# The script, in-process, FAST
# --------------------------------------------------------------------------------------------------

METRIC_KEYS = {"test_verification_accuracy", "test_roc_auc", "test_one_shot_top1", "val_verification_accuracy",
               "verification_threshold", "test_pixel_verification_accuracy", "test_pixel_roc_auc",
               "test_pixel_one_shot_top1", "train_seconds", "epochs", "parameters"}


@pytest.mark.slow
def test_fast_triplet_run_writes_metrics_that_an_independent_check_reproduces(tmp_path):
    from ch04_classification import train_siamese
    from common import faces

    out = tmp_path / "run"
    metrics = train_siamese.main(["--fast", "--out", str(out), "--mining", "semi_hard"])
    for name in ("metrics.json", "config.json", "roc.png", "distances.png", "pairs.png", "model.keras",
                 "history.png", "checkpoint/state.npz"):
        assert (out / name).is_file(), name
    written = json.loads((out / "metrics.json").read_text())
    assert METRIC_KEYS <= set(written) and written == pytest.approx(metrics)
    for key in METRIC_KEYS - {"train_seconds", "epochs", "parameters"}:
        if key != "verification_threshold":
            assert 0.0 <= written[key] <= 1.0, key

    # Reload the saved encoder, embed the test persons again, score the same pairs with scikit-learn.
    config = json.loads((out / "config.json").read_text())
    images, labels = faces.make_faces("test", config["num_test_identities"], config["eval_images_per_identity"],
                                      seed=config["seed"], image_size=config["image_size"])
    images = np.round(images * 255).astype(np.uint8).astype(np.float32) / 255.0
    encoder = keras.saving.load_model(out / "model.keras")
    embeddings = encoder(images, training=False).numpy()
    first, second, same = siamese.verification_pairs(labels, seed=config["seed"] + 1)
    distances = ((embeddings[first] - embeddings[second]) ** 2).sum(-1)
    assert written["test_roc_auc"] == pytest.approx(roc_auc_score(same, -distances), abs=2e-3)
    accuracy = np.mean((distances <= written["verification_threshold"]) == same)
    assert written["test_verification_accuracy"] == pytest.approx(accuracy, abs=2e-3)
    pixels = images.reshape(len(images), -1)
    pixel_distances = ((pixels[first] - pixels[second]) ** 2).sum(-1)
    assert written["test_pixel_roc_auc"] == pytest.approx(roc_auc_score(same, -pixel_distances), abs=1e-6)


@pytest.mark.slow
def test_fast_binary_run_and_option_errors(tmp_path, capsys):
    from ch04_classification import train_siamese
    from common.training import RunError

    metrics = train_siamese.main(["--fast", "--out", str(tmp_path / "binary"), "--loss", "binary"])
    assert METRIC_KEYS <= set(metrics)
    for argv, flag in ((["--batch-size", "10", "--images-per-identity", "4"], "--batch-size"),
                       (["--one-shot-way", "50"], "--one-shot-way"),
                       (["--eval-images-per-identity", "1"], "--eval-images-per-identity"),
                       (["--margin", "-1"], "--margin")):
        with pytest.raises(RunError, match=flag):
            train_siamese.main(["--fast", "--out", str(tmp_path / "bad"), *argv])


def _write_person_folder(root, persons_per_split, photos=4, split_folders=True, size=40):
    """Photos of drawn persons as PNG files: root/<split>/<person>/<k>.png (or root/<person>/...)."""
    import cv2

    from common import faces

    for split, count in persons_per_split.items():
        for person in range(count):
            folder = (root / split if split_folders else root) / f"{split}_person_{person}"
            folder.mkdir(parents=True)
            for k in range(photos):
                image = faces.make_face(person, k, split, 0, size)["image"]
                cv2.imwrite(str(folder / f"{k}.png"),
                            cv2.cvtColor(np.round(image * 255).astype(np.uint8), cv2.COLOR_RGB2BGR))


def test_person_folder_layouts_keep_persons_disjoint(tmp_path):
    from common import data

    own = tmp_path / "own"
    _write_person_folder(own, {"train": 3, "validation": 2, "test": 2}, photos=3)
    (own / "test" / "test_person_0" / "broken.png").write_bytes(b"not an image")
    seen = {}
    for split in ("train", "validation", "test"):
        if split == "test":
            with pytest.warns(data.BadDataWarning, match="broken.png"):
                images, labels, names = data.load_person_folder(own, split, image_size=24)
            with pytest.raises(ValueError, match="broken.png"):
                data.load_person_folder(own, split, image_size=24, strict=True)
        else:
            images, labels, names = data.load_person_folder(own, split, image_size=24)
        assert images.shape == (3 * len(names), 24, 24, 3) and images.dtype == np.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        np.testing.assert_array_equal(labels, np.repeat(np.arange(len(names)), 3))
        assert all(name.startswith(split) for name in names)
        seen[split] = set(names)
    assert not (seen["train"] & seen["validation"]) and not (seen["train"] & seen["test"])

    # Without split folders: persons go to one split each, by the hash of their folder name.
    flat = tmp_path / "flat"
    _write_person_folder(flat, {"train": 12, "validation": 6}, photos=2, split_folders=False)
    found = {}
    for split in ("train", "validation", "test"):
        try:
            found[split] = data.load_person_folder(flat, split, image_size=16)[2]
        except ValueError as error:  # a split the hash gave no person: the message says so
            assert "hash split gave" in str(error)
            found[split] = ()
    assert sorted(sum(map(list, found.values()), [])) == sorted(p.name for p in flat.iterdir())
    for split, names in found.items():
        assert all(data.person_split(name) == split for name in names)

    with pytest.raises(ValueError, match="no such folder"):
        data.load_person_folder(tmp_path / "missing", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no person sub-folders"):
        data.load_person_folder(tmp_path / "empty", "train")


def test_fast_run_on_your_own_person_folder(tmp_path, capsys):
    from ch04_classification import train_siamese

    own = tmp_path / "own"
    _write_person_folder(own, {"train": 8, "validation": 3, "test": 4})
    metrics = train_siamese.main(["--fast", "--dataset", str(own), "--one-shot-way", "3",
                                  "--out", str(tmp_path / "run")])
    assert metrics["dataset"] == str(own)
    assert metrics["num_train_identities"] == 8 and metrics["num_test_identities"] == 4
    assert 0.0 <= metrics["test_verification_accuracy"] <= 1.0
    assert (tmp_path / "run" / "roc.png").is_file()
    # Too few test persons for the one-shot gallery: a message naming the option, no traceback.
    with pytest.raises(SystemExit) as stop:
        train_siamese.main(["--fast", "--dataset", str(own), "--one-shot-way", "5",
                            "--out", str(tmp_path / "too_few")])
    assert stop.value.code == 2
    assert "--one-shot-way 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_siamese.main(["--fast", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert "--dataset" in capsys.readouterr().err
