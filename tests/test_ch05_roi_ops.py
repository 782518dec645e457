"""Tests for ch05_detection/roi_ops.py.

RoI pooling: the chapter's worked example (8x8 map, 5x4 RoI -> 2x2) computed by hand,
random cases against the NumPy loop reference, gradients, graph mode with a varying
number of RoIs, and .keras round trips. RoIAlign: a linear feature map whose exact
answer is known in closed form, and random cases against a NumPy bilinear reference.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import roi_ops

# The worked example's 8x8 feature map (one channel). The RoI is rows 3..7 (5 rows)
# and columns 0..3 (4 columns), marked with [ ] below.
EXAMPLE_MAP = np.array([
    [0.88, 0.44, 0.14, 0.16, 0.37, 0.77, 0.96, 0.27],
    [0.19, 0.45, 0.57, 0.16, 0.63, 0.29, 0.71, 0.70],
    [0.66, 0.26, 0.82, 0.64, 0.54, 0.73, 0.59, 0.26],
    [0.85, 0.34, 0.76, 0.84, 0.29, 0.75, 0.62, 0.25],  # [.85 .34 .76 .84]
    [0.32, 0.74, 0.21, 0.39, 0.34, 0.03, 0.33, 0.48],  # [.32 .74 .21 .39]
    [0.20, 0.90, 0.16, 0.13, 0.73, 0.65, 0.96, 0.32],  # [.20 .90 .16 .13]
    [0.19, 0.69, 0.09, 0.86, 0.88, 0.07, 0.01, 0.48],  # [.19 .69 .09 .86]
    [0.83, 0.24, 0.97, 0.04, 0.24, 0.35, 0.50, 0.91],  # [.83 .24 .97 .04]
], np.float32)
EXAMPLE_ROI = [3 / 8, 0 / 8, 8 / 8, 4 / 8]  # normalized yxyx of rows 3-7, cols 0-3


def example_inputs():
    return EXAMPLE_MAP[np.newaxis, :, :, np.newaxis], np.array([[EXAMPLE_ROI]], np.float32)


def test_worked_example_by_hand():
    """5 rows split 2 + 3 (rows 3-4 | 5-7), 4 columns split 2 + 2 (0-1 | 2-3)."""
    feature_map, rois = example_inputs()
    # top: max(.85 .34 .32 .74), max(.76 .84 .21 .39)
    # bottom: max(.20 .90 .19 .69 .83 .24), max(.16 .13 .09 .86 .97 .04)
    expected = np.array([[0.85, 0.84],
                         [0.90, 0.97]])
    layer = roi_ops.RoIPooling(pool_size=2)
    np.testing.assert_allclose(layer(feature_map, rois)[0, 0, :, :, 0], expected)
    np.testing.assert_allclose(roi_ops.roi_pool_reference(feature_map, rois, 2)[0, 0, :, :, 0],
                               expected, rtol=1e-6)


def test_worked_example_caffe_boundaries():
    """Caffe rounds cell ends up: rows 3-5 | 5-7 share row 5, whose 0.90 now wins top-left."""
    feature_map, rois = example_inputs()
    expected = np.array([[0.90, 0.84], [0.90, 0.97]])
    layer = roi_ops.RoIPooling(pool_size=2, bin_boundaries="caffe")
    np.testing.assert_allclose(layer(feature_map, rois)[0, 0, :, :, 0], expected)


def random_rois(rng, batch, count):
    corner = rng.uniform(-0.1, 0.9, size=(batch, count, 2))
    size = rng.uniform(0.0, 0.8, size=(batch, count, 2))
    return np.concatenate([corner, corner + size], axis=-1).astype(np.float32)


@pytest.mark.parametrize("bin_boundaries", ["floor", "caffe"])
def test_roi_pool_random_against_reference(bin_boundaries):
    rng = np.random.default_rng(0)
    for height, width, pool in [(8, 8, (2, 2)), (13, 7, (3, 4)), (5, 9, (7, 7))]:
        feature_map = rng.normal(size=(2, height, width, 3)).astype(np.float32)
        rois = random_rois(rng, 2, 6)
        rois[0, 0] = 0.0  # a padding row
        ours = roi_ops.roi_pool(feature_map, rois, pool, bin_boundaries)
        reference = roi_ops.roi_pool_reference(feature_map, rois, pool, bin_boundaries)
        np.testing.assert_allclose(ours, reference, rtol=1e-6)


def test_roi_pool_gradient_reaches_feature_map():
    feature_map, rois = example_inputs()
    feature_map = tf.Variable(feature_map)
    with tf.GradientTape() as tape:
        pooled = roi_ops.RoIPooling(pool_size=2)(feature_map, rois)
        loss = tf.reduce_sum(pooled)
    gradient = tape.gradient(loss, feature_map)
    assert gradient is not None
    # Exactly the four maxima receive gradient 1.
    expected = np.zeros((8, 8))
    for row, col in [(3, 0), (3, 3), (5, 1), (7, 2)]:
        expected[row, col] = 1.0
    np.testing.assert_allclose(gradient[0, :, :, 0], expected)


@pytest.mark.parametrize("layer_class", [roi_ops.RoIPooling, roi_ops.RoIAlign])
def test_graph_mode_variable_number_of_rois(layer_class):
    layer = layer_class(pool_size=(3, 2))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 4]),
                                  tf.TensorSpec([None, None, 4])])
    def run(feature_map, rois):
        return layer(feature_map, rois)

    rng = np.random.default_rng(1)
    for num_rois, size in [(5, 8), (1, 6), (0, 8)]:
        feature_map = rng.normal(size=(2, size, size, 4)).astype(np.float32)
        rois = random_rois(rng, 2, num_rois)
        out = run(feature_map, rois)
        assert out.shape == (2, num_rois, 3, 2, 4)
        np.testing.assert_allclose(out, layer(feature_map, rois), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", [roi_ops.RoIPooling(pool_size=(3, 2), bin_boundaries="caffe"),
                                   roi_ops.RoIAlign(pool_size=3, sampling_ratio=1,
                                                    aligned=False, pooling="max")])
def test_keras_save_load_round_trip(layer, tmp_path):
    feature_input = keras.Input((6, 6, 2))
    rois_input = keras.Input((4, 4))
    model = keras.Model([feature_input, rois_input], layer(feature_input, rois_input))
    path = tmp_path / "roi.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=(2, 6, 6, 2)).astype(np.float32), random_rois(rng, 2, 4)]
    np.testing.assert_array_equal(model(inputs), loaded(inputs))
    assert type(layer).from_config(layer.get_config()).get_config() == layer.get_config()


def test_bad_arguments():
    with pytest.raises(ValueError, match="pool_size"):
        roi_ops.RoIPooling(pool_size=0)
    with pytest.raises(ValueError, match="bin_boundaries"):
        roi_ops.RoIPooling(bin_boundaries="round")
    with pytest.raises(ValueError, match="pooling"):
        roi_ops.RoIAlign(pooling="sum")
    with pytest.raises(ValueError, match="rois"):
        roi_ops.roi_pool(np.zeros((1, 4, 4, 1)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="feature_map"):
        roi_ops.roi_align(np.zeros((4, 4, 1)), np.zeros((1, 3, 4)))


# ------------------------------------------------------------------ RoIAlign
def test_roi_align_linear_map_closed_form():
    """On f(y, x) = y (index of the row), averaging bilinear samples of a linear function
    gives f at the bin's centre: bin i of a RoI spanning [y0, y1] (continuous coords)
    has centre y0 + (i + 0.5) * (y1 - y0) / pool, read at index centre - 0.5."""
    height, width = 16, 12
    rows = np.arange(height, dtype=np.float32)[:, None] * np.ones((1, width), np.float32)
    feature_map = rows[np.newaxis, :, :, np.newaxis]
    roi = np.array([[[0.25, 0.2, 0.75, 0.9]]], np.float32)  # rows 4..12 of 16, inside the map
    out = roi_ops.RoIAlign(pool_size=4, sampling_ratio=2)(feature_map, roi)[0, 0, :, :, 0]
    start, end = 0.25 * height, 0.75 * height
    centres = start + (np.arange(4) + 0.5) * (end - start) / 4 - 0.5
    np.testing.assert_allclose(out, np.broadcast_to(centres[:, None], (4, 4)), rtol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("pooling", ["average", "max"])
def test_roi_align_random_against_reference(aligned, pooling):
    rng = np.random.default_rng(3)
    for height, width, pool, sampling in [(8, 8, (2, 2), 2), (9, 6, (3, 4), 2), (5, 7, (7, 7), 1)]:
        feature_map = rng.normal(size=(2, height, width, 3)).astype(np.float32)
        rois = random_rois(rng, 2, 5)  # some reach past the border: tests extrapolation too
        ours = roi_ops.roi_align(feature_map, rois, pool, sampling, aligned, pooling)
        reference = roi_ops.roi_align_reference(feature_map, rois, pool, sampling, aligned,
                                                pooling)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


def test_roi_align_gradient_reaches_feature_map():
    feature_map = tf.Variable(np.random.default_rng(4).normal(size=(1, 6, 6, 2)), dtype=tf.float32)
    with tf.GradientTape() as tape:
        out = roi_ops.RoIAlign(pool_size=2)(feature_map, tf.constant([[[0.1, 0.2, 0.8, 0.7]]]))
        loss = tf.reduce_sum(out)
    gradient = tape.gradient(loss, feature_map)
    assert gradient is not None and float(tf.reduce_sum(tf.abs(gradient))) > 0


# ------------------------------------------------------------------ RoIAlign by gathers (XLA)
def awkward_rois(rng, batch, count):
    """Random RoIs plus the hard cases: padding (all zero), zero height, swapped corners,
    RoIs entirely outside the map and RoIs reaching up to a whole image past the border."""
    rois = random_rois(rng, batch, count)
    rois[0, 0] = 0.0
    rois[0, 1] = [0.4, 0.1, 0.4, 0.9]  # zero height
    rois[0, 2] = [0.7, 0.8, 0.2, 0.3]  # swapped corners
    rois[1, 0] = [-0.9, -0.9, -0.5, -0.4]  # above and left of the image
    rois[1, 1] = [1.2, 0.5, 1.9, 1.4]  # below the image
    rois[1, 2] = [-0.3, -0.2, 1.4, 1.3]  # larger than the image
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("pooling", ["average", "max"])
def test_roi_align_gather_equals_crop_and_resize_and_reference(aligned, pooling):
    rng = np.random.default_rng(5)
    for height, width, pool, sampling in [(8, 8, (2, 2), 2), (9, 6, (3, 4), 3), (5, 7, (7, 7), 1)]:
        feature_map = rng.normal(size=(2, height, width, 3)).astype(np.float32)
        rois = awkward_rois(rng, 2, 7)
        ours = roi_ops.roi_align_gather(feature_map, rois, pool, sampling, aligned, pooling)
        crop = roi_ops.roi_align(feature_map, rois, pool, sampling, aligned, pooling)
        reference = roi_ops.roi_align_reference(feature_map, rois, pool, sampling, aligned,
                                                pooling)
        np.testing.assert_allclose(ours, crop, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("aligned, pooling", [(True, "average"), (False, "max")])
def test_roi_align_gather_gradient_equals_crop_and_resize_gradient(aligned, pooling):
    """The gradient w.r.t. the feature map: scatter-adds of the gathers against TensorFlow's
    CropAndResizeGradImage kernel, on random maps and awkward RoIs."""
    rng = np.random.default_rng(6)
    feature_map = tf.constant(rng.normal(size=(2, 7, 9, 3)), tf.float32)
    rois = awkward_rois(rng, 2, 6)
    upstream = tf.constant(rng.normal(size=(2, 6, 3, 3, 3)), tf.float32)  # a random loss

    def gradient(align):
        with tf.GradientTape() as tape:
            tape.watch(feature_map)
            loss = tf.reduce_sum(upstream * align(feature_map, rois, 3, 2, aligned, pooling))
        return tape.gradient(loss, feature_map)

    crop = gradient(roi_ops.roi_align)
    assert float(tf.reduce_sum(tf.abs(crop))) > 0
    np.testing.assert_allclose(gradient(roi_ops.roi_align_gather), crop, rtol=1e-5, atol=1e-5)


def test_roi_align_gather_compiles_with_xla():
    """crop_and_resize has no XLA kernel; the gather version compiles, forward and backward."""
    rng = np.random.default_rng(7)
    feature_map = tf.constant(rng.normal(size=(2, 8, 8, 4)), tf.float32)
    rois = tf.constant(awkward_rois(rng, 2, 5))

    def pooled_and_gradient(align):
        def run(feature_map, rois):
            with tf.GradientTape() as tape:
                tape.watch(feature_map)
                out = align(feature_map, rois, 2, 2, True, "average")
                loss = tf.reduce_sum(out ** 2)
            return out, tape.gradient(loss, feature_map)
        return run

    compiled = tf.function(pooled_and_gradient(roi_ops.roi_align_gather), jit_compile=True)
    expected = pooled_and_gradient(roi_ops.roi_align)(feature_map, rois)
    for ours, theirs in zip(compiled(feature_map, rois), expected):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="CropAndResize"):
        tf.function(pooled_and_gradient(roi_ops.roi_align), jit_compile=True)(feature_map, rois)


def test_roi_align_layer_implementation_switch_and_config():
    layer = roi_ops.RoIAlign(pool_size=2, implementation="gather")
    assert roi_ops.RoIAlign.from_config(layer.get_config()).implementation == "gather"
    rng = np.random.default_rng(8)
    feature_map, rois = rng.normal(size=(1, 6, 6, 2)).astype(np.float32), random_rois(rng, 1, 3)
    gathered = layer(feature_map, rois)
    layer.set_implementation("crop_and_resize")
    np.testing.assert_allclose(gathered, layer(feature_map, rois), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="implementation"):
        layer.set_implementation("loops")
    with pytest.raises(ValueError, match="static height and width"):
        tf.function(roi_ops.roi_align_gather, input_signature=[
            tf.TensorSpec([1, None, None, 2]), tf.TensorSpec([1, None, 4])])(feature_map, rois)
