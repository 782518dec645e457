"""Chapter 4: image classification (LeNet-5 ... EfficientNet, backbones, transfer learning).

Load a model this chapter saved (``train_classifier.py`` writes ``<out>/model.keras``)::

    import ch04_classification
    model = ch04_classification.load_model("runs/train_classifier/model.keras")

A bare ``keras.saving.load_model`` fails with ``Could not locate class ...`` for models
with the chapter's own layers, because Keras finds a custom class only after the module
that defines (and registers) it has been imported. The chapter loaders import those
modules first. Each chapter has one: ``ch04_classification.load_model``,
``ch05_detection.load_model``, ``ch06_segmentation.load_model``.

Importing this package stays cheap: TensorFlow and the chapter's modules are imported
only when ``load_model`` is called.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

# Every chapter's loader, by the package whose classes it registers.
CHAPTER_LOADERS = {
    "ch04_classification": "ch04_classification.load_model",
    "ch05_detection": "ch05_detection.load_model",
    "ch06_segmentation": "ch06_segmentation.load_model",
}


def import_package_modules(package_name):
    """Import every module of a package (registering its Keras classes); returns the names.

    Training scripts are modules too (their learning-rate schedules are saved with the
    optimizer), so they are imported as well; none of them runs anything on import.
    """
    package = importlib.import_module(package_name)
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    for name in names:
        importlib.import_module(f"{package_name}.{name}")
    return names


# Keras's two ways of saying it cannot find a custom object: a class (layer, model,
# loss) or an identifier (initializer, regularizer, ...). Both quote the object's module.
_MISSING_OBJECT_PATTERNS = (
    re.compile(r"Could not locate class '(?P<name>[^']+)'.*?"
               r"Full object config: \{'module': '(?P<module>[^']*)'", re.DOTALL),
    re.compile(r"Could not interpret \w+ identifier: "
               r"\{'module': '(?P<module>[^']*)', 'class_name': '(?P<name>[^']+)'"),
)


def _missing_class_message(error, path, loader):
    """Keras's error for a class it cannot find -> what to call instead (None: another error)."""
    text = str(error)
    found = next((m for m in (p.search(text) for p in _MISSING_OBJECT_PATTERNS) if m), None)
    if found is None:
        return None
    class_name, module_name = found.group("name"), found.group("module")
    package = module_name.split(".")[0]
    if package in CHAPTER_LOADERS and CHAPTER_LOADERS[package] != loader:
        return (f"{path!s} holds a model with class {class_name!r} from {module_name}, which "
                f"{loader} does not load: use {CHAPTER_LOADERS[package]}({str(path)!r}) "
                f"(after `import {package}`)")
    return (f"{path!s}: Keras could not locate class {class_name!r} (defined in "
            f"{module_name or 'an unknown module'}). The chapter loaders are "
            f"{', '.join(CHAPTER_LOADERS.values())}; a class of your own must be imported "
            "(its module run) before loading, or passed as custom_objects=")


def load_chapter_model(path, packages, loader, **kwargs):
    """``keras.saving.load_model(path, **kwargs)`` after importing ``packages``' modules.

    Shared by the chapter loaders. A missing file is a ValueError naming it; Keras's
    'Could not locate class' error becomes a ValueError that names the loader to use.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model file {str(path)!r} does not exist (or is not a file); "
                         "expected a .keras file written by one of the training scripts")
    for package in ("common", *packages):
        import_package_modules(package)
    import keras

    try:
        return keras.saving.load_model(path, **kwargs)
    except (TypeError, ValueError) as error:
        message = _missing_class_message(error, path, loader)
        if message is None:
            raise
        raise ValueError(message) from error


def load_model(path, **kwargs):
    """Load a ``.keras`` model saved by chapter 4 (classifiers, backbones).

    Imports the chapter's modules first, so Keras can find its custom layers
    (``LocalResponseNormalization``, LeNet-5's layers, ``ImageNetPreprocessing``) and
    the training script's learning-rate schedule.

    Args:
        path: the ``.keras`` file, e.g. ``runs/train_classifier/model.keras``.
        **kwargs: passed to ``keras.saving.load_model`` (e.g. ``compile=False``).
    Returns:
        The ``keras.Model``.
    Raises:
        ValueError: the file does not exist, or it holds a model of another chapter (the
            message names that chapter's loader).
    """
    return load_chapter_model(path, ("ch04_classification",), CHAPTER_LOADERS[__name__], **kwargs)
