"""Tests for ch05_detection/anchors.py: the paper's anchor count, hand-computed
anchors, areas and ratios, order, the Keras layer under tf.function and its
serialisation."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ch05_detection import anchors as A


def test_num_anchors_per_location():
    assert A.num_anchors_per_location() == 9  # Ren et al. 2015: 3 scales x 3 ratios
    assert A.num_anchors_per_location((32, 64), (1.0,)) == 2


@pytest.mark.parametrize("rounding", [math.floor, math.ceil])
def test_paper_count_for_1000x600_image(rounding):
    """Ren et al. 2015, sec. 3.1.4: a ~1000x600 image gives ~60x40x9 ≈ 20000 anchors."""
    feature_height, feature_width = rounding(600 / 16), rounding(1000 / 16)
    anchors = A.generate_anchors(feature_height, feature_width, stride=16)
    assert anchors.shape == (feature_height * feature_width * 9, 4)
    assert 18000 <= anchors.shape[0] <= 22000


def test_one_by_one_map_by_hand():
    # Centre (8, 8); ratio r = height / width, scale s: height s*sqrt(r), width s/sqrt(r).
    anchors = A.generate_anchors(1, 1, stride=16, scales=(32.0,), aspect_ratios=(0.5, 1.0, 2.0))
    half_h = [16 * math.sqrt(0.5), 16.0, 16 * math.sqrt(2.0)]
    half_w = [16 / math.sqrt(0.5), 16.0, 16 / math.sqrt(2.0)]
    expected = [[8 - h, 8 - w, 8 + h, 8 + w] for h, w in zip(half_h, half_w)]
    np.testing.assert_allclose(anchors, expected, rtol=1e-6)


def test_areas_ratios_centres_and_order():
    scales, ratios = (128.0, 256.0, 512.0), (0.5, 1.0, 2.0)
    anchors = A.generate_anchors(3, 4, stride=16, scales=scales, aspect_ratios=ratios).numpy()
    grid = anchors.reshape(3, 4, 9, 4)  # [H, W, k, 4]: location-major, as a conv head outputs
    heights = grid[..., 2] - grid[..., 0]
    widths = grid[..., 3] - grid[..., 1]
    expected_areas = [s * s for r in ratios for s in scales]   # ratio-major, scale-minor
    expected_ratios = [r for r in ratios for s in scales]
    np.testing.assert_allclose(heights * widths, np.broadcast_to(expected_areas, (3, 4, 9)),
                               rtol=1e-5)
    np.testing.assert_allclose(heights / widths, np.broadcast_to(expected_ratios, (3, 4, 9)),
                               rtol=1e-5)
    center_y = (grid[..., 0] + grid[..., 2]) / 2
    center_x = (grid[..., 1] + grid[..., 3]) / 2
    np.testing.assert_allclose(center_y[:, 0, 0], [8.0, 24.0, 40.0], rtol=1e-6)
    np.testing.assert_allclose(center_x[0, :, 0], [8.0, 24.0, 40.0, 56.0], rtol=1e-6)


def test_normalized_and_rectangular_stride():
    pixels = A.generate_anchors(2, 3, stride=(8, 16), scales=(16.0,), aspect_ratios=(1.0,))
    normalized = A.generate_anchors(2, 3, stride=(8, 16), scales=(16.0,), aspect_ratios=(1.0,),
                                    image_height=16, image_width=48, normalized=True)
    np.testing.assert_allclose(normalized * [16, 48, 16, 48], pixels, rtol=1e-6)
    np.testing.assert_allclose(pixels[-1], [12 - 8, 40 - 8, 12 + 8, 40 + 8])


def test_bad_arguments():
    with pytest.raises(ValueError, match="aspect_ratios"):
        A.generate_anchors(2, 2, 16, aspect_ratios=(0.0,))
    with pytest.raises(ValueError, match="scales"):
        A.generate_anchors(2, 2, 16, scales=())
    with pytest.raises(ValueError, match="stride"):
        A.generate_anchors(2, 2, 0)
    with pytest.raises(ValueError, match="image_height"):
        A.generate_anchors(2, 2, 16, normalized=True)


def test_empty_feature_map():
    assert A.generate_anchors(0, 5, 16).shape == (0, 4)


def test_layer_dynamic_shape_in_tf_function():
    layer = A.AnchorGenerator(stride=16, normalized=True)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 8]),
                                  tf.TensorSpec([None, None, None, 3])])
    def run(feature_map, image):
        return layer(feature_map, image)

    for height, width in [(3, 5), (4, 2)]:
        image = tf.zeros((2, height * 16 - 3, width * 16, 3))
        out = run(tf.zeros((2, height, width, 8)), image)
        expected = A.generate_anchors(height, width, 16, image_height=height * 16 - 3,
                                      image_width=width * 16, normalized=True)
        np.testing.assert_allclose(out, expected, rtol=1e-6)
    # Without an image, normalise by feature size x stride; broadcast over the batch.
    layer = A.AnchorGenerator(stride=16, normalized=True, broadcast_to_batch=True)
    out = layer(tf.zeros((3, 2, 2, 4)))
    assert out.shape == (3, 2 * 2 * 9, 4)
    np.testing.assert_allclose(out[1], A.generate_anchors(2, 2, 16, image_height=32,
                                                          image_width=32, normalized=True))


def test_layer_keras_round_trip(tmp_path):
    inputs = keras.Input((4, 6, 8))
    anchors = A.AnchorGenerator(stride=8, scales=(16.0, 32.0), aspect_ratios=(0.5, 2.0),
                                normalized=True, image_size=(32, 48),
                                broadcast_to_batch=True)(inputs)
    model = keras.Model(inputs, anchors)
    path = tmp_path / "anchors.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    feature_map = np.zeros((2, 4, 6, 8), np.float32)
    np.testing.assert_array_equal(model(feature_map), loaded(feature_map))
    layer = A.AnchorGenerator(stride=(8, 4), scales=(16.0,))
    clone = A.AnchorGenerator.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
