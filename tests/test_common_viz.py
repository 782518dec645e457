"""common.viz: every function returns a figure, saves a PNG, draws what it is given."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from common import synthetic, viz


@pytest.fixture
def scenes():
    return [synthetic.make_scene(i, image_size=64) for i in range(4)]


def test_show_images_saves_png(tmp_path, scenes):
    figure = viz.show_images(np.stack([s["image"] for s in scenes]), titles=list("abcd"),
                             save_path=tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 1000
    assert [ax.get_title() for ax in figure.axes[:4]] == list("abcd")
    plt.close(figure)


def test_draw_boxes_places_rectangles_in_pixels_and_skips_padding():
    figure, ax = plt.subplots()
    ax.imshow(np.zeros((100, 200, 3)))
    viz.draw_boxes(ax, [[0.1, 0.2, 0.5, 0.6], [0, 0, 0, 0]], classes=[1, -1], scores=[0.9, 0.0],
                   class_names=["a", "b"])
    rectangles = [p for p in ax.patches]
    assert len(rectangles) == 1
    x, y = rectangles[0].get_xy()
    assert (x + 0.5, y + 0.5) == pytest.approx((40, 10))
    assert rectangles[0].get_width() == pytest.approx(80)
    assert rectangles[0].get_height() == pytest.approx(40)
    assert ax.texts[0].get_text() == "b 0.90"
    plt.close(figure)


def test_show_detections_with_ground_truth(tmp_path, scenes):
    images = np.stack([s["image"] for s in scenes])
    boxes = np.zeros((4, 5, 4), np.float32)
    classes = -np.ones((4, 5), np.int32)
    for b, s in enumerate(scenes):
        boxes[b, : len(s["boxes"])] = s["boxes"]
        classes[b, : len(s["classes"])] = s["classes"]
    figure = viz.show_detections(images, boxes, classes, np.ones((4, 5)), synthetic.CLASS_NAMES,
                                 gt_boxes=boxes, gt_classes=classes, save_path=tmp_path / "d.png")
    drawn = sum(len(ax.patches) for ax in figure.axes)
    assert drawn == 2 * int((classes >= 0).sum())
    assert (tmp_path / "d.png").exists()
    plt.close(figure)


def test_overlay_mask_colours_only_foreground(scenes):
    scene = next(s for s in scenes if len(s["classes"]))
    out = viz.overlay_mask(scene["image"], scene["mask"])
    background = scene["mask"] == 0
    np.testing.assert_allclose(out[background], scene["image"][background], atol=1e-6)
    assert not np.allclose(out[~background], scene["image"][~background])
    assert viz.overlay_mask(scene["image"], scene["masks"]).shape == scene["image"].shape
    with pytest.raises(ValueError):
        viz.overlay_mask(scene["image"], np.zeros((2, 2, 2, 2)))


def test_segmentation_history_and_confusion_figures(tmp_path, scenes):
    images = np.stack([s["image"] for s in scenes])
    masks = np.stack([s["mask"] for s in scenes])
    figure = viz.show_segmentation(images, masks, masks, save_path=tmp_path / "s.png")
    assert len(figure.axes) == 12
    figure = viz.plot_history({"loss": [3, 2, 1], "val_loss": [3, 2.5, 2], "accuracy": [0.1, 0.5, 0.9]},
                              save_path=tmp_path / "h.png")
    assert [ax.get_title() for ax in figure.axes] == ["loss", "accuracy"]
    assert len(figure.axes[0].lines) == 2
    figure = viz.plot_confusion_matrix(np.array([[5, 1], [0, 4]]), ["x", "y"], save_path=tmp_path / "c.png")
    assert {p.name for p in tmp_path.iterdir()} == {"s.png", "h.png", "c.png"}
    plt.close("all")


def test_ground_truth_is_drawn_without_labels_so_detection_labels_stay_readable():
    figure = viz.show_detections(np.zeros((1, 32, 32, 3)), [[[0.1, 0.1, 0.5, 0.5]]], [[0]],
                                 [[0.9]], ["circle"], gt_boxes=[[[0.1, 0.1, 0.6, 0.6]]], gt_classes=[[0]])
    ax = figure.axes[0]
    assert len(ax.patches) == 2
    assert [t.get_text() for t in ax.texts] == ["circle 0.90"]
    plt.close(figure)
