"""Tests of ch04_classification/interpret.py (and the scoring helpers of score_explanations.py).

Every visualisation is checked against a reference that does not come from our own code:
- the pre-softmax score reproduces the model's softmax output, and equals x @ W + b by hand;
- Grad-CAM at the last conv layer of a GAP + dense model equals CAM times 1 / (h w), a positive
  factor (Selvaraju et al. 2017, sec. 3.1), and differs at an earlier layer;
- occluding a region the model cannot see (it crops it away) changes nothing;
- guided backpropagation equals the plain gradient on a network without ReLUs, and equals the
  rule [x > 0][g > 0] g worked out by hand on a one-hidden-layer network;
- the gradient of a linear model is its weight vector;
- receptive fields: VGG-16 and ResNet-50 (zoo and keras.applications, weights=None) match the
  values of Araujo et al. 2019 (Table 1) and the formula r += (k - 1) j, j *= s run over the layer
  list; the box of every unit equals the support of its gradient on a network of ones;
- nearest neighbours equal sklearn's NearestNeighbors, the rank correlation equals scipy's
  spearmanr, t-SNE returns one point per embedding;
- maximally activating patches are the brute-force top activations, cut where the field says;
- class visualisation raises the class score; the sanity check runs for every method;
- the pointing game and mass in box on hand-made maps; the single-object data is make_scene's;
- score_explanations.py runs in FAST mode, writes every key, and rescoring its saved model agrees;
- every function runs on keras.applications models built offline with weights=None.
Run: `python -m pytest -q tests/test_ch04_interpret.py`.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch04_classification import interpret, models
from common import viz

SIZE = 32


def gap_dense_model(seed=0, activation="softmax", size=SIZE, num_classes=4):
    """conv(s1) -> conv(s2) -> conv: a small GAP + dense classifier (the CAM architecture)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation=activation, name="predictions")(x)
    return keras.Model(inputs, outputs)


def random_images(count=3, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (count, size, size, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# The pre-softmax score
# --------------------------------------------------------------------------------------------------

def test_pre_softmax_scores_reproduce_the_softmax_output_and_the_linear_layer():
    model = gap_dense_model()
    images = random_images()
    scores = interpret.pre_softmax_scores(model, images)
    np.testing.assert_allclose(tf.nn.softmax(scores).numpy(), model(images).numpy(), atol=1e-6)
    pooled = keras.Model(model.input, model.get_layer("avg_pool").output)(images).numpy()
    kernel, bias = model.get_layer("predictions").get_weights()
    np.testing.assert_allclose(scores, pooled @ kernel + bias, rtol=1e-5, atol=1e-6)


def test_pre_softmax_scores_for_logit_models_and_softmax_activation_layers():
    logits_model = gap_dense_model(activation=None)
    images = random_images()
    np.testing.assert_allclose(interpret.pre_softmax_scores(logits_model, images),
                               logits_model(images).numpy(), atol=1e-6)
    outputs = keras.layers.Activation("softmax")(logits_model.output)
    softmax_model = keras.Model(logits_model.input, outputs)
    np.testing.assert_allclose(interpret.pre_softmax_scores(softmax_model, images),
                               logits_model(images).numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# CAM and Grad-CAM
# --------------------------------------------------------------------------------------------------

def test_grad_cam_at_the_last_conv_layer_is_cam_times_a_positive_factor():
    model = gap_dense_model()
    images = random_images(4)
    signs = set()
    for class_index in (0, 1, 2, 3, [1, 2, 3, 0]):
        cam = interpret.class_activation_map(model, images, class_index, normalize=False)
        gradcam = interpret.grad_cam(model, images, class_index, "conv3", normalize=False)
        height, width = cam.shape[1:]
        assert cam.shape == gradcam.shape == (4, SIZE // 2, SIZE // 2)
        signs.update(np.unique(np.sign(cam)))
        # d y / d A_ij^k = w_k / (h w): Grad-CAM = ReLU(CAM) / (h w).
        np.testing.assert_allclose(gradcam, np.maximum(cam, 0) / (height * width), rtol=1e-4, atol=1e-8)
        np.testing.assert_allclose(interpret.grad_cam(model, images, class_index, "conv3"),
                                   interpret.class_activation_map(model, images, class_index),
                                   rtol=1e-4, atol=1e-6)
    assert {-1.0, 1.0} <= signs  # negative CAM values occur, so the ReLU is tested
    assert interpret.last_conv_layer_name(model) == "conv3"
    earlier = interpret.grad_cam(model, images, 0, "relu2")
    assert not np.allclose(earlier, interpret.class_activation_map(model, images, 0), atol=1e-2)


def test_cam_equals_the_weighted_sum_written_out():
    model = gap_dense_model()
    images = random_images(2)
    features = keras.Model(model.input, model.get_layer("conv3").output)(images).numpy()
    kernel = model.get_layer("predictions").get_weights()[0]
    expected = np.stack([sum(kernel[k, 2] * features[b, :, :, k] for k in range(kernel.shape[0]))
                         for b in range(2)])
    np.testing.assert_allclose(interpret.class_activation_map(model, images, 2, normalize=False),
                               expected, rtol=1e-4, atol=1e-6)
    # Its spatial mean plus the bias is the class score (Zhou et al. 2016, eq. 1-2).
    bias = model.get_layer("predictions").get_weights()[1][2]
    np.testing.assert_allclose(expected.mean(axis=(1, 2)) + bias,
                               interpret.pre_softmax_scores(model, images)[:, 2], rtol=1e-4, atol=1e-5)


def test_cam_refuses_models_without_global_average_pooling():
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    with pytest.raises(ValueError, match="global average pooling"):
        interpret.class_activation_map(model, random_images(1), 0)
    assert interpret.grad_cam(model, random_images(1), 0).shape == (1, SIZE - 2, SIZE - 2)


def test_upsample_and_normalised_maps():
    maps = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    big = interpret.upsample(maps, (8, 8))
    assert big.shape == (2, 8, 8)
    np.testing.assert_allclose(big[0, 0, 0], 0.0)  # half-pixel centres: corners keep the corner value
    np.testing.assert_allclose(big[1, -1, -1], 7.0)
    assert interpret.upsample(np.zeros((0, 2, 2)), 8).shape == (0, 8, 8)
    with pytest.raises(ValueError, match="heatmaps"):
        interpret.upsample(np.zeros((2, 2)), 8)


# --------------------------------------------------------------------------------------------------
# Occlusion
# --------------------------------------------------------------------------------------------------

def test_occluding_what_the_model_cannot_see_changes_nothing():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Cropping2D(((0, 0), (0, SIZE // 2)))(inputs)  # the model sees the left half only
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    images = random_images(2)
    maps = interpret.occlusion_map(model, images, 1, patch_size=8, stride=8)
    assert maps.shape == (2, SIZE, SIZE)
    np.testing.assert_allclose(maps[:, :, SIZE // 2 :], 0.0, atol=1e-6)
    assert np.abs(maps[:, :, : SIZE // 2]).max() > 1e-4


def test_occlusion_map_is_the_mean_probability_drop_of_the_patches_covering_a_pixel():
    model = gap_dense_model()
    image = random_images(1)
    maps = interpret.occlusion_map(model, image, 2, patch_size=16, stride=16, fill_value=0.25)
    base = model(image).numpy()[0, 2]
    occluded = image.copy()
    occluded[0, 16:, :16] = 0.25  # the bottom-left patch
    expected = base - model(occluded).numpy()[0, 2]
    np.testing.assert_allclose(maps[0, 16:, :16], expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Gradients: saliency and guided backpropagation
# --------------------------------------------------------------------------------------------------

def test_input_gradients_of_a_linear_model_are_its_weights():
    inputs = keras.Input((6, 5, 3))
    x = keras.layers.Flatten()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))
    images = random_images(2, size=1).repeat(6, 1).repeat(5, 2)
    gradients = interpret.input_gradients(model, images, [3, 1])
    kernel = model.layers[-1].get_weights()[0]
    np.testing.assert_allclose(gradients[0], kernel[:, 3].reshape(6, 5, 3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gradients[1], kernel[:, 1].reshape(6, 5, 3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(interpret.saliency_map(model, images, 3)[0],
                               np.abs(kernel[:, 3].reshape(6, 5, 3)).max(axis=-1), rtol=1e-5)


def test_guided_relu_gradient_keeps_positive_gradients_at_positive_inputs():
    x = tf.constant([-2.0, -0.5, 0.5, 2.0, 3.0])
    upstream = tf.constant([1.0, -1.0, 1.0, -1.0, 2.0])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = interpret.guided_relu(x)
    np.testing.assert_allclose(y.numpy(), tf.nn.relu(x).numpy())
    np.testing.assert_allclose(tape.gradient(y, x, output_gradients=upstream).numpy(), [0, 0, 1, 0, 2])
    # ReLU followed by the gate gives the same gradient, also inside a tf.function.
    gate = interpret.GuidedBackpropGate()

    @tf.function
    def gated(values, grads):
        with tf.GradientTape() as tape:
            tape.watch(values)
            out = gate(tf.nn.relu(values))
        return tape.gradient(out, values, output_gradients=grads)

    np.testing.assert_allclose(gated(x, upstream).numpy(), [0, 0, 1, 0, 2])


def test_guided_backprop_gate_serializes():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, interpret.GuidedBackpropGate(name="gate")(keras.layers.ReLU()(inputs)))
    restored = keras.Model.from_config(model.get_config())
    assert isinstance(restored.get_layer("gate"), interpret.GuidedBackpropGate)
    x = np.array([[-1.0, 0.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(restored(x).numpy(), model(x).numpy())


def test_guided_backprop_equals_plain_gradients_on_a_network_without_relus():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, activation="tanh")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="elu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    images = random_images(2)
    np.testing.assert_allclose(interpret.guided_backprop(model, images, 1),
                               interpret.input_gradients(model, images, 1), rtol=1e-5, atol=1e-8)
    # ... and differs from them when the network has ReLUs.
    relu_model = gap_dense_model()
    assert not np.allclose(interpret.guided_backprop(relu_model, images, 1),
                           interpret.input_gradients(relu_model, images, 1), atol=1e-6)


def test_guided_backprop_of_a_one_hidden_layer_network_by_hand():
    """y = v . relu(W x): guided gradient = W^T ([W x > 0] [v > 0] v) (Springenberg et al. 2015)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((4, 4, 1))
    flat = keras.layers.Flatten()(inputs)
    hidden = keras.layers.Dense(10, activation="relu", use_bias=False)(flat)
    model = keras.Model(inputs, keras.layers.Dense(2, use_bias=False)(hidden))  # logits
    image = random_images(1, size=4)[..., :1]
    weights, head = (layer.get_weights()[0] for layer in model.layers[2:])
    x = image.reshape(-1)
    v = head[:, 1]
    expected = weights @ (v * (weights.T @ x > 0) * (v > 0))
    plain = weights @ (v * (weights.T @ x > 0))
    np.testing.assert_allclose(interpret.guided_backprop(model, image, 1)[0].reshape(-1), expected,
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(interpret.input_gradients(model, image, 1)[0].reshape(-1), plain,
                               rtol=1e-5, atol=1e-7)
    # The guided copy shares the weights and computes the same forward pass.
    guided = interpret.guided_model(model)
    np.testing.assert_allclose(guided(image).numpy(), model(image).numpy(), atol=1e-6)
    assert guided.layers[2] is model.layers[2]


# --------------------------------------------------------------------------------------------------
# Receptive fields and patches
# --------------------------------------------------------------------------------------------------

def formula(layers):
    """r_l = r_{l-1} + (k_l - 1) j_{l-1}, j_l = j_{l-1} s_l over a list of (kernel, stride)."""
    size, stride = 1, 1
    for kernel, step in layers:
        size += (kernel - 1) * stride
        stride *= step
    return size, stride


VGG16_LAYERS = ([(3, 1)] * 2 + [(2, 2)] + [(3, 1)] * 2 + [(2, 2)] + ([(3, 1)] * 3 + [(2, 2)]) * 3)


@functools.cache
def zoo_model(name):
    return models.get_model(name, (224, 224, 3), 1000)


def test_receptive_fields_of_vgg16():
    for model in (zoo_model("vgg16"), keras.applications.VGG16(weights=None)):
        # Araujo et al. 2019, Table 1: VGG-16 at pool5 sees 212 pixels, with stride 32.
        assert interpret.receptive_field(model, "block5_pool") == (212, 32) == formula(VGG16_LAYERS)
        assert interpret.receptive_field(model, "block5_conv3") == (196, 16) == formula(VGG16_LAYERS[:-1])
        assert interpret.receptive_field(model, "block3_conv3") == formula(VGG16_LAYERS[:9]) == (40, 4)
        assert interpret.receptive_field(model, "block1_conv1") == (3, 1)
        # "effective padding" 90 (Table 1): unit 0 is centred at -90 + (212 - 1) / 2.
        geometry = interpret.receptive_field_geometry(model, "block5_pool")
        assert geometry.start == (15.5, 15.5)
        assert interpret.receptive_field_box(geometry, 0, 0) == (-90, -90, 121, 121)


def test_receptive_fields_of_resnet50():
    # The longest path: 7x7/2 stem, 3x3/2 pool, then one 3x3 per bottleneck block (3, 4, 6, 3 blocks),
    # the stride entering on each stage's first block.
    stem = [(7, 2), (3, 2)]
    stages = [[(3, 1)] * 3, [(1, 2)] + [(3, 1)] * 4, [(1, 2)] + [(3, 1)] * 6, [(1, 2)] + [(3, 1)] * 3]
    layers = stem + [layer for stage in stages for layer in stage]
    assert formula(layers) == (483, 32)  # Araujo et al. 2019, Table 1: ResNet-50 v1 sees 483 pixels
    for model in (zoo_model("resnet50"), keras.applications.ResNet50(weights=None)):
        assert interpret.receptive_field(model, "conv5_block3_out") == (483, 32)
        assert interpret.receptive_field(model, "conv1_relu") == (7, 2)
        assert interpret.receptive_field(model, "pool1_pool") == (11, 4)
        assert interpret.receptive_field(model, "conv2_block3_out") == formula(stem + stages[0]) == (35, 4)
        assert interpret.receptive_field(model, "conv4_block6_out") == formula(
            stem + stages[0] + stages[1] + stages[2]) == (291, 16)


def test_receptive_field_boxes_are_the_support_of_the_gradient():
    """On a linear network of all-ones kernels (average pooling), d unit / d input is non-zero
    exactly on the unit's field clipped to the image; odd sizes exercise TF's uneven 'same' padding."""
    ones = {"kernel_initializer": "ones", "use_bias": False}
    inputs = keras.Input((38, 36, 1))  # padded to 41 x 37: the valid 3x3/2 conv drops no pixel
    x = keras.layers.ZeroPadding2D(((2, 1), (1, 0)))(inputs)
    x = keras.layers.Conv2D(1, 3, strides=2, **ones)(x)
    branch = keras.layers.Conv2D(1, 3, padding="same", dilation_rate=2, **ones)(x)
    shortcut = keras.layers.Conv2D(1, 1, **ones)(x)
    x = keras.layers.Add()([branch, shortcut])
    x = keras.layers.AveragePooling2D(3, strides=2, padding="same")(x)
    x = keras.layers.Conv2D(1, (3, 5), strides=(1, 2), padding="same", name="last", **ones)(x)
    model = keras.Model(inputs, x)
    geometry = interpret.receptive_field_geometry(model, "last")
    assert geometry.size == formula([(3, 2), (5, 1), (3, 2), (3, 1)])[:1] + (
        formula([(3, 2), (5, 1), (3, 2), (5, 2)])[0],)
    image = tf.constant(np.random.default_rng(0).uniform(0.5, 1, (1, 38, 36, 1)), tf.float32)
    out_h, out_w = model.output.shape[1:3]
    for row, col in [(0, 0), (1, 2), (out_h - 1, out_w - 1), (out_h // 2, 1)]:
        with tf.GradientTape() as tape:
            tape.watch(image)
            unit = model(image)[0, row, col, 0]
        support = np.abs(tape.gradient(unit, image).numpy()[0, ..., 0]) > 0
        rows, cols = np.flatnonzero(support.any(1)), np.flatnonzero(support.any(0))
        top, left, bottom, right = interpret.receptive_field_box(geometry, row, col)
        assert (rows[0], rows[-1]) == (max(top, 0), min(bottom, 37)), (row, col)
        assert (cols[0], cols[-1]) == (max(left, 0), min(right, 35)), (row, col)


def test_receptive_field_errors():
    model = gap_dense_model()
    with pytest.raises(ValueError, match="layer_name"):
        interpret.receptive_field(model, "no_such_layer")
    with pytest.raises(ValueError, match="h, w, c"):
        interpret.receptive_field(model, "avg_pool")


def test_top_activating_patches_are_the_brute_force_top_units():
    model = gap_dense_model()
    images = random_images(6)
    maps = keras.Model(model.input, model.get_layer("relu2").output)(images).numpy()[..., 5]
    result = interpret.top_activating_patches(model, images, "relu2", 5, count=4, one_per_image=False)
    order = np.argsort(-maps.reshape(-1), kind="stable")[:4]
    np.testing.assert_allclose(result["activations"], maps.reshape(-1)[order], rtol=1e-6)
    size, stride = interpret.receptive_field(model, "relu2")
    assert (size, stride) == (5, 2) and result["patches"].shape == (4, 5, 5, 3)
    for patch, index, (row, col), box in zip(result["patches"], result["image_indices"],
                                             result["positions"], result["boxes"]):
        assert maps[index, row, col] in result["activations"]
        top, left = box[:2]
        # conv1 3x3/1 "same" keeps centre 0; conv2 3x3/2 "same" on 32 pixels pads 0 before and 1
        # after, so unit i is centred on pixel 1 + 2 i and its 5-pixel field starts at 2 i - 1.
        assert (top, left) == (2 * row - 1, 2 * col - 1)
        padded = np.pad(images[index], ((4, 4), (4, 4), (0, 0)), constant_values=0.5)
        np.testing.assert_allclose(patch, padded[top + 4 : top + 9, left + 4 : left + 9])
    one_each = interpret.top_activating_patches(model, images, "relu2", 5, count=10)
    assert len(one_each["patches"]) == 6 and len(set(one_each["image_indices"])) == 6


# --------------------------------------------------------------------------------------------------
# Filters, activations, embeddings, neighbours, t-SNE
# --------------------------------------------------------------------------------------------------

def test_first_layer_filters_activation_maps_and_embeddings():
    model = gap_dense_model()
    filters = interpret.first_layer_filters(model)
    kernel = model.get_layer("conv1").get_weights()[0]
    assert filters.shape == (8, 3, 3, 3)
    np.testing.assert_allclose(filters.min(axis=(1, 2, 3)), 0.0)
    np.testing.assert_allclose(filters.max(axis=(1, 2, 3)), 1.0)
    raw = interpret.first_layer_filters(model, normalize=False)
    np.testing.assert_allclose(raw[3], kernel[..., 3])
    images = random_images(5)
    maps = interpret.activation_maps(model, images, "conv3", batch_size=2)
    np.testing.assert_allclose(maps, keras.Model(model.input, model.get_layer("conv3").output)(images),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(interpret.embeddings(model, images, "conv3"), maps.mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-6)
    assert interpret.embeddings(model, images, "conv3", pooling="flatten").shape == (5, 16 * 16 * 16)
    assert interpret.embeddings(model, images, "avg_pool").shape == (5, 16)
    assert interpret.activation_maps(model, images[:0], "conv3").shape == (0, 16, 16, 16)


def test_nearest_neighbours_equal_sklearn():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    database, queries = rng.normal(size=(40, 6)), rng.normal(size=(5, 6))
    for metric in ("euclidean", "cosine"):
        indices, distances = interpret.nearest_neighbours(queries, database, count=4, metric=metric)
        reference = NearestNeighbors(n_neighbors=4, metric=metric).fit(database)
        ref_distances, ref_indices = reference.kneighbors(queries)
        np.testing.assert_array_equal(indices, ref_indices)
        np.testing.assert_allclose(distances, ref_distances, atol=1e-9)
    with pytest.raises(ValueError, match="count"):
        interpret.nearest_neighbours(queries, database, count=41)


def test_tsne_gives_one_point_per_embedding():
    rng = np.random.default_rng(0)
    clusters = np.concatenate([rng.normal(0, 1, (15, 8)), rng.normal(20, 1, (15, 8))])
    points = interpret.tsne(clusters, seed=0)
    assert points.shape == (30, 2) and np.isfinite(points).all()
    # The two far-apart clusters stay apart: every point's nearest neighbour is in its own cluster.
    indices, _ = interpret.nearest_neighbours(points, points, count=2)
    assert ((indices[:, 1] < 15) == (np.arange(30) < 15)).all()
    assert interpret.tsne(clusters[:4]).shape == (4, 2)
    with pytest.raises(ValueError, match="embeddings"):
        interpret.tsne(clusters[:1])


# --------------------------------------------------------------------------------------------------
# Class visualisation, sanity check, explain
# --------------------------------------------------------------------------------------------------

def test_class_visualization_raises_the_class_score():
    model = gap_dense_model(activation=None)
    grey = np.full((1, SIZE, SIZE, 3), 0.5, np.float32)
    before = interpret.pre_softmax_scores(model, grey)[0]
    for class_index in (0, 3):
        # Plain gradient ascent: the chosen class gains more than any other class.
        plain = interpret.class_visualization(model, class_index, steps=30, l2_decay=0.0, jitter=0,
                                              blur_every=0)
        gains = interpret.pre_softmax_scores(model, plain[None])[0] - before
        assert gains.argmax() == class_index and gains[class_index] > 0.05
        # With L2 decay, jitter and blur the score still rises and the picture is smoother.
        image = interpret.class_visualization(model, class_index, steps=30, seed=0)
        assert image.shape == (SIZE, SIZE, 3) and image.min() >= 0.0 and image.max() <= 1.0
        assert interpret.pre_softmax_scores(model, image[None])[0, class_index] > before[class_index]
        roughness = [np.abs(np.diff(picture, axis=0)).mean() for picture in (image, plain)]
        assert roughness[0] < roughness[1]
    with pytest.raises(ValueError, match="class_index"):
        interpret.class_visualization(model, 4, steps=1)


def test_gaussian_blur_keeps_constants_and_matches_opencv():
    import cv2

    image = np.random.default_rng(0).uniform(0, 1, (1, 20, 20, 3)).astype(np.float32)
    blurred = interpret.gaussian_blur(tf.constant(image), 1.0).numpy()[0]
    reference = cv2.GaussianBlur(image[0], (7, 7), 1.0, borderType=cv2.BORDER_REFLECT_101)
    np.testing.assert_allclose(blurred, reference, atol=1e-5)
    constant = np.full((1, 9, 9, 3), 0.3, np.float32)
    np.testing.assert_allclose(interpret.gaussian_blur(tf.constant(constant), 2.0).numpy(), constant, atol=1e-6)


def test_rank_correlation_equals_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    b[0, :3] = a[0, :3] = 1.0  # ties
    assert interpret.rank_correlation(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel())[0])
    assert interpret.rank_correlation(a, np.zeros_like(a)) == 0.0


def test_randomized_copy_reinitialises_the_chosen_layers_only():
    model = gap_dense_model()
    copy = interpret.randomized_copy(model, ["predictions"], seed=1)
    for layer in model.layers:
        for original, new in zip(layer.get_weights(), copy.get_layer(layer.name).get_weights()):
            same = np.array_equal(original, new)
            assert same == (layer.name != "predictions") or np.all(original == original.flat[0])
    full = interpret.randomized_copy(model, seed=1)
    assert not np.allclose(full.get_layer("conv1").get_weights()[0], model.get_layer("conv1").get_weights()[0])


def test_sanity_check_runs_for_every_method():
    model = gap_dense_model()
    images = random_images(3)
    options = {"occlusion": {"patch_size": 8, "stride": 8}}
    results = interpret.sanity_check(model, images, [0, 1, 2], method_options=options)
    assert set(results) == set(interpret.METHODS)
    assert all(-1.0 <= value <= 1.0 for value in results.values())
    same = interpret.sanity_check(model, images, [0, 1, 2], randomized_model=model, method_options=options)
    assert all(value == pytest.approx(1.0) for value in same.values())


def test_explain_returns_image_sized_non_negative_maps_for_every_method():
    model = gap_dense_model()
    images = random_images(2)
    for method in interpret.METHODS:
        options = {"patch_size": 8} if method == "occlusion" else {}
        maps = interpret.explain(method, model, images, [0, 3], **options)
        assert maps.shape == (2, SIZE, SIZE), method
        assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6, method
    with pytest.raises(ValueError, match="method"):
        interpret.explain("lime", model, images, 0)


def test_bad_arguments_raise_value_errors():
    model = gap_dense_model()
    images = random_images(2)
    with pytest.raises(ValueError, match="class_index"):
        interpret.grad_cam(model, images, 4)
    with pytest.raises(ValueError, match="class_index"):
        interpret.saliency_map(model, images, [0, 1, 2])
    with pytest.raises(ValueError, match="input shape"):
        interpret.saliency_map(model, random_images(2, size=16), 0)
    with pytest.raises(ValueError, match="images"):
        interpret.grad_cam(model, images[0], 0)
    with pytest.raises(ValueError, match="layer_name"):
        interpret.grad_cam(model, images, 0, "nope")
    with pytest.raises(ValueError, match="patch_size"):
        interpret.occlusion_map(model, images, 0, patch_size=64)
    with pytest.raises(ValueError, match="model"):
        interpret.grad_cam("not a model", images, 0)


def test_empty_batches_and_predicted_classes():
    model = gap_dense_model()
    empty = random_images(0)
    assert interpret.grad_cam(model, empty, 0).shape == (0, 16, 16)
    assert interpret.class_activation_map(model, empty, 0).shape == (0, 16, 16)
    assert interpret.saliency_map(model, empty, 0).shape == (0, SIZE, SIZE)
    assert interpret.pre_softmax_scores(model, empty).shape == (0, 4)
    images = random_images(3)
    predicted = model(images).numpy().argmax(-1)
    np.testing.assert_allclose(interpret.grad_cam(model, images), interpret.grad_cam(model, images, predicted))


# --------------------------------------------------------------------------------------------------
# keras.applications models (offline: weights=None)
# --------------------------------------------------------------------------------------------------

def test_every_method_works_on_keras_applications_models():
    images = random_images(2, size=64)
    mobilenet = keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35, weights=None, classes=5)
    resnet = keras.applications.ResNet50(input_shape=(64, 64, 3), weights=None, classes=5)
    for model in (mobilenet, resnet):
        cam = interpret.class_activation_map(model, images, 1, normalize=False)
        gradcam = interpret.grad_cam(model, images, 1, interpret.last_conv_layer_name(model), normalize=False)
        np.testing.assert_allclose(gradcam, np.maximum(cam, 0) / (cam.shape[1] * cam.shape[2]),
                                   rtol=1e-3, atol=1e-6 * np.abs(cam).max())
        guided = interpret.guided_model(model)
        np.testing.assert_allclose(guided(images).numpy(), model(images).numpy(), atol=1e-5)
        assert any(isinstance(layer, interpret.GuidedBackpropGate) for layer in guided.layers)
        for method in interpret.METHODS:
            options = {"patch_size": 32, "stride": 32} if method == "occlusion" else {}
            assert interpret.explain(method, model, images, 1, **options).shape == (2, 64, 64)
        assert interpret.class_visualization(model, 2, steps=2).shape == (64, 64, 3)
        assert interpret.embeddings(model, images, interpret.last_conv_layer_name(model)).ndim == 2
    # MobileNet v2: 3x3/2 stem, then the 3x3 depthwise convolutions of its blocks.
    assert interpret.receptive_field(mobilenet, "Conv1") == (3, 2)
    assert interpret.receptive_field(mobilenet, "expanded_conv_depthwise") == (7, 2)
    # EfficientNet-B0: 3x3/2 stem, then block1a's 3x3 depthwise; its squeeze-and-excitation branch
    # (global pooling, reshape, multiply) does not count.
    efficientnet = keras.applications.EfficientNetB0(input_shape=(64, 64, 3), weights=None, classes=5)
    assert interpret.receptive_field(efficientnet, "block1a_project_conv") == (7, 2)
    assert interpret.grad_cam(efficientnet, images, 0).shape == (2, 2, 2)
    vgg = keras.applications.VGG16(input_shape=(64, 64, 3), weights=None, classes=5)
    with pytest.raises(ValueError, match="global average pooling"):
        interpret.class_activation_map(vgg, images, 0)
    assert interpret.grad_cam(vgg, images, 0, "block5_conv3").shape == (2, 4, 4)


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------

def test_viz_heatmap_helpers(tmp_path):
    import matplotlib.pyplot as plt

    image = np.zeros((8, 8, 3), np.float32)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[2, 5] = 3.0
    overlay = viz.overlay_heatmap(image, heatmap, alpha=1.0)
    np.testing.assert_allclose(overlay[2, 5], plt.get_cmap("jet")(1.0)[:3])
    np.testing.assert_allclose(overlay[0, 0], plt.get_cmap("jet")(0.0)[:3])
    with pytest.raises(ValueError, match="heatmap"):
        viz.overlay_heatmap(image, np.zeros((4, 4)))
    figure = viz.show_explanations(np.stack([image, image]), {"a": np.stack([heatmap] * 2)},
                                   boxes=[[0, 0, 0.5, 0.5]] * 2, save_path=tmp_path / "e.png")
    assert (tmp_path / "e.png").exists() and len(figure.axes) == 4
    figure = viz.plot_embedding_2d(np.zeros((4, 2)), [0, 1, 1, 0], ["x", "y"], save_path=tmp_path / "t.png")
    assert (tmp_path / "t.png").exists()
    plt.close("all")


# --------------------------------------------------------------------------------------------------
# score_explanations.py: data, the pointing game, the script
# --------------------------------------------------------------------------------------------------

def test_single_object_dataset_has_exactly_one_shape_per_image():
    from common import synthetic

    data = interpret.single_object_dataset(12, "validation", seed=3, image_size=48)
    assert data["images"].shape == (12, 48, 48, 3) and data["images"].dtype == np.float32
    for image, label, box, index in zip(data["images"], data["labels"], data["boxes"], data["indices"]):
        scene = synthetic.make_scene(int(index), "validation", 3, 48, max_objects=1, min_objects=1,
                                     empty_fraction=0.0)
        assert len(scene["classes"]) == 1 and scene["classes"][0] == label
        np.testing.assert_array_equal(scene["image"], image)
        np.testing.assert_array_equal(scene["boxes"][0], box)
        assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
    again = interpret.single_object_dataset(12, "validation", seed=3, image_size=48)
    np.testing.assert_array_equal(again["images"], data["images"])
    # Random positions: the object's box centre is spread over the image, not at its middle.
    centres = (data["boxes"][:, :2] + data["boxes"][:, 2:]) / 2
    assert centres.std(axis=0).min() > 0.1
    assert interpret.single_object_dataset(0)["images"].shape == (0, 64, 64, 3)


def test_pointing_game_and_mass_in_box_by_hand():
    from ch04_classification.interpret import (
        box_masks,
        centre_heatmaps,
        mass_in_box,
        peak_points,
        pointing_hits,
    )

    heatmaps = np.zeros((3, 10, 10), np.float32)
    heatmaps[0, 2, 3] = 1.0  # inside the box rows 2..4, cols 3..5
    heatmaps[1, 6, 6] = 1.0  # outside: 1.5 pixels below and right of the box's corner (5, 6) -> (6.5, 6.5)
    boxes = np.array([[0.2, 0.3, 0.5, 0.6]] * 3, np.float32)
    np.testing.assert_array_equal(peak_points(heatmaps), [[2, 3], [6, 6], [0, 0]])
    np.testing.assert_array_equal(pointing_hits(heatmaps, boxes), [True, False, False])
    np.testing.assert_array_equal(pointing_hits(heatmaps, boxes, tolerance=1.5 * np.sqrt(2) + 1e-6),
                                  [True, True, False])
    masks = box_masks(boxes[:1], (10, 10))[0]
    assert masks.sum() == 9 and masks[2:5, 3:6].all()
    heatmaps[2] = 1.0  # uniform
    heatmaps[1, 3, 4] = 3.0
    np.testing.assert_allclose(mass_in_box(heatmaps, boxes), [1.0, 0.75, 0.09])
    np.testing.assert_allclose(mass_in_box(np.zeros((1, 10, 10)), boxes[:1]), [0.09])  # as a uniform map
    centre = centre_heatmaps(2, (10, 10))
    assert set(map(tuple, peak_points(centre[:1]).tolist())) == {(4, 4)}
    np.testing.assert_allclose(centre[0, 4:6, 4:6], centre.max())
    with pytest.raises(ValueError, match="boxes"):
        pointing_hits(heatmaps, boxes[:2])


def test_score_explanations_fast_run_and_rescoring_a_saved_model(tmp_path):
    import json

    from ch04_classification import score_explanations
    from common import training

    out = tmp_path / "run"
    metrics = score_explanations.main(["--fast", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    for method in interpret.METHODS:
        for key in (f"pointing_{method}", f"mass_in_box_{method}", f"sanity_spearman_{method}"):
            assert key in saved and np.isfinite(saved[key]), key
        assert 0.0 <= saved[f"pointing_{method}"] <= 1.0
    assert {"pointing_center", "mass_in_box_center", "mass_in_box_uniform", "val_accuracy",
            "train_seconds", "epochs", "parameters"} <= set(saved)
    assert (out / "explanations.png").exists() and (out / "model.keras").exists()
    table = interpret.format_scores(saved)
    assert all(method in table for method in interpret.METHODS) and "centre baseline" in table
    # The centre baseline, recomputed from the boxes alone.
    config = score_explanations.Config(**score_explanations.Config.FAST)
    val = interpret.single_object_dataset(config.num_val_examples, "validation", 0, config.image_size)
    boxes = val["boxes"]
    centre_inside = (boxes[:, 0] <= 0.5) & (boxes[:, 2] >= 0.5) & (boxes[:, 1] <= 0.5) & (boxes[:, 3] >= 0.5)
    assert saved["pointing_center"] == pytest.approx(centre_inside.mean())
    # Scoring the saved model again gives the same numbers.
    again = score_explanations.main(["--fast", "--out", str(tmp_path / "again"),
                                     "--model-path", str(out / "model.keras")])
    for method in interpret.METHODS:
        assert again[f"pointing_{method}"] == metrics[f"pointing_{method}"]
        assert again[f"mass_in_box_{method}"] == pytest.approx(metrics[f"mass_in_box_{method}"], abs=1e-5)
    with pytest.raises(training.RunError, match="--model-path"):
        score_explanations.main(["--fast", "--out", str(tmp_path / "bad"), "--model-path", "missing.keras"])
    with pytest.raises(training.RunError, match="--occlusion-patch"):
        score_explanations.main(["--fast", "--out", str(tmp_path / "bad2"), "--occlusion-patch", "0"])
