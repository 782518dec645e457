"""Neural style transfer (ch06_segmentation/style_transfer.py and run_style_transfer.py).

References the code is checked against: NumPy's matrix product and einsum for the Gram matrix,
hand-computed costs for the 1 / (2 n_H n_W n_C)^2 normalisation, tf.image.total_variation, and
properties the definitions imply (symmetry, zero cost against itself, invariance of the style cost
and not of the content cost to shuffling positions). Nothing here downloads: the ImageNet path is
run with keras' download function patched to fail.
"""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch06_segmentation import style_transfer as st

REPO = Path(__file__).resolve().parents[1]


def _random_features(shape, seed=0):
    # Non-negative like ReLU activations.
    return np.maximum(np.random.default_rng(seed).normal(size=shape), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Gram matrix
# --------------------------------------------------------------------------------------------------

def test_gram_matrix_equals_numpy_reference_unbatched_and_batched():
    features = _random_features((5, 7, 6))
    unrolled = features.reshape(-1, 6)  # [n_H n_W, n_C]
    np.testing.assert_allclose(st.gram_matrix(features).numpy(), unrolled.T @ unrolled, rtol=1e-5)
    batch = _random_features((3, 4, 5, 8), seed=1)
    expected = np.einsum("bhwk,bhwl->bkl", batch, batch)
    gram = st.gram_matrix(batch).numpy()
    assert gram.shape == (3, 8, 8)
    np.testing.assert_allclose(gram, expected, rtol=1e-5)


def test_gram_matrix_is_symmetric_positive_semidefinite():
    gram = st.gram_matrix(np.random.default_rng(2).normal(size=(2, 6, 6, 10))).numpy()
    np.testing.assert_allclose(gram, np.transpose(gram, (0, 2, 1)), rtol=1e-6)
    assert np.linalg.eigvalsh(gram.astype(np.float64)).min() > -1e-3


def test_gram_matrix_rejects_wrong_rank():
    with pytest.raises(ValueError, match="features must be activations"):
        st.gram_matrix(np.zeros((4, 4)))


# --------------------------------------------------------------------------------------------------
# Costs
# --------------------------------------------------------------------------------------------------

def test_layer_style_cost_normalisation_hand_computed():
    # n_H = 1, n_W = 2, n_C = 2. a(S) rows (1, 0), (0, 1): G(S) = identity. a(G) = 0: G(G) = 0.
    # sum (G(S) - G(G))^2 = 2; 1 / (2 * 1 * 2 * 2)^2 = 1/64; cost = 2/64.
    style = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
    generated = np.zeros_like(style)
    assert float(st.layer_style_cost(style, generated)) == pytest.approx(2.0 / 64.0)
    # n_H = 2, n_W = 1, n_C = 1. a(S) = (1, 2): G(S) = 1 + 4 = 5. a(G) = (0, 1): G(G) = 1.
    # (5 - 1)^2 = 16; 1 / (2 * 2 * 1 * 1)^2 = 1/16; cost = 1.
    style = np.array([[[1.0]], [[2.0]]], np.float32)
    generated = np.array([[[0.0]], [[1.0]]], np.float32)
    assert float(st.layer_style_cost(style, generated)) == pytest.approx(1.0)


def test_layer_style_cost_matches_course_formula_on_random_features():
    style, generated = _random_features((6, 5, 4), 3), _random_features((6, 5, 4), 4)
    n_h, n_w, n_c = style.shape
    difference = st.gram_matrix(style).numpy() - st.gram_matrix(generated).numpy()
    expected = np.sum(difference ** 2) / (2.0 * n_h * n_w * n_c) ** 2
    assert float(st.layer_style_cost(style, generated)) == pytest.approx(expected, rel=1e-5)


def test_style_cost_is_zero_against_itself_and_ignores_layout():
    style = _random_features((1, 8, 9, 5), 5)
    assert float(st.layer_style_cost(style, style)[0]) == pytest.approx(0.0, abs=1e-7)
    # Shuffle the positions: same correlations between channels, another layout.
    permutation = np.random.default_rng(6).permutation(8 * 9)
    shuffled = style.reshape(1, 72, 5)[:, permutation].reshape(1, 8, 9, 5)
    assert not np.allclose(shuffled, style)
    assert float(st.layer_style_cost(style, shuffled)[0]) == pytest.approx(0.0, abs=1e-6)
    generated = _random_features((1, 8, 9, 5), 7)
    shuffled_generated = generated.reshape(1, 72, 5)[:, permutation].reshape(1, 8, 9, 5)
    np.testing.assert_allclose(st.layer_style_cost(style, generated),
                               st.layer_style_cost(style, shuffled_generated), rtol=1e-5)
    # The content cost measures the layout: the shuffled map is far from the original.
    assert float(st.content_cost(style, style)[0]) == 0.0
    assert float(st.content_cost(style, shuffled)[0]) > 1.0


def test_style_cost_compares_averaged_grams_across_sizes():
    # A map tiled 2 x 2 has 4 times the positions and the same correlations: its averaged Gram
    # matrix is the original's, so a style image of another size costs 0 against it.
    style = _random_features((4, 5, 3), 8)
    tiled = np.tile(style, (2, 2, 1))
    assert float(st.layer_style_cost(style, tiled)) == pytest.approx(0.0, abs=1e-6)


def test_content_cost_hand_computed_and_batched():
    content = np.zeros((2, 2, 1), np.float32)
    generated = np.array([[[1.0], [2.0]], [[0.0], [-1.0]]], np.float32)
    # 1/2 * (1 + 4 + 0 + 1) = 3
    assert float(st.content_cost(content, generated)) == pytest.approx(3.0)
    batch = np.stack([generated, 2 * generated])
    np.testing.assert_allclose(st.content_cost(content[None], batch).numpy(), [3.0, 12.0])


def test_style_cost_weights_layers():
    style = {"a": _random_features((4, 4, 3), 1), "b": _random_features((2, 2, 6), 2)}
    generated = {"a": _random_features((4, 4, 3), 3), "b": _random_features((2, 2, 6), 4)}
    per_layer = {name: float(st.layer_style_cost(style[name], generated[name])) for name in style}
    weighted = float(st.style_cost(style, generated, {"a": 0.25, "b": 2.0}))
    assert weighted == pytest.approx(0.25 * per_layer["a"] + 2.0 * per_layer["b"], rel=1e-5)
    # Default weights: 1 / number of layers (Gatys et al.'s w_l = 1/5 for five layers).
    default = float(st.style_cost(style, generated))
    assert default == pytest.approx((per_layer["a"] + per_layer["b"]) / 2, rel=1e-5)
    as_lists = float(st.style_cost([style["a"], style["b"]], [generated["a"], generated["b"]],
                                   [0.25, 2.0]))
    assert as_lists == pytest.approx(weighted, rel=1e-6)


def test_total_variation_equals_tf_image():
    images = np.random.default_rng(9).uniform(size=(2, 7, 9, 3)).astype(np.float32)
    np.testing.assert_allclose(st.total_variation(images),
                               tf.image.total_variation(tf.constant(images)),
                               rtol=1e-5)
    assert float(st.total_variation(np.ones((5, 5, 3), np.float32))) == 0.0


@pytest.mark.parametrize("call,match", [
    (lambda: st.layer_style_cost(np.ones((2, 2, 3)), np.ones((2, 2, 4))), "3 channels"),
    (lambda: st.content_cost(np.ones((2, 2, 3)), np.ones((2, 3, 3))), "same shape"),
    (lambda: st.style_cost({}, {}), "empty"),
    (lambda: st.style_cost([], []), "empty"),
    (lambda: st.style_cost({"a": np.ones((2, 2, 3))}, {}), "lacks the style layers"),
    (lambda: st.style_cost([np.ones((2, 2, 3))], [np.ones((2, 2, 3))], [1.0, 2.0]),
     "2 entries for 1"),
    (lambda: st.build_feature_extractor([]), "layer_names is empty"),
    (lambda: st.build_feature_extractor(["block9_conv1"]), "unknown layers"),
    (lambda: st.build_feature_extractor(["block1_conv1"], pooling="sum"), "pooling"),
    (lambda: st.build_feature_extractor(["block1_conv1"], weights="no/such/file.keras"),
     "not a file"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------------
# Features and their normalisation
# --------------------------------------------------------------------------------------------------

def test_feature_extractor_outputs_named_layers_and_is_cut_after_the_deepest():
    keras.utils.set_random_seed(0)
    extractor = st.build_feature_extractor(["block2_conv1", "block1_conv2"], weights=None)
    outputs = extractor(tf.zeros((2, 32, 48, 3)))
    assert set(outputs) == {"block1_conv2", "block2_conv1"}
    assert tuple(outputs["block1_conv2"].shape) == (2, 32, 48, 64)
    assert tuple(outputs["block2_conv1"].shape) == (2, 16, 24, 128)
    names = [layer.name for layer in extractor.layers]
    assert names[-1] == "block2_conv1" and "block2_conv2" not in names
    assert isinstance(extractor.get_layer("block1_pool"), keras.layers.AveragePooling2D)
    assert not extractor.trainable_weights  # the image is the variable, not the network
    max_pool = st.build_feature_extractor(["block2_conv1"], pooling="max")
    assert isinstance(max_pool.get_layer("block1_pool"), keras.layers.MaxPooling2D)


def test_feature_extractor_equals_ch04_vgg19_with_max_pooling():
    from ch04_classification.models import get_model

    keras.utils.set_random_seed(1)
    vgg = get_model("vgg19", (None, None, 3), None, include_top=False, preprocessing="caffe")
    extractor = st.build_feature_extractor(["block3_conv1"], pooling="max")
    for layer in vgg.layers:
        if layer.weights and layer.name in [other.name for other in extractor.layers]:
            extractor.get_layer(layer.name).set_weights(layer.get_weights())
    reference = keras.Model(vgg.input, vgg.get_layer("block3_conv1").output)
    images = tf.random.stateless_uniform((1, 32, 32, 3), seed=[1, 2])
    np.testing.assert_allclose(extractor(images)["block3_conv1"], reference(images), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("statistic", ["rms", "mean"])
def test_normalization_gives_unit_filters_and_preserves_the_function(statistic):
    keras.utils.set_random_seed(2)
    layers = ["block1_conv1", "block2_conv1", "block2_conv2"]
    extractor = st.build_feature_extractor(layers)
    # Two images of different sizes; each counts alike (the mean of the per-image statistics).
    images = [tf.random.stateless_uniform((24, 24, 3), seed=[3, 4]),
              tf.random.stateless_uniform((16, 40, 3), seed=[5, 6])]
    before = [extractor(image[None]) for image in images]
    scales = st.normalize_filter_activations(extractor, images, statistic=statistic)
    after = [extractor(image[None]) for image in images]

    def size(outputs, name):
        if statistic == "mean":
            per_image = [output[name].numpy().mean(axis=(0, 1, 2)) for output in outputs]
            return np.mean(per_image, axis=0)
        per_image = [(output[name].numpy() ** 2).mean(axis=(0, 1, 2)) for output in outputs]
        return np.sqrt(np.mean(per_image, axis=0))

    for name in layers:
        # Same function up to one positive scale per channel (Gatys et al.'s rescaling): the
        # output of the rescaled network is the original output times the filter's scale.
        for old, new in zip(before, after):
            np.testing.assert_allclose(new[name].numpy(), old[name].numpy() * scales[name],
                                       rtol=2e-3, atol=1e-4)
        original = size(before, name)
        normal = original >= st.MIN_FILTER_SIZE * np.median(original)
        assert normal.mean() > 0.5
        np.testing.assert_allclose(size(after, name)[normal], 1.0, rtol=1e-3)
        # Filters below the floor get the scale of a filter at the floor: no huge amplification.
        assert scales[name].max() <= 1.0001 / (st.MIN_FILTER_SIZE * np.median(original))


@pytest.mark.parametrize("min_relative_size", [0.0, st.MIN_FILTER_SIZE])
def test_normalization_floor_tames_a_near_silent_filter(min_relative_size):
    keras.utils.set_random_seed(5)
    extractor = st.build_feature_extractor(["block1_conv1"])
    layer = extractor.get_layer("block1_conv1")
    kernel, bias = layer.get_weights()
    kernel[..., 0] *= 1e-6  # filter 0 is a million times quieter than its neighbours
    layer.set_weights([kernel, bias])
    image = tf.random.stateless_uniform((32, 32, 3), seed=[7, 8])
    features = extractor(image[None])["block1_conv1"].numpy()
    rms = np.sqrt((features ** 2).mean(axis=(0, 1, 2)))  # [64]
    scale = st.normalize_filter_activations(extractor, [image],
                                            min_relative_size=min_relative_size)["block1_conv1"]
    floor = min_relative_size * np.median(rms)
    np.testing.assert_allclose(scale[1:], 1.0 / np.maximum(rms[1:], floor), rtol=1e-4)
    if min_relative_size == 0.0:  # blown up by a million: it would dominate any image it fires on
        assert scale[0] == pytest.approx(1.0 / rms[0], rel=1e-3)
        assert scale[0] > 1e5 * np.median(scale)
    else:  # scaled like a filter at a tenth of the median size
        assert scale[0] == pytest.approx(1.0 / (min_relative_size * np.median(rms)), rel=1e-4)


def test_imagenet_weights_offline_give_a_clear_error(monkeypatch):
    from keras.src.utils import file_utils

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- "
                        "[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    with pytest.raises(st.WeightsUnavailableError, match="need the internet.*weights=None"):
        st.build_feature_extractor(["block1_conv1"], weights="imagenet")


def test_weights_from_a_vgg19_saved_here(tmp_path):
    from ch04_classification.models import get_model

    keras.utils.set_random_seed(3)
    # A classifier as train_classifier.py saves it (small dense head to keep the file small).
    trained = get_model("vgg19", (32, 32, 3), num_classes=5, fc_units=8)
    path = tmp_path / "model.keras"
    trained.save(path)
    extractor = st.build_feature_extractor(["block2_conv1"], weights=str(path), pooling="max")
    assert "imagenet_preprocessing" not in [layer.name for layer in extractor.layers]
    reference = keras.Model(trained.input, trained.get_layer("block2_conv1").output)
    images = tf.random.stateless_uniform((1, 32, 32, 3), seed=[5, 6])
    np.testing.assert_allclose(extractor(images)["block2_conv1"], reference(images), rtol=1e-4,
                               atol=1e-5)
    small = keras.Sequential([keras.Input((8, 8, 3)),
                              keras.layers.Conv2D(64, 3, name="block1_conv1")])
    small.save(tmp_path / "small.keras")
    with pytest.raises(ValueError, match="no layer 'block1_conv2'"):
        st.build_feature_extractor(["block1_conv1"], weights=str(tmp_path / "small.keras"))


# --------------------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_transfer():
    keras.utils.set_random_seed(4)
    content = tf.random.stateless_uniform((32, 40, 3), seed=[7, 8])
    style = tf.random.stateless_uniform((24, 24, 3), seed=[9, 10]) * tf.constant([1.0, 0.5, 0.1])
    layers = ["block1_conv1", "block2_conv1", "block2_conv2"]
    extractor = st.build_feature_extractor(layers, normalization_images=[content, style])
    return st.StyleTransfer(extractor, content, style, content_layer="block2_conv2",
                            style_layers=["block1_conv1", "block2_conv1"], content_weight=1e-3,
                            style_weight=1.0, tv_weight=1e-4)


def test_costs_under_tf_function_equal_eager(small_transfer):
    image = small_transfer.initial_image("noise", seed=1)
    traced = small_transfer.costs(image)
    outputs = small_transfer.extractor(image)
    content = st.content_cost(small_transfer.content_target, outputs["block2_conv2"])[0]
    style = st.style_cost(small_transfer.style_targets, outputs)[0]
    assert float(traced["content"]) == pytest.approx(float(content), rel=1e-4)
    assert float(traced["style"]) == pytest.approx(float(style), rel=1e-4)
    expected = 1e-3 * content + style + 1e-4 * st.total_variation(image)[0]
    assert float(traced["total"]) == pytest.approx(float(expected), rel=1e-4)
    # Starting from the content image, the content cost is exactly 0.
    assert float(small_transfer.costs(small_transfer.initial_image("content"))["content"]) == 0.0


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_a_few_steps_lower_the_total_cost(small_transfer, optimizer):
    # From noise every term is far from its optimum. (From C the content cost starts at its
    # minimum, 0, where its gradient vanishes, so Adam's first fixed-size steps raise it.)
    start = small_transfer.initial_image("noise", seed=3)
    image, history = st.optimize(small_transfer, start, steps=5, optimizer=optimizer,
                                 learning_rate=0.02)
    assert history["step"][0] == 0 and len(history["total"]) >= 2
    assert history["total"][-1] < 0.9 * history["total"][0]
    assert history["style"][-1] < history["style"][0]
    values = image.numpy()
    assert values.shape == (1, 32, 40, 3) and values.min() >= 0.0 and values.max() <= 1.0
    final = small_transfer.costs(image)
    assert float(final["total"]) == pytest.approx(history["total"][-1], rel=1e-3)


def test_style_transfer_and_optimize_bad_input(small_transfer):
    extractor = small_transfer.extractor
    content = small_transfer.content_image
    with pytest.raises(ValueError, match="style_layers is empty"):
        st.StyleTransfer(extractor, content, content, content_layer="block2_conv2", style_layers=[])
    with pytest.raises(ValueError, match="does not output the layers"):
        st.StyleTransfer(extractor, content, content, content_layer="block4_conv2",
                         style_layers=["block1_conv1"])
    with pytest.raises(ValueError, match="style_image must be one RGB image"):
        st.StyleTransfer(extractor, content, tf.zeros((32, 32, 4)), content_layer="block2_conv2",
                         style_layers=["block1_conv1"])
    with pytest.raises(ValueError, match="style_weight must be a finite number"):
        st.StyleTransfer(extractor, content, content, content_layer="block2_conv2",
                         style_layers=["block1_conv1"], style_weight=-1.0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        st.optimize(small_transfer, content, 1, optimizer="sgd")
    with pytest.raises(ValueError, match="initial_image must have the content image's shape"):
        st.optimize(small_transfer, tf.zeros((1, 8, 8, 3)), 1)
    with pytest.raises(ValueError, match="init must be one of"):
        small_transfer.initial_image("zeros")


# --------------------------------------------------------------------------------------------------
# Images and the script
# --------------------------------------------------------------------------------------------------

def test_load_image_samples_crop_resize_and_files(tmp_path):
    china = st.load_image("china.jpg")
    assert tuple(china.shape) == (427, 640, 3) and 0.0 <= float(tf.reduce_min(china))
    assert float(tf.reduce_max(china)) <= 1.0
    small = st.load_image("china.jpg", max_size=128)
    assert max(small.shape[:2]) == 128 and small.shape[1] == 128
    petals = st.load_image("flower_petals")
    assert petals.shape[0] < 427 and petals.shape[1] < 640
    path = tmp_path / "image.png"
    pixels = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    tf.io.write_file(str(path), tf.io.encode_png(pixels))
    np.testing.assert_allclose(st.load_image(path).numpy(), pixels / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="neither a file nor one of the bundled samples"):
        st.load_image(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="is not a PNG, JPEG"):
        st.load_image(tmp_path / "text.jpg")


@pytest.mark.slow
def test_run_style_transfer_fast_writes_outputs(tmp_path):
    from ch06_segmentation import run_style_transfer

    metrics = run_style_transfer.main(["--fast", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("content_cost", "style_cost", "style_cost_reduction", "seconds",
                "initial_style_cost", "steps"):
        assert key in saved
    assert saved["style_cost_reduction"] == pytest.approx(
        1.0 - saved["style_cost"] / saved["initial_style_cost"], rel=1e-6)
    assert 0.0 < metrics["style_cost_reduction"] <= 1.0
    for name in ("generated.png", "panel.png", "costs.png", "config.json"):
        assert (tmp_path / name).stat().st_size > 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["fast"] is True


def test_run_style_transfer_bad_options(tmp_path):
    from ch06_segmentation import run_style_transfer

    with pytest.raises(ValueError, match="--style-image"):
        run_style_transfer.main(["--fast", "--style-image", str(tmp_path / "nope.jpg"),
                                 "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--image-size"):
        run_style_transfer.main(["--fast", "--image-size", "8", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--style-layers"):
        run_style_transfer.main(["--fast", "--style-layers", "", "--out", str(tmp_path)])


def test_run_style_transfer_imagenet_offline_message(tmp_path, monkeypatch):
    from keras.src.utils import file_utils

    from ch06_segmentation import run_style_transfer

    def no_network(*args, **kwargs):
        raise Exception("URL fetch failure: [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "get_file", no_network)
    with pytest.raises(st.WeightsUnavailableError, match="need the internet"):
        run_style_transfer.main(["--fast", "--weights", "imagenet", "--out", str(tmp_path)])


def test_run_style_transfer_help_from_the_command_line():
    result = subprocess.run([sys.executable, "ch06_segmentation/run_style_transfer.py", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for flag in ("--content-image", "--style-image", "--weights", "--image-size", "--steps",
                 "--style-weight", "--optimizer", "FAST mode"):
        assert flag in result.stdout
