"""Tests of the feature pyramid network (ch05_detection/fpn.py)."""

import keras
import numpy as np
import pytest

from ch04_classification.models import BACKBONE_NAMES
from ch05_detection import fpn

SIZE = 64


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_pyramid_shapes_on_every_chapter4_backbone(backbone):
    """P3-P5 at strides 8, 16, 32, all of the pyramid's width, for every backbone name."""
    keras.utils.set_random_seed(0)
    model = fpn.build_fpn(backbone, (SIZE, SIZE, 3), width=8, weights=None)
    expected = {"P3": (SIZE // 8, SIZE // 8, 8), "P4": (SIZE // 16, SIZE // 16, 8),
                "P5": (SIZE // 32, SIZE // 32, 8)}
    assert {name: tuple(t.shape[1:]) for name, t in model.output.items()} == expected
    outputs = model(np.random.default_rng(0).random((2, SIZE, SIZE, 3), np.float32))
    assert {name: tuple(t.shape) for name, t in outputs.items()} == {
        name: (2, *shape) for name, shape in expected.items()}
    assert all(np.isfinite(t.numpy()).all() for t in outputs.values())


def test_retinanet_levels_p6_p7_and_any_input_size():
    model = fpn.build_fpn("resnet_small", (None, None, 3), width=8, max_level=7,
                          filters=[8, 16, 32, 64])
    outputs = model(np.zeros((1, 128, 128, 3), np.float32))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {
        "P3": (1, 16, 16, 8), "P4": (1, 8, 8, 8), "P5": (1, 4, 4, 8), "P6": (1, 2, 2, 8),
        "P7": (1, 1, 1, 8)}
    # 96 px: 12, 6, 3 cells, then P6 and P7 round up (stride-2 'same' convolutions).
    outputs = model(np.zeros((1, 96, 96, 3), np.float32))
    assert [tuple(v.shape[1:3]) for v in outputs.values()] == [(12, 12), (6, 6), (3, 3), (2, 2),
                                                               (1, 1)]
    # FPN's own Faster R-CNN setting starts at P2 (stride 4).
    p2 = fpn.build_fpn("resnet_small", (64, 64, 3), width=8, min_level=2,
                       filters=[8, 16, 32, 64])
    assert list(p2.output) == ["P2", "P3", "P4", "P5"]
    assert tuple(p2.output["P2"].shape[1:]) == (16, 16, 8)


def _set_identity(conv, scale=1.0, center=True):
    """Kernel = scale x identity on the channels (at the centre tap of a 3x3), bias 0."""
    kernel, bias = conv.get_weights()
    kernel = np.zeros_like(kernel)
    k = kernel.shape[0] // 2 if center else 0
    kernel[k, k] = scale * np.eye(kernel.shape[2], kernel.shape[3])
    conv.set_weights([kernel, np.zeros_like(bias)])


def test_top_down_pathway_by_hand():
    """With identity laterals and smoothing = 2 x identity, the pyramid is hand-computable:
    M5 = C5, M4 = C4 + up(M5), M3 = C3 + up(M4), P_l = 2 M_l (the top-down pathway carries the
    merged maps, not the smoothed ones), P6 = conv/2(C5), P7 = conv/2(ReLU(P6))."""
    rng = np.random.default_rng(1)
    c3, c4, c5 = (rng.normal(size=(2, s, s, 4)).astype(np.float32) for s in (16, 8, 4))
    layer = fpn.FeaturePyramid(width=4, max_level=7)
    layer({"stride_8": c3, "stride_16": c4, "stride_32": c5})  # builds the weights
    for level in (3, 4, 5):
        _set_identity(layer.lateral_convs[f"P{level}"])
        _set_identity(layer.output_convs[f"P{level}"], scale=2.0)
    for level in (6, 7):
        _set_identity(layer.extra_convs[f"P{level}"])
    out = {k: v.numpy() for k, v in layer([c3, c4, c5]).items()}  # a list works too

    def up(x):
        return x.repeat(2, axis=1).repeat(2, axis=2)

    m5 = c5
    m4 = c4 + up(m5)
    m3 = c3 + up(m4)
    np.testing.assert_allclose(out["P5"], 2 * m5, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["P4"], 2 * m4, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["P3"], 2 * m3, rtol=1e-5, atol=1e-5)
    # A stride-2 'same' 3x3 convolution on an even map centres its taps on odd pixels.
    p6 = c5[:, 1::2, 1::2]
    np.testing.assert_allclose(out["P6"], p6, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["P7"], np.maximum(p6, 0)[:, 1::2, 1::2], rtol=1e-5, atol=1e-5)
    # Nearest upsampling by 2 is pixel repetition.
    np.testing.assert_array_equal(fpn.upsample_like(c5, c4).numpy(), up(c5))


def test_config_save_and_bad_options(tmp_path):
    layer = fpn.FeaturePyramid(width=16, min_level=3, max_level=6, name="fpn")
    assert fpn.FeaturePyramid.from_config(layer.get_config()).get_config() == layer.get_config()
    model = fpn.build_fpn("resnet_small", (64, 64, 3), width=8, filters=[8, 16, 32, 64])
    path = tmp_path / "fpn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    images = np.random.default_rng(2).random((2, 64, 64, 3), np.float32)
    expected, actual = model(images), loaded(images)
    for key in expected:
        np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy())
    with pytest.raises(ValueError, match="max_level"):
        fpn.FeaturePyramid(max_level=8)
    with pytest.raises(ValueError, match="min_level"):
        fpn.FeaturePyramid(min_level=1)
    with pytest.raises(ValueError, match="width"):
        fpn.FeaturePyramid(width=0)
    with pytest.raises(ValueError, match="stride_8"):
        fpn.FeaturePyramid(width=4)({"stride_16": np.zeros((1, 4, 4, 2), np.float32),
                                     "stride_32": np.zeros((1, 2, 2, 2), np.float32)})
