"""Chapter 6: segmentation (denoising autoencoder, FCN-8s, U-Net, their losses and metrics).

Load a model this chapter saved (``train_unet.py`` writes ``<out>/model.keras``)::

    import ch06_segmentation
    model = ch06_segmentation.load_model("runs/train_unet/model.keras")

A bare ``keras.saving.load_model`` fails with ``Could not locate class ...`` for models
with the chapter's custom objects (FCN's bilinear initializer, the losses and metrics
saved with a compiled model) unless their modules were imported first; ``load_model``
does that (lazily: importing this package imports no TensorFlow).
"""

from __future__ import annotations


def load_model(path, **kwargs):
    """Load a ``.keras`` model saved by chapter 6.

    Imports the modules of chapters 4 (backbones), 5 (detection heads reused by
    instance segmentation) and 6 first, then calls ``keras.saving.load_model``.

    Args:
        path: the ``.keras`` file, e.g. ``runs/train_unet/model.keras``.
        **kwargs: passed to ``keras.saving.load_model`` (e.g. ``compile=False``).
    Returns:
        The ``keras.Model``.
    Raises:
        ValueError: the file does not exist, or Keras cannot locate one of its classes
            (the message names the loaders).
    """
    from ch04_classification import CHAPTER_LOADERS, load_chapter_model

    return load_chapter_model(path, ("ch04_classification", "ch05_detection",
                                     "ch06_segmentation"), CHAPTER_LOADERS[__name__], **kwargs)
