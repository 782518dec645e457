"""Chapter 5: object detection (box operations, anchors, RPN, RoI ops, Faster R-CNN, YOLO, SSD,
feature pyramids and focal loss, RetinaNet, CenterNet, evaluation).

Every detector follows one interface (``detector.py``). Load a detector this chapter saved
(``train_faster_rcnn.py`` writes ``<out>/faster_rcnn.keras``, ``train_detector.py --model M``
writes ``<out>/M.keras``)::

    import ch05_detection
    model = ch05_detection.load_model("runs/train_faster_rcnn/faster_rcnn.keras")
    detections = model.detect(images)

A bare ``keras.saving.load_model`` fails with ``Could not locate class 'FasterRCNN'``
unless the module defining the class was imported first; ``load_model`` does that
(lazily: importing this package imports no TensorFlow).
"""

from __future__ import annotations


def load_model(path, **kwargs):
    """Load a ``.keras`` model saved by chapter 5 (Faster R-CNN and its layers).

    Imports the modules of chapters 4 (the backbones) and 5 first, so Keras can find
    every custom class, then calls ``keras.saving.load_model``.

    Args:
        path: the ``.keras`` file, e.g. ``runs/train_faster_rcnn/faster_rcnn.keras``.
        **kwargs: passed to ``keras.saving.load_model`` (e.g. ``compile=False``).
    Returns:
        The model (a ``FasterRCNN`` for the training script's file).
    Raises:
        ValueError: the file does not exist, or it holds a model of another chapter (the
            message names that chapter's loader).
    """
    from ch04_classification import CHAPTER_LOADERS, load_chapter_model

    return load_chapter_model(path, ("ch04_classification", "ch05_detection"),
                              CHAPTER_LOADERS[__name__], **kwargs)
