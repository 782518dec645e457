"""The embedded `faces` data: contract, determinism, persons disjoint across splits, difficulty, speed."""

import time

import numpy as np
import pytest

from common import faces


def parameter_vector(parameters):
    return np.concatenate([np.atleast_1d(np.asarray(v, np.float64)).ravel() for v in parameters.values()])


def test_face_contract():
    for identity, index in [(0, 0), (3, 7), (41, 2)]:
        example = faces.make_face(identity, index, "validation", image_size=40)
        assert example["image"].shape == (40, 40, 3) and example["image"].dtype == np.float32
        assert 0.0 <= example["image"].min() and example["image"].max() <= 1.0
        assert example["label"].dtype == np.int32 and int(example["label"]) == identity


def test_a_photo_is_a_pure_function_of_seed_split_identity_index():
    first = faces.make_face(5, 3, "train", seed=1, image_size=32)["image"]
    np.testing.assert_array_equal(first, faces.make_face(5, 3, "train", seed=1, image_size=32)["image"])
    # Drawing other photos in between changes nothing (no hidden state).
    faces.make_faces("test", 3, 2, seed=1, image_size=32)
    np.testing.assert_array_equal(first, faces.make_face(5, 3, "train", seed=1, image_size=32)["image"])
    for other in [(5, 4, "train", 1), (6, 3, "train", 1), (5, 3, "test", 1), (5, 3, "train", 2)]:
        image = faces.make_face(*other, image_size=32)["image"]
        assert np.abs(image - first).mean() > 0.01, other
    images, labels = faces.make_faces("train", 3, 4, seed=1, image_size=32, first_identity=4)
    np.testing.assert_array_equal(labels, np.repeat([4, 5, 6], 4))
    np.testing.assert_array_equal(images[7], first)  # person 5 (second), photo 3


def test_persons_are_disjoint_between_splits():
    numbers = {split: {faces.global_identity(split, i) for i in range(200)} for split in faces.SPLITS}
    assert not numbers["train"] & numbers["validation"]
    assert not numbers["train"] & numbers["test"]
    assert not numbers["validation"] & numbers["test"]
    # No test or validation person has the facial parameters of a training person.
    train = np.stack([parameter_vector(faces.identity_parameters(i, "train")) for i in range(300)])
    for split in ("validation", "test"):
        others = np.stack([parameter_vector(faces.identity_parameters(i, split)) for i in range(60)])
        gaps = np.abs(others[:, None, :] - train[None, :, :]).sum(-1)
        assert gaps.min() > 0.1, split
    with pytest.raises(ValueError, match="split"):
        faces.global_identity("holdout", 0)
    with pytest.raises(ValueError, match="identity"):
        faces.global_identity("train", faces.MAX_IDENTITIES_PER_SPLIT)


def test_persons_vary_in_every_discrete_feature():
    parameters = [faces.identity_parameters(i, "train") for i in range(200)]
    assert {p["hair_style"] for p in parameters} == set(range(len(faces.HAIR_STYLES)))
    assert {p["nose_style"] for p in parameters} == set(range(len(faces.NOSE_STYLES)))
    for flag in ("glasses", "moustache", "beard"):
        assert 0.1 < np.mean([p[flag] for p in parameters]) < 0.5, flag


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match="image_size"):
        faces.make_face(0, 0, image_size=16)
    with pytest.raises(ValueError, match="index"):
        faces.make_face(0, -1)
    with pytest.raises(ValueError, match="split"):
        faces.make_faces("val")
    with pytest.raises(ValueError, match="images_per_identity"):
        faces.make_faces("train", 2, 0)


def test_raw_pixels_do_not_solve_it_but_identity_is_in_the_pixels():
    """Nearest neighbour on raw pixels, one gallery photo per person, 20 persons: far from solved.

    Photos of one person are still closer on average than photos of two (the data carry identity).
    """
    persons, photos = 20, 6
    images, labels = faces.make_faces("test", persons, photos, image_size=32)
    pixels = images.reshape(len(images), -1).astype(np.float64)
    distances = ((pixels[:, None] - pixels[None]) ** 2).sum(-1)
    gallery = np.arange(persons) * photos            # photo 0 of every person
    queries = np.setdiff1d(np.arange(len(images)), gallery)
    predicted = labels[gallery][np.argmin(distances[np.ix_(queries, gallery)], axis=1)]
    top1 = np.mean(predicted == labels[queries])
    print(f"raw-pixel one-shot top-1 over {persons} persons: {top1:.3f} (chance {1 / persons:.3f})")
    assert top1 < 0.5
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    assert distances[same & off_diagonal].mean() < distances[~same].mean()


def test_generation_is_fast():
    start = time.perf_counter()
    faces.make_faces("train", 10, 10, image_size=48)
    per_image = (time.perf_counter() - start) / 100
    print(f"{1000 * per_image:.2f} ms per 48x48 face")
    assert per_image < 0.05  # generous: the machine may be shared


# --------------------------------------------------------------------------------------------------
# The registry: data.load("faces") and data.load("lfw") (tensorflow-datasets, mocked: no download)
# --------------------------------------------------------------------------------------------------

def test_registry_faces_follow_the_classification_contract():
    from common import data

    examples = list(data.load("faces", "test", image_size=32, num_examples=12))
    per_person = faces.DEFAULT_IMAGES_PER_IDENTITY["test"]
    assert [int(e["label"]) for e in examples] == [i // per_person for i in range(12)]
    expected = faces.make_face(1, 1, "test", image_size=32)["image"]
    np.testing.assert_array_equal(examples[per_person + 1]["image"].numpy(), expected)
    assert data.get_info("faces").task == "classification"
    assert data.get_info("faces").num_classes == faces.DEFAULT_IDENTITIES["train"]
    resized = next(iter(data.load("faces", "train", image_size=(40, 30), num_examples=1)))
    assert resized["image"].shape == (40, 30, 3)
    with pytest.raises(ValueError, match="task"):
        data.load("faces", task="detection")


def test_lfw_persons_are_split_by_name_and_labels_are_person_numbers():
    import tensorflow_datasets as tfds
    from common import data

    with tfds.testing.mock_data(num_examples=60):
        labels = {}
        for split in data.SPLITS:
            examples = list(data.load("lfw", split, image_size=32))
            for example in examples:
                assert example["image"].shape == (32, 32, 3) and example["image"].dtype == np.float32
                assert example["label"].dtype == np.int32
            labels[split] = {int(e["label"]) for e in examples}
        raw = [e["label"].numpy().decode() for e in tfds.load("lfw", split="train")]
    assert sum(len(v) for v in labels.values()) == len(set(raw))  # every person once, in one split
    assert not labels["train"] & labels["test"] and not labels["validation"] & labels["test"]
    for name in raw[:10]:  # the split of a name, in Python, agrees with the pipeline
        number = int(tf_hash(name))
        assert number in labels[data.lfw_person_split(name)]


def tf_hash(name):
    import tensorflow as tf

    return tf.cast(tf.strings.to_hash_bucket_fast(name, 2**31 - 1), tf.int32)


def test_lfw_download_failure_names_the_embedded_faces(monkeypatch):
    import tensorflow_datasets as tfds
    from common import data

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve host (no network)")

    monkeypatch.setattr(tfds, "load", offline)
    with pytest.raises(data.DatasetUnavailableError, match="--dataset faces"):
        data.load("lfw", "train")
